"""The one way Conveyor opens a Redis client: `client(url)`.

Every feature that keeps state in Redis (idempotency, batches, schedule locks and records,
cancellations) calls it, so they share the same settings:

- responses decoded to ``str`` (the default; ``decode_responses=False`` for raw bytes);
- socket timeouts, so a Redis that stopped answering is an error in seconds, not a hang;
- one connection pool per process, URL and settings, made on first use. A pool holds open
  sockets: a pool process forked from a worker that already had one must not share it
  (two processes reading replies from one socket get each other's answers), so the cache is
  keyed by process id and a forked child builds its own.
"""

from __future__ import annotations

import os
import threading

import redis

#: Seconds to connect and to wait for a reply by default.
DEFAULT_TIMEOUT = 5.0

_Key = tuple[int, str, bool, float]
_clients: dict[_Key, redis.Redis] = {}
_lock = threading.Lock()


def client(
    url: str, *, decode_responses: bool = True, timeout: float = DEFAULT_TIMEOUT
) -> redis.Redis:
    """This process's client (and connection pool) for `url` with these settings."""
    key = (os.getpid(), str(url), decode_responses, float(timeout))
    with _lock:
        found = _clients.get(key)
        if found is None:
            found = _clients[key] = redis.Redis.from_url(
                str(url),
                decode_responses=decode_responses,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
            )
        return found
