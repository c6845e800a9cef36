"""Periodic entries on real beat and worker processes, a private RabbitMQ and Redis."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from typing import Any

import pytest

from tasks.schedule import store
from tasks.schedule.entries import EntrySpec
from tasks.schedule.queue_health import LATEST_KEY, schedule_redis
from tests.infra import wait_for
from tests.scheduling.conftest import ACTIVE_LINE, STANDBY_LINE, Scheduling, celery_cli

pytestmark = pytest.mark.integration


def record_every(name: str, seconds: float, **extra: Any) -> EntrySpec:
    fields: dict[str, Any] = {"expires": 10, "reason": "test", **extra}
    return EntrySpec(name=name, task="tests.sched.record", every=seconds, args=(name,), **fields)


def test_an_interval_entry_fires_at_its_cadence(sched: Scheduling) -> None:
    store.add(sched.app, record_every("cadence", 2))
    sched.beat("beat-a")

    found = sched.wait_for_runs("cadence", 5, timeout=40)

    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(found)]
    assert all(1.5 < gap < 2.8 for gap in gaps), gaps


def test_two_beats_fire_each_slot_once_and_a_killed_beat_is_replaced_within_the_bound(
    sched: Scheduling, record_property: Any
) -> None:
    # F14. Given two beats and a 2 s entry
    store.add(sched.app, record_every("pair", 2))
    first = sched.beat("beat-1")
    second = sched.beat("beat-2")
    sched.wait_for_runs("pair", 4, timeout=40)
    assert [first.is_active(), second.is_active()].count(True) == 1

    # When the active beat is killed without releasing its lock
    active, standby = (first, second) if first.is_active() else (second, first)
    active.kill()
    killed_at = time.time()
    before = len(sched.runs("pair"))

    # Then the standby takes the lock within the documented bound (20 s lock + 5 s retry),
    # and fires the entry by its next slot (the missed one is older than its expiry: skipped)
    found = sched.wait_for_runs("pair", before + 1, timeout=40)
    wait_for(standby.is_active, 5, what="the standby to log its takeover")
    takeover = standby.became_active_at() - killed_at
    record_property("takeover_seconds", round(takeover, 2))
    record_property("first_run_after_kill_seconds", round(found[before]["at"] - killed_at, 2))
    assert takeover <= 25 + 2, f"takeover took {takeover:.1f}s"
    assert found[before]["at"] - killed_at <= takeover + 2 + 1.5

    # And with the killed beat restarted as a standby, every slot still ran exactly once
    restarted = sched.beat("beat-1b")
    sched.wait_for_runs("pair", before + 4, timeout=30)
    assert not restarted.is_active()
    slots = sched.ledger.hgetall("slots:pair")
    assert len(slots) >= before + 4
    assert {count for count in slots.values()} == {"1"}, slots


def test_runtime_add_pause_resume_and_remove_take_effect_without_a_restart(
    sched: Scheduling,
) -> None:
    # Given a running beat with no entries
    sched.beat("beat-rt")
    time.sleep(2)

    # add: runs start
    store.add(sched.app, record_every("edited", 1))
    sched.wait_for_runs("edited", 2, timeout=20)

    # pause: no run while paused (one already sent may still land)
    store.pause(sched.app, "edited")
    time.sleep(1.5)
    paused_count = len(sched.runs("edited"))
    time.sleep(4)
    assert len(sched.runs("edited")) == paused_count
    assert store.get(sched.app, "edited").enabled is False

    # resume: runs again
    store.resume(sched.app, "edited")
    sched.wait_for_runs("edited", paused_count + 2, timeout=20)

    # remove: stops for good
    store.remove(sched.app, "edited")
    time.sleep(1.5)
    removed_count = len(sched.runs("edited"))
    time.sleep(4)
    assert len(sched.runs("edited")) == removed_count
    assert [view.name for view in store.list_entries(sched.app)] == []


def cli(app: Any, *args: str, broker_url: str) -> subprocess.CompletedProcess[str]:
    """`celery -A tasks schedule ...` against this test's broker and schedule."""
    env = {
        "CELERY_BROKER_URL": broker_url,
        "CELERY_RESULT_BACKEND": app.conf.redbeat_redis_url,
        "CONVEYOR_SCHEDULE_REDIS_URL": app.conf.redbeat_redis_url,
        "CELERY_REDBEAT_KEY_PREFIX": app.conf.redbeat_key_prefix,
    }
    return celery_cli("schedule", *args, env=env)


