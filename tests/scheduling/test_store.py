"""The runtime schedule store against a private Redis, and code entries across beat restarts."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.schedule import store
from tasks.schedule.entries import ENTRIES, EntrySpec, InvalidEntry
from tasks.schedule.scheduler import ConveyorScheduler

pytestmark = pytest.mark.integration


def spec(**extra: Any) -> EntrySpec:
    fields: dict[str, Any] = {
        "name": "stored",
        "task": "tests.sched.record",
        "every": 30,
        "expires": 30,
        "args": ("stored",),
        "reason": "test",
        **extra,
    }
    return EntrySpec(**fields)


def test_an_entry_can_be_updated_and_keeps_what_was_not_changed(schedule_app: Any) -> None:
    store.add(schedule_app, spec(queue="batch"))

    view = store.update(schedule_app, "stored", cron="*/5 * * * *", kwargs={"k": 1})

    assert view.schedule == "cron */5 * * * *"
    assert view.kwargs == {"k": 1}
    assert view.args == ["stored"]
    assert view.queue == "batch"
    assert view.reason == "test"
    assert view.source == "runtime"


def test_adding_an_existing_name_needs_replace(schedule_app: Any) -> None:
    store.add(schedule_app, spec())
    with pytest.raises(InvalidEntry, match="exists"):
        store.add(schedule_app, spec(every=60))
    assert store.add(schedule_app, spec(every=60), replace=True).schedule == "every 60s"


def test_unknown_names_are_reported_as_such(schedule_app: Any) -> None:
    with pytest.raises(store.EntryNotFound, match="no schedule entry named 'nope'"):
        store.pause(schedule_app, "nope")


def test_code_entries_are_installed_with_their_reason_and_stay_paused_across_beat_restarts(
    schedule_app: Any,
) -> None:
    # Given a beat's scheduler installing the code entries
    builtin = schedule_app.conf.conveyor_beat_builtin_entries
    schedule_app.conf.conveyor_beat_builtin_entries = True
    try:
        ConveyorScheduler(app=schedule_app, lazy=False)
        views = {view.name: view for view in store.list_entries(schedule_app)}
        assert set(views) == {entry.name for entry in ENTRIES}
        assert all(view.source == "code" and view.reason for view in views.values())

        # When an operator pauses one and beat restarts
        store.pause(schedule_app, "queue-health")
        ConveyorScheduler(app=schedule_app, lazy=False)

        # Then it is still paused, and code entries cannot be removed or changed at runtime
        assert store.get(schedule_app, "queue-health").enabled is False
        with pytest.raises(InvalidEntry, match="defined in code"):
            store.remove(schedule_app, "queue-health")
        with pytest.raises(InvalidEntry, match="defined in code"):
            store.update(schedule_app, "queue-health", every=5)
    finally:
        schedule_app.conf.conveyor_beat_builtin_entries = builtin
