"""Features extend every task and process through one registry, wired when the app is made."""

from __future__ import annotations

import weakref
from typing import Any

from celery.signals import beat_init, task_postrun, task_success
from redbeat.schedulers import acquire_distributed_beat_lock

from tasks.base import BEFORE_START, Task, on_before_start
from tasks.celery_app import EXTENSIONS
from tasks.schedule import last_success, overlap
from tasks.webhooks import deliver


def receivers(signal: Any) -> list[Any]:
    """The connected functions (weakly connected ones dereferenced)."""
    found = [receiver for _, receiver in signal.receivers]
    return [r() if isinstance(r, weakref.ReferenceType) else r for r in found]


def test_the_app_wires_the_scheduling_features_hooks_once() -> None:
    assert "tasks.schedule.hooks:connect" in EXTENSIONS
    assert BEFORE_START.count(overlap.enter) == 1
    assert overlap._on_postrun in receivers(task_postrun)
    assert last_success._on_success in receivers(task_success)
    # beat takes redbeat's lock from its own tick, not in redbeat's blocking beat_init receiver
    assert acquire_distributed_beat_lock not in receivers(beat_init)


def test_a_before_start_hook_runs_before_every_task_and_is_registered_once() -> None:
    seen: list[tuple[str, str]] = []

    def hook(task: Task, task_id: str) -> None:
        seen.append((task.name, task_id))

    on_before_start(hook)
    on_before_start(hook)
    try:
        deliver.before_start("id-1", (), {})
        assert seen == [("webhooks.deliver", "id-1")]
    finally:
        BEFORE_START.remove(hook)
