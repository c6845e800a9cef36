"""The Redis result backend, subscribing to a task's result only when the caller waits for it.

Celery's `RedisBackend.on_task_call` subscribes to the task's result channel inside every
`apply_async`, whether or not the caller ever reads the result: one more Redis command per
`delay()`, and in a long-lived producer (a web app) a subscription per task sent that is only
dropped when its `AsyncResult` is collected or read (celery#3808, celery#5320).

`AsyncResult.get()` subscribes by itself (`add_pending_result`) and then reads the stored result
(`on_wait_for_pending`), so a result stored before the subscription is not missed; `ready()`,
`state` and `result` read the stored result and never subscribe. The one gap subscribing late
opens: the SUBSCRIBE goes on the pub/sub connection and that first read on another one, so a
result stored between the two being handled by Redis would be neither read nor delivered. The
consumer below closes it by reading the stored result again at each wait interval (1 s), so such
a result costs at most one interval.

It also stores a task's state in one Redis round trip instead of two: Celery reads the stored
result first (a GET) and leaves it alone if it says SUCCESS, so that a redelivered copy of a
finished task cannot turn it back into STARTED or FAILURE; then it writes and publishes it (a
MULTI/SETEX/PUBLISH/EXEC). With `task_track_started` that is four round trips per task in the
pool process. The script below makes the same check and the same write inside Redis.

Reading a state (`AsyncResult(id).state`, `.result`, `.ready()`) is bounded by
`conveyor_result_read_timeout`: with Redis unreachable or frozen, Celery's own read retried for
about 15 s, each attempt with redis-py's retries and a socket that may wait 120 s, before
`BackendGetMetaError`. A web request cannot wait that long. The read goes through its own
connection pool with short socket timeouts and no redis-py retries, and is retried only while
the bound allows; then `BackendGetMetaError` is raised. Storing results keeps Celery's longer
retries (`result_backend_always_retry`): a worker must not lose a result to a short outage.

Selected by `conveyor_result_backend_class` (celeryconfig.py); used by producers and workers
alike (a task that sends another gets the same behaviour).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

import redis
from celery import Celery, states
from celery.backends import redis as celery_redis
from celery.exceptions import BackendGetMetaError, BackendStoreError
from celery.result import AsyncResult
from kombu.utils.encoding import bytes_to_str
from redis.backoff import NoBackoff
from redis.retry import Retry

#: Celery's `_store_result` guard and `_set`, as one script: KEYS[1] the task's key (also its
#: channel), ARGV[1] the encoded meta, ARGV[2] the expiry in seconds (0: none).
STORE_UNLESS_SUCCEEDED = """
local current = redis.call('GET', KEYS[1])
if current then
    local ok, meta = pcall(cjson.decode, current)
    if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
        return 0
    end
end
if tonumber(ARGV[2]) > 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
    redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


# celery-types covers little of the backend's internals that these classes use.
_CeleryRedisBackend: Any = celery_redis.RedisBackend


class ResultConsumer(_CeleryRedisBackend.ResultConsumer):  # type: ignore[misc]
    def _wait_for_pending(
        self,
        result: AsyncResult[Any],
        timeout: float | None = None,
        on_interval: Callable[[], Any] | None = None,
        on_message: Callable[[dict[str, Any]], Any] | None = None,
        **kwargs: Any,
    ) -> Iterator[None]:
        def read_again() -> None:
            self.on_wait_for_pending(result, timeout=timeout, **kwargs)
            if on_interval is not None:
                on_interval()

        return super()._wait_for_pending(  # type: ignore[no-any-return]
            result, timeout=timeout, on_interval=read_again, on_message=on_message, **kwargs
        )


class RedisBackend(_CeleryRedisBackend):  # type: ignore[misc]
    """Celery's Redis backend without the subscription in `apply_async`."""

    ResultConsumer = ResultConsumer

    def __init__(self, app: Celery, url: str | None = None, **kwargs: Any) -> None:
        # Selected as a class, Celery passes no URL: take result_backend's, as it would.
        super().__init__(app=app, url=url or app.conf.result_backend, **kwargs)

    def get_task_meta(self, task_id: str, cache: bool = True) -> dict[str, Any]:
        """The task's stored state, read within conveyor_result_read_timeout seconds, else
        BackendGetMetaError (see the module's docstring)."""
        self._ensure_not_eager()
        if cache and task_id in self._cache:
            return self._cache[task_id]  # type: ignore[no-any-return]
        meta = self._read_meta_within_bound(task_id)
        if cache and meta.get("status") == states.SUCCESS:
            self._cache[task_id] = meta
        return meta

    def _read_meta_within_bound(self, task_id: str) -> dict[str, Any]:
        bound = float(self.app.conf.conveyor_result_read_timeout)
        deadline = time.monotonic() + bound
        pause = 0.05
        while True:
            try:
                return self._read_meta(task_id)
            except self.connection_errors as exc:
                # Another attempt only while one more can finish in time.
                if time.monotonic() + pause + bound / 2 > deadline:
                    raise BackendGetMetaError(  # type: ignore[call-arg]
                        f"result store unreachable ({type(exc).__name__}: {exc}); reads "
                        f"give up within conveyor_result_read_timeout = {bound:g} s",
                        task_id=task_id,
                    ) from exc
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    def _read_meta(self, task_id: str) -> dict[str, Any]:
        value = self._reader.get(self.get_key_for_task(task_id))
        if not value:
            return {"status": states.PENDING, "result": None}
        return self.decode_result(value)  # type: ignore[no-any-return]

    @cached_property
    def _reader(self) -> redis.Redis:
        """A client for state reads: each attempt takes at most half the read bound."""
        attempt = float(self.app.conf.conveyor_result_read_timeout) / 2
        params = {**self.connparams, "socket_timeout": attempt, "retry_on_timeout": False}
        if "socket_connect_timeout" in params:  # absent for a unix socket
            params["socket_connect_timeout"] = attempt
        params["retry"] = Retry(NoBackoff(), 0)  # the loop above is the only retry
        return redis.Redis(connection_pool=self.ConnectionPool(**params))

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Subscribe nowhere: `AsyncResult.get()` subscribes when, and if, it is called."""

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if self.serializer != "json":
            # The script reads the stored status as JSON.
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(  # type: ignore[call-arg]
                "value too large for Redis backend", state=state, task_id=task_id
            )
        expires = self.failure_expires if state == states.FAILURE else self.expires
        key = self.get_key_for_task(task_id)
        self.ensure(self._store_unless_succeeded, (key, value, int(expires or 0)))
        return result

    def _store_unless_succeeded(self, key: bytes, value: str, expires: int) -> None:
        self._store_script(keys=[key], args=[value, expires])

    @cached_property
    def _store_script(self) -> Any:
        # EVALSHA, and EVAL once when Redis does not know the script yet (after a restart).
        return self.client.register_script(STORE_UNLESS_SUCCEEDED)
