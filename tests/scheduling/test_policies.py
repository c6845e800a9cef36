"""The overlap and missed-run policies, on real beat and worker processes."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest
import redis

from tasks.schedule import store
from tasks.schedule.entries import EntrySpec
from tests.infra import wait_for
from tests.scheduling.conftest import Scheduling

pytestmark = pytest.mark.integration


def intervals(sched: Scheduling, key: str) -> list[tuple[float, float]]:
    """(start, end) of each finished run, paired by task id."""
    starts = {row["id"]: row["at"] for row in sched.runs(key, "start")}
    ends = {row["id"]: row["at"] for row in sched.runs(key, "end")}
    return sorted((starts[task_id], end) for task_id, end in ends.items())


def overlapping(spans: list[tuple[float, float]]) -> int:
    return sum(1 for (_, end), (start, _) in itertools.pairwise(spans) if start < end)


def stored_results(app: Any) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(app.conf.result_backend)
    return [json.loads(client.get(key) or "{}") for key in client.scan_iter("celery-task-meta-*")]


def slow_entry(name: str, allow_overlap: bool) -> EntrySpec:
    # A 3 s job every second: its next slots come while it still runs.
    return EntrySpec(
        name=name,
        task="tests.sched.record_and_sleep",
        every=1,
        expires=10,
        args=(name, 3),
        allow_overlap=allow_overlap,
        reason="test",
    )


def test_a_run_still_going_at_its_next_slot_is_not_run_twice_at_once(sched: Scheduling) -> None:
    # Given a 3 s job scheduled every second, on a worker with two processes
    store.add(sched.app, slow_entry("no-overlap", allow_overlap=False))
    sched.beat("beat-ov")

    # When it has been running for a while
    wait_for(lambda: len(intervals(sched, "no-overlap")) >= 2, 40, what="two finished runs")
    store.pause(sched.app, "no-overlap")

    # Then no two runs overlapped, and the slots that came mid-run were skipped
    spans = intervals(sched, "no-overlap")
    assert overlapping(spans) == 0, spans
    assert "skipping run of schedule entry no-overlap" in sched.worker.log()
    skipped = [
        meta
        for meta in stored_results(sched.app)
        if meta.get("status") == "SKIPPED" and meta["result"]["entry"] == "no-overlap"
    ]
    assert skipped, "a skipped run is stored as SKIPPED"


def test_an_entry_that_allows_overlap_runs_at_every_slot(sched: Scheduling) -> None:
    store.add(sched.app, slow_entry("overlap-ok", allow_overlap=True))
    sched.beat("beat-ok")

    wait_for(lambda: len(intervals(sched, "overlap-ok")) >= 2, 40, what="two finished runs")
    store.pause(sched.app, "overlap-ok")

    assert overlapping(intervals(sched, "overlap-ok")) >= 1


def test_after_beat_downtime_a_missed_slot_runs_once_within_its_expiry_and_is_skipped_after(
    sched: Scheduling,
) -> None:
    # Given two 2 s entries: one whose runs stay worth doing for 60 s, one for 1 s only
    for name, expires in (("keeps", 60), ("goes-stale", 1)):
        store.add(
            sched.app,
            EntrySpec(
                name=name,
                task="tests.sched.record",
                every=2,
                expires=expires,
                args=(name,),
                reason="test",
            ),
        )
    beat = sched.beat("beat-down")
    sched.wait_for_runs("keeps", 1, timeout=30)
    sched.wait_for_runs("goes-stale", 1, timeout=30)

    # When beat is down for 7 s (three slots missed)
    beat.stop()
    time.sleep(7)
    up_at = time.time()
    restarted = sched.beat("beat-up")
    time.sleep(4)

    def between(key: str, start: float, end: float) -> list[dict[str, Any]]:
        return [row for row in sched.runs(key) if start <= row["at"] < end]

    # Then the entry within its expiry ran once on recovery (no burst of the missed slots) ...
    recovered_at = min(row["at"] for row in between("keeps", up_at, up_at + 60))
    assert len(between("keeps", up_at, recovered_at + 1.5)) == 1
    # ... and the stale one skipped its missed slots and resumes one period later
    assert between("goes-stale", up_at, recovered_at + 1.5) == []
    assert "skipping missed run of goes-stale" in restarted.log()
    assert len(between("goes-stale", recovered_at + 1.5, recovered_at + 3)) == 1