def test_schedule_add_from_the_command_line_takes_effect_on_a_running_system(
    sched: Scheduling,
) -> None:
    # Given a running beat and worker, and no queue-health snapshot yet
    sched.beat("beat-cli")
    client = schedule_redis(sched.app)
    client.delete(LATEST_KEY)

    # When an operator adds the real queue-health job every 2 s
    added_at = time.time()
    done = cli(
        sched.app,
        *("add", "health-now", "schedule.queue_health", "--every", "2", "--json"),
        broker_url=sched.broker_url,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["task"] == "schedule.queue_health"

    # Then it runs, recording every queue and the dead-letter count
    raw = wait_for(lambda: client.get(LATEST_KEY), 30, what="a queue-health snapshot")
    snapshot = json.loads(raw)
    assert snapshot["at"] > added_at
    assert set(snapshot["queues"]) >= {"default", "batch", "scheduled", "priority"}
    assert snapshot["dead_letters"] is not None

    def listed() -> list[dict[str, Any]]:
        done = cli(sched.app, "list", "--json", broker_url=sched.broker_url)
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout))

    assert [(e["name"], e["enabled"]) for e in listed()] == [("health-now", True)]
    assert cli(sched.app, "pause", "health-now", broker_url=sched.broker_url).returncode == 0
    assert [(e["name"], e["enabled"]) for e in listed()] == [("health-now", False)]
    ran = cli(sched.app, "run-now", "health-now", "--json", broker_url=sched.broker_url)
    assert ran.returncode == 0, ran.stderr
    assert sched.app.AsyncResult(json.loads(ran.stdout)["task_id"]).get(timeout=30)["queues"]
    assert cli(sched.app, "remove", "health-now", broker_url=sched.broker_url).returncode == 0
    assert listed() == []


def test_both_the_active_and_a_standby_beat_answer_the_healthcheck_ping(
    sched: Scheduling,
) -> None:
    first, second = sched.beat("beat-ping-1"), sched.beat("beat-ping-2")
    wait_for(lambda: first.is_active() or second.is_active(), 20, what="an active beat")

    for beat in (first, second):
        # compose.yaml's healthcheck command, with this beat's node name
        done = celery_cli(
            *("inspect", "ping", "--destination", beat.node, "--timeout", "10"),
            env={"CELERY_BROKER_URL": sched.broker_url},
        )
        assert done.returncode == 0, done.stderr
        assert "pong" in done.stdout


def test_a_second_beat_on_the_same_host_waits_quietly_and_takes_over(
    sched: Scheduling,
) -> None:
    # Given an active beat, and a second one on the same host (the same celerybeat@ node)
    node = f"celerybeat-samehost-{os.getpid()}@localhost"
    first = sched.beat("samehost-1", node=node)
    wait_for(first.is_active, 20, what="the first beat to take the lock")
    second = sched.beat("samehost-2", node=node)

    # When it has stood by for several lock attempts and remote-control retries (5 s each)
    wait_for(lambda: STANDBY_LINE in second.log(), 20, what="the standby line")
    time.sleep(11)

    # Then it logged one line, and no traceback
    waiting = second.log().split("beat: Starting...", 1)[1].strip().splitlines()
    assert len(waiting) == 1 and STANDBY_LINE in waiting[0], waiting

    # And when the active beat stops, it logs one line as it takes over, and answers ping
    first.stop()
    wait_for(second.is_active, 30, what="the standby to take over")
    done = celery_cli(
        *("inspect", "ping", "--destination", node, "--timeout", "10"),
        env={"CELERY_BROKER_URL": sched.broker_url},
    )
    assert done.returncode == 0, done.stderr
    after = second.log().split("beat: Starting...", 1)[1].strip().splitlines()
    assert len(after) == 2 and ACTIVE_LINE in after[1], after


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cron", "61 * * * *"], "invalid cron expression"),
        (["--cron", "* * *"], "expected 5 fields"),
        (["--every", "5", "--queue", "nowhere"], "unknown queue 'nowhere'"),
        (["--every", "5", "--kwargs", "[1]"], "must be a JSON dict"),
        (["--every", "0.1"], "every must be at least 1 second, got 0.1"),
        (["--every", "5", "--args", "[1]"], "arguments do not match schedule.queue_health()"),
    ],
)
def test_the_command_line_rejects_bad_entries_clearly(
    schedule_app: Any, broker_url: str, args: list[str], message: str
) -> None:
    done = cli(schedule_app, "add", "bad", "schedule.queue_health", *args, broker_url=broker_url)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert store.list_entries(schedule_app) == []


def test_the_command_line_rejects_an_unknown_task_name(schedule_app: Any, broker_url: str) -> None:
    done = cli(
        schedule_app, "add", "bad", "schedule.no_such", "--every", "5", broker_url=broker_url
    )
    assert done.returncode == 2
    assert "unknown task 'schedule.no_such'" in done.stderr


