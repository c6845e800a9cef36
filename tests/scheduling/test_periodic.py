"""Periodic entries on real beat and worker processes, a private RabbitMQ and Redis."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.schedule import store
from tasks.schedule.entries import EntrySpec
from tests.infra import ROOT, WorkerProcess, wait_for
from tests.scheduling.conftest import BeatProcess, new_beat, runs, wait_for_runs

pytestmark = pytest.mark.integration


def record_every(name: str, seconds: float, **extra: Any) -> EntrySpec:
    fields: dict[str, Any] = {"expires": 10, "reason": "test", **extra}
    return EntrySpec(name=name, task="tests.sched.record", every=seconds, args=(name,), **fields)


def start_beat(
    beats: list[BeatProcess], tmp_path: Path, app: Any, broker_url: str, redis_url: str, name: str
) -> BeatProcess:
    beat = new_beat(tmp_path, app, broker_url, redis_url, name).start()
    beats.append(beat)
    return beat


def test_an_interval_entry_fires_at_its_cadence(
    sched_worker: WorkerProcess,
    schedule_app: Any,
    beats: list[BeatProcess],
    ledger: redis.Redis,
    tmp_path: Path,
    broker_url: str,
    redis_url: str,
) -> None:
    store.add(schedule_app, record_every("cadence", 2))
    start_beat(beats, tmp_path, schedule_app, broker_url, redis_url, "beat-a")

    found = wait_for_runs(ledger, "cadence", 5, timeout=40)

    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(found)]
    assert all(1.5 < gap < 2.8 for gap in gaps), gaps


def test_two_beats_fire_each_slot_once_and_a_killed_beat_is_replaced_within_the_bound(
    sched_worker: WorkerProcess,
    schedule_app: Any,
    beats: list[BeatProcess],
    ledger: redis.Redis,
    tmp_path: Path,
    broker_url: str,
    redis_url: str,
) -> None:
    # F14. Given two beats and a 2 s entry
    store.add(schedule_app, record_every("pair", 2))
    first = start_beat(beats, tmp_path, schedule_app, broker_url, redis_url, "beat-1")
    second = start_beat(beats, tmp_path, schedule_app, broker_url, redis_url, "beat-2")
    wait_for_runs(ledger, "pair", 4, timeout=40)
    assert [first.is_active(), second.is_active()].count(True) == 1

    # When the active beat is killed without releasing its lock
    active, standby = (first, second) if first.is_active() else (second, first)
    active.kill()
    killed_at = time.time()
    before = len(runs(ledger, "pair"))

    # Then the standby fires the entry within the documented bound (20 s lock + 5 s poll)
    found = wait_for_runs(ledger, "pair", before + 1, timeout=40)
    handover = found[before]["at"] - killed_at
    assert handover <= 30, f"handover took {handover:.1f}s"
    assert standby.is_active()

    # And with the killed beat restarted as a standby, every slot still ran exactly once
    restarted = start_beat(beats, tmp_path, schedule_app, broker_url, redis_url, "beat-1b")
    wait_for_runs(ledger, "pair", before + 4, timeout=30)
    assert not restarted.is_active()
    slots = ledger.hgetall("slots:pair")
    assert len(slots) >= before + 4
    assert {count for count in slots.values()} == {"1"}, slots


def test_runtime_add_pause_resume_and_remove_take_effect_without_a_restart(
    sched_worker: WorkerProcess,
    schedule_app: Any,
    beats: list[BeatProcess],
    ledger: redis.Redis,
    tmp_path: Path,
    broker_url: str,
    redis_url: str,
) -> None:
    # Given a running beat with no entries
    start_beat(beats, tmp_path, schedule_app, broker_url, redis_url, "beat-rt")
    time.sleep(2)

    # add: runs start
    store.add(schedule_app, record_every("edited", 1))
    wait_for_runs(ledger, "edited", 2, timeout=20)

    # pause: no run while paused (one already sent may still land)
    store.pause(schedule_app, "edited")
    time.sleep(1.5)
    paused_count = len(runs(ledger, "edited"))
    time.sleep(4)
    assert len(runs(ledger, "edited")) == paused_count
    assert store.get(schedule_app, "edited").enabled is False

    # resume: runs again
    store.resume(schedule_app, "edited")
    wait_for_runs(ledger, "edited", paused_count + 2, timeout=20)

    # remove: stops for good
    store.remove(schedule_app, "edited")
    time.sleep(1.5)
    removed_count = len(runs(ledger, "edited"))
    time.sleep(4)
    assert len(runs(ledger, "edited")) == removed_count
    assert [view.name for view in store.list_entries(schedule_app)] == []


def cli(app: Any, *args: str, broker_url: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker_url,
        "CELERY_RESULT_BACKEND": app.conf.redbeat_redis_url,
        "CONVEYOR_SCHEDULE_REDIS_URL": app.conf.redbeat_redis_url,
        "CELERY_REDBEAT_KEY_PREFIX": app.conf.redbeat_key_prefix,
    }
    celery = str(Path(sys.executable).with_name("celery"))
    return subprocess.run(
        [celery, "-A", "tasks", "schedule", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_schedule_add_from_the_command_line_takes_effect_on_a_running_system(
    sched_worker: WorkerProcess,
    schedule_app: Any,
    beats: list[BeatProcess],
    tmp_path: Path,
    broker_url: str,
    redis_url: str,
) -> None:
    import json

    from tasks.schedule.queue_health import LATEST_KEY, schedule_redis

    start_beat(beats, tmp_path, schedule_app, broker_url, redis_url, "beat-cli")
    client = schedule_redis(schedule_app)
    client.delete(LATEST_KEY)

    added_at = time.time()
    done = cli(
        schedule_app,
        "add",
        "health-now",
        "schedule.queue_health",
        "--every",
        "2",
        "--json",
        broker_url=broker_url,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["task"] == "schedule.queue_health"

    # The real queue-health job runs and records every queue and the dead-letter count
    raw = wait_for(lambda: client.get(LATEST_KEY), 30, what="a queue-health snapshot")
    snapshot = json.loads(raw)
    assert snapshot["at"] > added_at
    assert set(snapshot["queues"]) >= {"default", "batch", "scheduled", "priority"}
    assert snapshot["dead_letters"] is not None

    listed = json.loads(cli(schedule_app, "list", "--json", broker_url=broker_url).stdout)
    assert [entry["name"] for entry in listed] == ["health-now"]
    assert cli(schedule_app, "pause", "health-now", broker_url=broker_url).returncode == 0
    assert cli(schedule_app, "remove", "health-now", broker_url=broker_url).returncode == 0
    assert json.loads(cli(schedule_app, "list", "--json", broker_url=broker_url).stdout) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cron", "61 * * * *"], "invalid cron expression"),
        (["--cron", "* * *"], "expected 5 fields"),
        (["--every", "5", "--queue", "nowhere"], "unknown queue 'nowhere'"),
    ],
)
def test_the_command_line_rejects_bad_entries_clearly(
    schedule_app: Any, broker_url: str, args: list[str], message: str
) -> None:
    done = cli(schedule_app, "add", "bad", "schedule.queue_health", *args, broker_url=broker_url)
    assert done.returncode == 1
    assert message in done.stderr


def test_the_command_line_rejects_an_unknown_task_name(schedule_app: Any, broker_url: str) -> None:
    done = cli(
        schedule_app, "add", "bad", "schedule.no_such", "--every", "5", broker_url=broker_url
    )
    assert done.returncode == 1
    assert "unknown task 'schedule.no_such'" in done.stderr
