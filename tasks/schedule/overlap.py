"""Overlap policy: a periodic run still going when its entry's next slot comes is not joined.

Beat stamps each run with its entry's name and policy (headers, see entries.py). Before a
run starts, the worker takes a Redis lock keyed by the entry; if another run of the same entry
holds it, this run is skipped (state SKIPPED, logged) instead of running twice at once. The
lock's value is the task id, so a redelivered run (same id, after a crash) gets back in, and
only the holder releases it. Its TTL is the task's hard time limit plus a margin: a run whose
process was SIGKILLed cannot block its entry for longer than that.

Entries that allow overlap (``allow_overlap=True``) carry ``conveyor_overlap=allow`` and skip
all of this. Tasks not sent by beat or run-now carry no header and are unaffected.
"""

from __future__ import annotations

from typing import Any

from celery import signals
from celery.exceptions import Ignore
from celery.utils.log import get_task_logger

from core.redis import client as redis_client
from tasks.schedule.entries import ENTRY_HEADER, OVERLAP_HEADER

logger = get_task_logger(__name__)

#: The state of a run skipped because the previous one was still going.
SKIPPED = "SKIPPED"
#: Seconds the lock outlives the task's hard time limit.
LOCK_MARGIN = 60
#: Release only our own lock: compare the holder's task id, then delete.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def lock_key(entry: str) -> str:
    return f"conveyor:schedule:running:{entry}"


def header(request: Any, name: str) -> Any:
    """A custom message header: Celery exposes it on the request and in request.headers."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def guarded_entry(request: Any) -> str | None:
    """The entry whose runs must not overlap, or None when this run is not guarded."""
    entry = header(request, ENTRY_HEADER)
    if not entry or header(request, OVERLAP_HEADER) == "allow":
        return None
    return str(entry)


def enter(task: Any, task_id: str) -> None:
    """Take the entry's lock for this run, or raise Ignore to skip it."""
    entry = guarded_entry(task.request)
    if entry is None:
        return
    limit = task.time_limit or task.app.conf.task_time_limit or 3600
    client = redis_client(task.app.conf.redbeat_redis_url)
    key = lock_key(entry)
    if client.set(key, task_id, nx=True, ex=int(limit) + LOCK_MARGIN):
        return
    holder = client.get(key)
    if holder == task_id:
        return  # our own run, redelivered
    logger.warning(
        "skipping run of schedule entry %s: the previous run %s is still going",
        entry,
        holder or "?",
    )
    # A final state of its own: the run was already stored as STARTED, and Ignore stores
    # nothing, so without this it would look started forever.
    task.update_state(
        task_id=task_id, state=SKIPPED, meta={"entry": entry, "running": holder or None}
    )
    raise Ignore()


def _on_postrun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task is None or task_id is None:
        return
    entry = guarded_entry(task.request)
    if entry is None:
        return
    client = redis_client(task.app.conf.redbeat_redis_url)
    client.eval(_RELEASE, 1, lock_key(entry), task_id)


signals.task_postrun.connect(_on_postrun, weak=False)
