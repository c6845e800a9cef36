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

    view = store.update(
        schedule_app,
        "stored",
        task="tests.sched.record_and_sleep",
        cron="*/5 * * * *",
        kwargs={"seconds": 1},
    )

    assert view.schedule == "cron */5 * * * *"
    assert view.kwargs == {"seconds": 1}
    assert view.args == ["stored"]
    assert view.queue == "batch"
    assert view.reason == "test"
    assert view.source == "runtime"


def test_adding_an_existing_name_needs_replace(schedule_app: Any) -> None:
    store.add(schedule_app, spec())
    with pytest.raises(InvalidEntry, match="exists"):
        store.add(schedule_app, spec(every=60))
    assert store.add(schedule_app, spec(every=60), replace=True).schedule == "every 60s"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"args": ()}, "missing a required argument: 'key'"),
        ({"args": ("a", "b")}, "too many positional arguments"),
        ({"kwargs": {"colour": "red"}}, "unexpected keyword argument 'colour'"),
    ],
)
def test_arguments_the_task_cannot_take_are_refused_before_storing(
    schedule_app: Any, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidEntry, match=message):
        store.add(schedule_app, spec(name="mismatch", **fields))
    with pytest.raises(store.EntryNotFound):
        store.get(schedule_app, "mismatch")


def test_a_period_shorter_than_a_second_is_refused() -> None:
    with pytest.raises(InvalidEntry, match=r"every must be at least 1 second, got 0\.1"):
        spec(every=0.1)


def test_a_cron_entry_lists_its_next_run_at_the_exact_minute(schedule_app: Any) -> None:
    view = store.add(schedule_app, spec(name="nightly", every=None, cron="5 0 * * *"))
    assert view.next_run_at is not None
    assert view.next_run_at.endswith("T00:05:00+00:00"), view.next_run_at


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


def test_arguments_apply_async_would_refuse_are_refused_before_storing(
    schedule_app: Any,
) -> None:
    # Arguments that bind but that no publish would take (over the size limit): every fire
    # would fail, so the entry is refused with apply_async's own reason.
    limit = int(schedule_app.conf.conveyor_max_argument_bytes)
    with pytest.raises(InvalidEntry, match="conveyor_max_argument_bytes"):
        store.add(schedule_app, spec(name="too-large", args=("x" * limit,)))
    with pytest.raises(store.EntryNotFound):
        store.get(schedule_app, "too-large")
