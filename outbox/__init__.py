"""The outbox relay process: `celery -A tasks outbox relay` and `celery -A tasks outbox migrate`.

Web requests write task rows with tasks.outbox inside their own transaction; this package
publishes the committed ones (relay.py) and creates the table (schema.sql). docs/outbox.md.
"""
