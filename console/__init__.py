"""The Conveyor console: batches, schedules, dead letters and queues in a browser, with actions.

`celery -A tasks console --address ADDR --port PORT` (console/command.py) serves server-rendered
pages and the same data as JSON under /api/ (console/web.py), read through the features' public
functions (console/sources.py). Operators may act, viewers only read (console/auth.py). See
docs/console.md.
"""
