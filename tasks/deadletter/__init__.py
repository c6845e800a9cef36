"""The dead-letter queue for operators: list, show, replay and purge dead-lettered tasks.

`store` holds plain functions over a kombu connection; `cli` is the
``celery -A tasks dlq ...`` command group built on them.
"""
