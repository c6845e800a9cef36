"""Runtime schedule editing: entries in Redis that a running beat picks up on its next tick.

The same functions back ``celery -A tasks schedule ...``. Entries live where celery-redbeat
keeps them (``redbeat_redis_url``), so they survive beat, worker and Redis restarts (with
Redis persistence). Entries defined in code (tasks/schedule/entries.py) can be paused,
resumed and run now, but changed or removed only in code.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from celery import Celery
from redbeat.schedulers import RedBeatSchedulerEntry, ensure_conf, get_redis

from core.clock import iso
from tasks.base import InvalidArguments, check_publishable
from tasks.schedule.entries import ENTRIES, EntrySpec, InvalidEntry
from tasks.schedule.scheduler import CONVEYOR_FIELD, entry_metadata

CODE_ENTRIES = frozenset(spec.name for spec in ENTRIES)


class EntryNotFound(KeyError):
    """No schedule entry has this name."""

    def __str__(self) -> str:
        return f"no schedule entry named {self.args[0]!r}"


@dataclass(frozen=True)
class EntryView:
    """One entry as stored, for listing."""

    name: str
    task: str
    schedule: str
    enabled: bool
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str | None
    expires: float | None
    allow_overlap: bool
    reason: str
    source: str
    last_run_at: str | None
    next_run_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate(app: Celery, spec: EntrySpec) -> None:
    """Reject what a worker could not run: unknown task names and undeclared queues."""
    app.loader.import_default_modules()
    if spec.task not in app.tasks:
        known = sorted(name for name in app.tasks if not name.startswith("celery."))
        raise InvalidEntry(f"unknown task {spec.task!r}; registered tasks: {', '.join(known)}")
    if spec.queue is not None:
        declared = {queue.name for queue in app.conf.task_queues}
        if spec.queue not in declared:
            raise InvalidEntry(
                f"unknown queue {spec.queue!r}; declared queues: {', '.join(sorted(declared))}"
            )
    _check_arguments(app.tasks[spec.task], spec)


def _check_arguments(task: Any, spec: EntrySpec) -> None:
    """Refuse arguments every run would fail on, once here instead of at every fire: the
    checks apply_async makes before a publish (tasks.base.check_publishable: the signature,
    JSON, the size limit, the task's own validate_arguments)."""
    # The signature first, in inspect's words: they name the parameters as the task's author
    # wrote them, where Celery's check counts a bound task's `self` ("takes 2 positional
    # arguments but 3 were given" for one argument too many). task.run is the function as the
    # worker calls it.
    signature = inspect.signature(task.run)
    try:
        signature.bind(*spec.args, **spec.kwargs)
    except TypeError as exc:
        raise InvalidEntry(f"arguments do not match {spec.task}{signature}: {exc}") from None
    try:
        check_publishable(task, list(spec.args), dict(spec.kwargs))
    except InvalidArguments as exc:
        raise InvalidEntry(str(exc)) from None


def _key(app: Celery, name: str) -> str:
    ensure_conf(app)
    return str(RedBeatSchedulerEntry.generate_key(app, name))


def load_entry(app: Celery, name: str) -> RedBeatSchedulerEntry:
    try:
        return RedBeatSchedulerEntry.from_key(_key(app, name), app=app)
    except KeyError:
        raise EntryNotFound(name) from None


def _exists(app: Celery, name: str) -> bool:
    return bool(get_redis(app).hexists(_key(app, name), "definition"))


def _refuse_code_entry(name: str, action: str) -> None:
    if name in CODE_ENTRIES:
        raise InvalidEntry(
            f"{name!r} is defined in code (tasks/schedule/entries.py); {action} it there, "
            "or pause it here"
        )


def add(app: Celery, spec: EntrySpec, *, replace: bool = False) -> EntryView:
    """Store a new entry (or replace one with replace=True); its first run is one period away."""
    validate(app, spec)
    _refuse_code_entry(spec.name, "change")
    if _exists(app, spec.name) and not replace:
        raise InvalidEntry(f"an entry named {spec.name!r} exists; use replace to change it")
    entry = RedBeatSchedulerEntry(
        name=spec.name,
        task=spec.task,
        schedule=spec.schedule(),
        args=list(spec.args),
        kwargs=dict(spec.kwargs),
        options=spec.options(),
        app=app,
    )
    # A new or changed entry counts from now: no immediate run, no catch-up of old slots.
    entry.last_run_at = app.now()
    with get_redis(app).pipeline() as pipe:
        pipe.delete(entry.key)
        pipe.execute()
    entry.save()
    get_redis(app).hset(
        entry.key, CONVEYOR_FIELD, json.dumps(entry_metadata(spec, source="runtime"))
    )
    return get(app, spec.name)


def update(app: Celery, name: str, **changes: Any) -> EntryView:
    """Change some fields of a runtime entry (task, every, cron, args, kwargs, ...)."""
    current = spec_of(app, name)
    if "every" in changes and "cron" not in changes:
        changes["cron"] = None
    if "cron" in changes and "every" not in changes:
        changes["every"] = None
    fields = {**asdict(current), **changes}
    fields["args"] = tuple(fields["args"])
    return add(app, EntrySpec(**fields), replace=True)


def spec_of(app: Celery, name: str) -> EntrySpec:
    view = get(app, name)
    meta = _metadata(app, name)
    return EntrySpec(
        name=view.name,
        task=view.task,
        reason=view.reason,
        expires=float(view.expires if view.expires is not None else meta["expires"]),
        every=meta.get("every"),
        cron=meta.get("cron"),
        args=tuple(view.args),
        kwargs=view.kwargs,
        queue=view.queue,
        allow_overlap=view.allow_overlap,
    )


def _set_enabled(app: Celery, name: str, enabled: bool) -> EntryView:
    entry = load_entry(app, name)
    entry.enabled = enabled
    entry.save()
    if enabled:
        # Counting from the resume, not from before the pause: no stale catch-up run.
        entry.reschedule(last_run_at=app.now())
    return get(app, name)


def pause(app: Celery, name: str) -> EntryView:
    """Stop firing an entry until resume(); the pause survives beat restarts."""
    return _set_enabled(app, name, False)


def resume(app: Celery, name: str) -> EntryView:
    """Fire a paused entry again, one period after now."""
    return _set_enabled(app, name, True)


def remove(app: Celery, name: str) -> None:
    """Delete a runtime entry; beat stops firing it at its next tick."""
    _refuse_code_entry(name, "remove")
    entry = load_entry(app, name)
    entry.delete()


def run_now(app: Celery, name: str) -> str:
    """Publish one run of the entry now, outside its schedule; returns the task id."""
    entry = load_entry(app, name)
    options = dict(entry.options)
    options["headers"] = {**options.get("headers", {})}
    result = app.send_task(entry.task, args=entry.args, kwargs=entry.kwargs, **options)
    return str(result.id)


def _metadata(app: Celery, name: str) -> dict[str, Any]:
    raw = get_redis(app).hget(_key(app, name), CONVEYOR_FIELD)
    return dict(json.loads(raw)) if raw else {}


def get(app: Celery, name: str) -> EntryView:
    entry = load_entry(app, name)
    meta = _metadata(app, name)
    headers = entry.options.get("headers") or {}
    next_run = None
    if entry.enabled and entry.last_run_at is not None:
        next_run = app.now() + entry.schedule.remaining_estimate(entry.last_run_at)
        # The schedule reads the clock again inside remaining_estimate: without rounding off
        # the microseconds between the two reads, 00:05:00 would show as 00:04:59.
        next_run = (next_run + timedelta(milliseconds=500)).replace(microsecond=0)
    return EntryView(
        name=entry.name,
        task=entry.task,
        schedule=f"every {meta['every']:g}s" if meta.get("every") else f"cron {meta.get('cron')}",
        enabled=bool(entry.enabled),
        args=list(entry.args or []),
        kwargs=dict(entry.kwargs or {}),
        queue=entry.options.get("queue"),
        expires=entry.options.get("expires"),
        allow_overlap=headers.get("conveyor_overlap") == "allow",
        reason=str(meta.get("reason", "")),
        source=str(meta.get("source", "unknown")),
        last_run_at=iso(entry.last_run_at, timespec="seconds"),
        next_run_at=iso(next_run, timespec="seconds"),
    )


def list_entries(app: Celery) -> list[EntryView]:
    """Every stored entry, by name."""
    conf = ensure_conf(app)
    keys = get_redis(app).zrange(conf.schedule_key, 0, -1)
    names = sorted(key[len(conf.key_prefix) :] for key in keys)
    views = []
    for name in names:
        try:
            views.append(get(app, name))
        except EntryNotFound:
            continue  # removed between the two reads
    return views