def test_cancel_says_not_found_for_an_unknown_id_and_cancels_a_waiting_job(
    sched: Scheduling,
) -> None:
    from tests.scheduling import tasks as sched_tasks

    unknown = cli(sched.app, "cancel", "not-a-task-id", "--json", broker_url=sched.broker_url)
    assert unknown.returncode == 1
    assert "not found" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    assert unknown.stdout == ""

    waiting = sched_tasks.record.apply_async(("never",), countdown=3600)
    done = cli(sched.app, "cancel", waiting.id, "--json", broker_url=sched.broker_url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"task_id": waiting.id, "cancelled": True}


@pytest.mark.slow
def test_two_beats_running_for_a_minute_run_each_two_second_slot_exactly_once(
    sched: Scheduling,
) -> None:
    # Acceptance: two beats, a 2 s schedule, a minute
    store.add(sched.app, record_every("minute", 2))
    sched.beat("beat-m1")
    sched.beat("beat-m2")
    time.sleep(60)
    store.pause(sched.app, "minute")
    time.sleep(3)  # let the last sent run land

    found = sched.runs("minute")
    slots = sched.ledger.hgetall("slots:minute")
    assert len(found) >= 28, len(found)
    assert len(found) == len(slots)
    assert set(slots.values()) == {"1"}, slots
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(found)]
    assert all(1.5 < gap < 2.8 for gap in gaps), gaps


@pytest.mark.slow
def test_two_beats_with_the_active_one_killed_and_restarted_twice_never_fire_a_slot_twice(
    sched: Scheduling, record_property: Any
) -> None:
    # F14, full size. Given two beats and a 2 s entry
    store.add(sched.app, record_every("killed", 2))
    beats = [sched.beat("beat-k1"), sched.beat("beat-k2")]
    sched.wait_for_runs("killed", 5, timeout=40)
    takeovers = []
    for cycle in range(2):
        # When the active beat is killed with kill -9 (its lock is not released) ...
        active = next(beat for beat in beats if beat.is_active())
        standby = next(beat for beat in beats if beat is not active)
        active.kill()
        killed_at = time.time()
        before = len(sched.runs("killed"))
        # ... the standby takes over and fires again ...
        sched.wait_for_runs("killed", before + 1, timeout=40)
        wait_for(standby.is_active, 5, what="the standby to log its takeover")
        takeovers.append(standby.became_active_at() - killed_at)
        # ... and the killed beat is started again, as the standby for the next kill
        restarted = sched.beat(f"beat-k{cycle + 3}")
        beats = [standby, restarted]
        sched.wait_for_runs("killed", before + 6, timeout=30)
        assert not restarted.is_active()
    store.pause(sched.app, "killed")
    time.sleep(3)  # let the last sent run land
    record_property("takeover_seconds", [round(t, 2) for t in takeovers])

    # Then no slot ran twice and every run carried its slot; each takeover stayed within the
    # lock bound (20 s lock + 5 s retry), and the slots inside it were skipped, not caught up
    # in a burst (they are older than the entry's 10 s expiry): the cadence held elsewhere.
    found = sched.runs("killed")
    slots = sched.ledger.hgetall("slots:killed")
    assert len(found) == len(slots), (len(found), len(slots))
    assert set(slots.values()) == {"1"}, slots
    assert all(t <= 25 + 2 for t in takeovers), takeovers
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(found)]
    long_gaps = [gap for gap in gaps if gap >= 2.8]
    assert len(long_gaps) <= len(takeovers), gaps
    # From the last run before the kill (at most one period before it) to the first slot
    # after the takeover (at most one period after it).
    assert all(gap <= 2 + 25 + 2 + 2 + 1.5 for gap in long_gaps), gaps
    assert all(gap > 1.5 for gap in gaps), gaps


def test_each_entrys_last_success_and_interval_are_exported(sched: Scheduling) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from monitoring import schedule as monitoring
    from tasks.schedule.last_success import LAST_SUCCESS_KEY

    # Given an entry that has run successfully through beat and a worker
    sched.app.backend.client.hdel(LAST_SUCCESS_KEY, "exported")
    sched.beat("beat-metrics")
    store.add(sched.app, record_every("exported", 1))
    sched.wait_for_runs("exported", 2, timeout=20)
    started = time.time()

    # Then the exporter's collector shows its last success and its interval
    registry = CollectorRegistry()
    registry.register(monitoring.collector(sched.app))
    samples = {
        (metric.name, sample.labels.get("entry")): sample.value
        for metric in registry.collect()
        for sample in metric.samples
    }
    assert samples[("conveyor_schedule_interval_seconds", "exported")] == 1.0
    assert samples[("conveyor_schedule_enabled", "exported")] == 1.0
    last = samples[("conveyor_schedule_last_success_timestamp_seconds", "exported")]
    assert started - 5 < last <= time.time()
    title, rows = monitoring.overview_section(sched.app)
    assert title == "schedules"
    assert [row["entry"] for row in rows] == ["exported"]
    assert "conveyor_schedule_last_success" in generate_latest(registry).decode()
