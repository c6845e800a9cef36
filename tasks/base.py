"""The base class of every Conveyor task: bounded, broker-friendly publishing."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import celery

from tasks.schedule import overlap


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
    """Adds publish/confirm timeouts and whole-second delays to every apply_async."""

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
        options = publish_options(
            options,
            publish_timeout=float(self.app.conf.conveyor_publish_timeout),
            now=datetime.now(UTC),
            declare_on_publish=bool(self.app.conf.conveyor_declare_on_publish),
        )
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow, **options
        )

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        # Periodic runs must not overlap their entry's previous run (tasks/schedule/overlap.py).
        overlap.enter(self, task_id)
