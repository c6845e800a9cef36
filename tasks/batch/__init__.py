"""Batch processing: submit many items to a named handler, fan out in chunks, track, reduce.

- ``api``: submit / status / failures / cancel / retry / wait (what web apps and scripts call)
- ``handlers``: the registry of named item handlers (aggregate, write_files, noop)
- ``store``: the batch's state in Redis, with its key layout and expiry
- ``publisher``: chunk messages out with pipelined publisher confirms
- ``runner``: what a chunk and the completion step do, as plain functions
- ``tasks``: the ``batch.*`` Celery tasks (routed to the ``batch`` queue)
- ``cli``: ``celery -A tasks batch ...``

See docs/batch.md.
"""
