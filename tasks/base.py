"""The base class of every Conveyor task: bounded, broker-friendly publishing."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import celery
import redis
from celery.exceptions import Reject
from celery.utils.log import get_task_logger

from tasks.idempotency import EffectInProgress, Outcome, client_for, run_once, run_once_in_redis
from tasks.schedule import overlap
from workers.events import sent_events

T = TypeVar("T")
logger = get_task_logger(__name__)


class ArgumentsTooLarge(ValueError):
    """The serialized arguments exceed conveyor_max_argument_bytes: pass an id, not the data."""


def check_argument_size(args: Any, kwargs: Any, limit: int) -> None:
    """Raise ArgumentsTooLarge when args + kwargs serialize to more than `limit` bytes."""
    try:
        size = len(json.dumps([args or (), kwargs or {}], separators=(",", ":"), default=str))
    except (TypeError, ValueError):
        # Unserializable arguments fail in Celery's own encoder with its clearer message.
        return
    if size > limit:
        raise ArgumentsTooLarge(
            f"task arguments serialize to {size} bytes; the limit is {limit} "
            "(conveyor_max_argument_bytes). Store the data elsewhere and pass its id."
        )


def publish_options(
    options: dict[str, Any],
    *,
    publish_timeout: float,
    now: datetime,
    declare_on_publish: bool = True,
) -> dict[str, Any]:
    """Return apply_async options with bounded waits and a delay the broker can carry.

    Native delayed delivery has whole-second resolution and Celery truncates the delay with
    int(), so `countdown=0.5` raises ValueError and `countdown=1.7` runs 0.7 s early. The delay
    is rounded up instead: a job never runs before its time, and at most 1 s after it.
    """
    options = dict(options)
    if not declare_on_publish:
        # The producer role may only publish: declaring the queue needs `configure` on it,
        # which would also let a web app delete it. The topology comes from provisioning.
        options.setdefault("declare", [])
    options.setdefault("timeout", publish_timeout)
    options.setdefault("confirm_timeout", publish_timeout)

    eta = options.pop("eta", None)
    countdown = options.pop("countdown", None)
    if eta is not None and countdown is None:
        if isinstance(eta, str):
            eta = datetime.fromisoformat(eta)
        if eta.tzinfo is None:
            eta = eta.replace(tzinfo=UTC)
        countdown = (eta - now).total_seconds()
    if countdown is not None:
        delay = math.ceil(float(countdown))
        if delay > 0:
            options["countdown"] = delay
    return options


class Task(celery.Task):  # type: ignore[type-arg]
    """Bounded publishing, transient-error retries, and dead-lettering when retries run out.

    - every apply_async gets publish/confirm timeouts, whole-second delays and a size limit;
    - connection errors, timeouts and a busy idempotency lease retry with exponential backoff
      and full jitter, at most `max_retries` times (a task may narrow or widen this);
    - when the last retry fails, the message is rejected to the dead-letter queue (and the
      failure stored as the result) instead of being acked as a silent failure.
    """

    autoretry_for = (ConnectionError, TimeoutError, EffectInProgress)
    retry_backoff = True
    retry_backoff_max = 600
    retry_jitter = True
    max_retries = 5

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: Exception | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: Any = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        limit = self.max_retries if max_retries is None else max_retries
        request = self.request
        if limit is not None and request.retries >= limit and not request.called_directly:
            reason: Exception = exc if exc is not None else RuntimeError("retries exhausted")
            logger.error(
                "retries exhausted; dead-lettering task=%s id=%s retries=%s reason=%r",
                self.name,
                request.id,
                request.retries,
                reason,
            )
            self.backend.mark_as_failure(str(request.id), reason, request=request)
            raise Reject(reason, requeue=False)
        return super().retry(
            args, kwargs, exc, throw, eta, countdown, max_retries=max_retries, **options
        )

    def run_once(
        self,
        key: str,
        effect: Callable[[], T],
        *,
        ttl: int | None = None,
        lease: float | None = None,
    ) -> Outcome[T]:
        """Run a side effect at most once per key (see tasks.idempotency)."""
        client, ttl, lease = self._idempotency(ttl, lease)
        return run_once(client, key, effect, ttl=ttl, lease=lease)

    def run_once_in_redis(
        self,
        key: str,
        effect: Callable[[Any], None],
        *,
        ttl: int | None = None,
        lease: float | None = None,
    ) -> Outcome[list[Any] | None]:
        """Redis writes at most once per key, committed with their done-marker (see
        tasks.idempotency.run_once_in_redis); they go to conveyor_idempotency_url's database."""
        client, ttl, lease = self._idempotency(ttl, lease)
        return run_once_in_redis(client, key, effect, ttl=ttl, lease=lease)

    def _idempotency(self, ttl: int | None, lease: float | None) -> tuple[redis.Redis, int, float]:
        """The idempotency store and the ttl and lease, defaulting to the configured ones."""
        conf = self.app.conf
        return (
            client_for(conf.conveyor_idempotency_url),
            int(conf.conveyor_idempotency_ttl if ttl is None else ttl),
            float(conf.conveyor_idempotency_lease if lease is None else lease),
        )

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        check_argument_size(args, kwargs, int(self.app.conf.conveyor_max_argument_bytes))
        options = publish_options(
            options,
            publish_timeout=float(self.app.conf.conveyor_publish_timeout),
            now=datetime.now(UTC),
            declare_on_publish=bool(self.app.conf.conveyor_declare_on_publish),
        )
        if self.app.conf.task_send_sent_event:
            # The task-sent event off the task's confirmed channel and off the caller's path:
            # buffered, sent as a list at most conveyor_sent_event_interval later
            # (workers/events.py).
            options.setdefault("event_dispatcher", sent_events(self.app))
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow, **options
        )

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        # Periodic runs must not overlap their entry's previous run (tasks/schedule/overlap.py).
        overlap.enter(self, task_id)
