"""Side-by-side benchmarks: raw AMQP, Conveyor, stock Celery and Dramatiq on one broker.

Run with ``python -m benchmarks [--quick] [--json PATH]``; see docs/performance.md. The batch
benchmark also runs alone as ``python -m benchmarks.batch``; each module's ``run(quick)``
returns result rows.
"""
