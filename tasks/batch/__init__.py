"""Batch processing: submit many items to a named handler, fan out in chunks, track, reduce.

The producer side is a pipeline; each stage imports only the stages before it:

- ``inputs``: CSV and JSONL readers (items as Entries, a CSV's header)
- ``chunking``: items cut into chunk messages, lazily
- ``publishing``: a batch recorded and its chunks published with pipelined confirms
- ``api``: submit / status / failures / cancel / retry / wait / list (what web apps call)

Beside it:

- ``handlers``: the registry of named item handlers (aggregate, write_files, noop)
- ``store``: the batch's state in Redis, with its key layout, expiry and index; Lua in ``lua/``
- ``runner``: what a chunk and the completion step do, as plain functions
- ``tasks``: the ``batch.*`` Celery tasks (routed to the ``batch`` queue), handed to
  ``publishing`` as ``BatchTasks`` by ``api``; nothing below imports it
- ``codec``: a chunk's items as one compact JSON text
- ``cli``: ``celery -A tasks batch ...``

See docs/batch.md.
"""
