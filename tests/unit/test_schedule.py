"""The schedule data, the missed-run rule and the scheduling settings, without a broker."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from celery.schedules import crontab, schedule

from tasks import app
from tasks.schedule.cleanup import CLEANERS, cleaner, run_cleaners
from tasks.schedule.entries import ENTRIES, EntrySpec, InvalidEntry, parse_cron
from tasks.schedule.reports import summarise
from tasks.schedule.scheduler import missed_slot_is_stale
from tests.unit.test_task_registry import EXPECTED_TASKS, route


@pytest.mark.parametrize("spec", ENTRIES, ids=lambda spec: spec.name)
def test_every_shipped_entry_has_an_expiry_a_reason_and_a_registered_scheduled_task(
    spec: EntrySpec,
) -> None:
    assert spec.expires > 0
    assert spec.reason.strip()
    assert spec.task in EXPECTED_TASKS
    assert route(spec.task) == "scheduled"
    # A run still worth doing after its next slot would pile up behind it.
    if spec.every is not None:
        assert spec.expires <= spec.every


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * *", "expected 5 fields"),
        ("61 * * * *", "invalid cron expression"),
        ("* 25 * * *", "invalid cron expression"),
        ("*/0 * * * *", "invalid cron expression"),
        ("a b c d e", "invalid cron expression"),
    ],
)
def test_invalid_cron_expressions_are_rejected_with_the_reason(
    expression: str, message: str
) -> None:
    with pytest.raises(InvalidEntry, match=message):
        parse_cron(expression)


def test_an_entry_needs_exactly_one_of_every_and_cron() -> None:
    with pytest.raises(InvalidEntry, match="exactly one"):
        EntrySpec(name="x", task="t", reason="r", expires=1)
    with pytest.raises(InvalidEntry, match="exactly one"):
        EntrySpec(name="x", task="t", reason="r", expires=1, every=5, cron="* * * * *")


def test_entries_carry_their_expiry_and_overlap_policy_to_the_message() -> None:
    spec = EntrySpec(name="n", task="t", reason="r", expires=7, every=5)
    options = spec.beat_entry()["options"]
    assert options["expires"] == 7
    assert options["headers"] == {"conveyor_schedule": "n", "conveyor_overlap": "skip"}
    allowed = EntrySpec(name="n", task="t", reason="r", expires=7, every=5, allow_overlap=True)
    assert allowed.options()["headers"]["conveyor_overlap"] == "allow"


NOW = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC)


def fixed(schedule_: schedule) -> schedule:
    schedule_.nowfun = lambda: NOW
    return schedule_


def test_an_interval_entry_late_by_less_than_its_expiry_still_runs() -> None:
    every_minute = fixed(schedule(timedelta(minutes=1)))
    last = NOW - timedelta(minutes=1, seconds=30)  # due 30 s ago
    assert not missed_slot_is_stale(every_minute, last, NOW, expires=45)
    assert missed_slot_is_stale(every_minute, last, NOW, expires=20)


def test_an_entry_not_yet_due_is_never_stale() -> None:
    every_minute = fixed(schedule(timedelta(minutes=1)))
    assert not missed_slot_is_stale(every_minute, NOW - timedelta(seconds=10), NOW, expires=1)


def test_a_crontab_entry_counts_from_its_most_recent_missed_slot() -> None:
    # Given a daily 06:00 entry last run two days ago, now 12:00
    daily = fixed(crontab(minute=0, hour=6))
    last = NOW - timedelta(days=2)
    # Today's 06:00 slot is 6 h old: worth running with an 8 h expiry, stale with 1 h
    assert not missed_slot_is_stale(daily, last, NOW, expires=8 * 3600)
    assert missed_slot_is_stale(daily, last, NOW, expires=3600)


def test_the_daily_summary_counts_only_the_given_day_by_task_and_state() -> None:
    results = [
        {"name": "a", "status": "SUCCESS", "date_done": "2026-03-09T10:00:00+00:00"},
        {"name": "a", "status": "SUCCESS", "date_done": "2026-03-09T23:59:00"},
        {"name": "a", "status": "FAILURE", "date_done": "2026-03-09T01:00:00+00:00"},
        {"name": "b", "status": "SUCCESS", "date_done": "2026-03-10T00:00:01+00:00"},
        {"name": "c", "status": "PENDING"},
    ]
    report = summarise(results, date(2026, 3, 9), UTC)
    assert report == {
        "day": "2026-03-09",
        "total": 3,
        "by_task": {"a": {"FAILURE": 1, "SUCCESS": 2}},
    }


def test_a_failing_cleaner_does_not_stop_the_others() -> None:
    calls: list[str] = []
    saved = dict(CLEANERS)

    @cleaner("test-broken")
    def broken(app_, budget):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    @cleaner("test-working")
    def working(app_, budget):  # type: ignore[no-untyped-def]
        calls.append("ran")
        return 3

    try:
        only = {name: CLEANERS[name] for name in ("test-broken", "test-working")}
        CLEANERS.clear()
        CLEANERS.update(only)
        assert run_cleaners(app) == {"test-broken": -1, "test-working": 3}
        assert calls == ["ran"]
    finally:
        CLEANERS.clear()
        CLEANERS.update(saved)


def test_a_dead_beat_is_replaced_within_30_seconds_by_configuration() -> None:
    conf = app.conf
    assert conf.beat_scheduler == "tasks.schedule.scheduler:ConveyorScheduler"
    assert conf.redbeat_lock_timeout + conf.beat_max_loop_interval <= 30
    # The lock must outlive several ticks of the active beat, or it would lose it while alive.
    assert conf.redbeat_lock_timeout >= 3 * conf.beat_max_loop_interval
    assert "redbeat_redis_url" in conf
    assert "redbeat_redis_options" in conf
