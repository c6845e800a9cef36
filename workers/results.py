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

Selected by `conveyor_result_backend_class` (celeryconfig.py); used by producers and workers
alike (a task that sends another gets the same behaviour).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from celery import Celery
from celery.backends import redis as celery_redis
from celery.result import AsyncResult


class ResultConsumer(celery_redis.ResultConsumer):  # type: ignore[misc,name-defined]
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


class RedisBackend(celery_redis.RedisBackend):
    """Celery's Redis backend without the subscription in `apply_async`."""

    ResultConsumer = ResultConsumer

    def __init__(self, app: Celery, url: str | None = None, **kwargs: Any) -> None:
        # Selected as a class, Celery passes no URL: take result_backend's, as it would.
        super().__init__(app=app, url=url or app.conf.result_backend, **kwargs)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Subscribe nowhere: `AsyncResult.get()` subscribes when, and if, it is called."""
