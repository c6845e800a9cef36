"""Every dead letter says why (issue 14 §1), against a real node and a real worker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kombu import Connection

from tasks.deadletter import store
from tasks.schedule.entries import ENTRY_HEADER
from tests import worker_tasks
from tests.chaos.conftest import Chaos
from tests.chaos.test_bad_input import publish_raw, task_body, task_headers
from tests.chaos.test_dead_letter_tooling import DLQ, dlq
from tests.infra import wait_for
from workers.dead_letter import EXIT_AFTER_COPY_ENV

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

NEVER_REPLAYABLE = ("content_disallowed", "undecodable", "malformed", "unknown_task")


def listed(chaos: Chaos, *options: str) -> dict[str, dict[str, Any]]:
    """`dlq list --json` (with `options`), by id."""
    result = dlq(chaos, "list", *options, "--json")
    assert result.returncode == 0, result.stderr
    return {entry["id"]: entry for entry in json.loads(result.stdout)}


def copies_of(chaos: Chaos, task_id: str) -> int:
    with Connection(chaos.rabbit.url) as connection:
        return sum(e.id == task_id for e in store.list_entries(connection, DLQ))


def publish_each_bad_input(chaos: Chaos) -> dict[str, str]:
    """One message per bad-input reason, published raw to `default`; reason -> id."""
    ids = {reason: str(uuid.uuid4()) for reason in NEVER_REPLAYABLE}
    publish_raw(
        chaos.rabbit,
        task_body([1, 2]),
        headers=task_headers("tests.add", ids["content_disallowed"]),
        content_type="application/x-python-serialize",
        content_encoding="binary",
    )
    publish_raw(
        chaos.rabbit, task_body([1, 2])[:-7], headers=task_headers("tests.add", ids["undecodable"])
    )
    publish_raw(
        chaos.rabbit,
        task_body([1]),
        headers=task_headers("tests.typed", ids["malformed"], retries="many"),
    )
    publish_raw(
        chaos.rabbit, task_body([]), headers=task_headers("nobody.knows", ids["unknown_task"])
    )
    return ids


def test_every_dead_letter_says_why_redacted_and_replay_skips_what_can_never_succeed(
    chaos: Chaos,
) -> None:
    worker = chaos.start_worker("reasons", concurrency=1)
    started = datetime.now(UTC) - timedelta(seconds=5)
    # Given one message for each bad-input reason, and a task whose error names a secret URL
    ids = publish_each_bad_input(chaos)
    key = "https://alice:s3cret-pw@hooks.example.com/in"
    chaos.ledger.set(f"broken:{key}", 1)
    exhausted = worker_tasks.transient.apply_async((key,), queue="default")
    ids["retries_exhausted"] = exhausted.id
    wait_for(lambda: set(ids.values()) <= set(listed(chaos)), 60, 0.5, "every dead letter")

    # Then `dlq list --json` gives each one's reason, exception, message, worker, time, queue
    entries = listed(chaos)
    for reason, task_id in ids.items():
        entry = entries[task_id]
        assert entry["reason"] == reason, entry
        assert entry["exception"] and entry["message"], entry
        assert entry["worker"] == worker.node
        assert datetime.fromisoformat(entry["failed_at"]) >= started
        assert entry["queue"] == "default"
        assert entry["replayable"] is (reason == "retries_exhausted")
    assert entries[ids["unknown_task"]]["exception"] == "NotRegistered"
    assert entries[ids["content_disallowed"]]["exception"] == "ContentDisallowed"
    # ... and the exception's message is redacted like the logs
    failure = entries[exhausted.id]
    assert (failure["exception"], failure["message"]) == (
        "ConnectionError",
        "https://alice:********@hooks.example.com/in is down",
    )
    readable = dlq(chaos, "list")
    assert "s3cret" not in readable.stdout and "s3cret" not in json.dumps(entries)
    assert f"{exhausted.id}  task=tests.transient  queue=default  reason=retries_exhausted" in (
        readable.stdout
    )
    shown = json.loads(dlq(chaos, "show", ids["malformed"]).stdout)
    assert (shown["reason"], shown["worker"]) == ("malformed", worker.node)

    # --reason selects
    assert set(listed(chaos, "--reason", "unknown_task")) == {ids["unknown_task"]}
    assert set(listed(chaos, "--reason", "expired")) == set()

    # When every entry is replayed, those that can never succeed are named and stay
    chaos.ledger.delete(f"broken:{key}")
    replay = dlq(chaos, "replay", "--all")
    assert replay.returncode == 0, replay.stderr
    for reason in NEVER_REPLAYABLE:
        assert f"skipped {ids[reason]} " in replay.stdout
    assert "replayed 1 message(s)" in replay.stdout
    assert exhausted.get(timeout=30) == "ok"
    wait_for(lambda: set(listed(chaos)) == {ids[r] for r in NEVER_REPLAYABLE}, 20, 0.5, "skips")
    # ... a dry run with --force would take them, and --force does
    dry = json.loads(dlq(chaos, "replay", "--all", "--force", "--dry-run", "--json").stdout)
    assert {e["id"] for e in dry["replayed"]} == {ids[r] for r in NEVER_REPLAYABLE}
    forced = dlq(chaos, "replay", "--id", ids["unknown_task"], "--force")
    assert f"replayed {ids['unknown_task']} task=nobody.knows -> default" in forced.stdout

    def dead_again() -> bool:
        with Connection(chaos.rabbit.url) as connection:
            entry = store.find(connection, DLQ, ids["unknown_task"])
        return entry is not None and entry.headers.get("x-conveyor-replays") == 1

    wait_for(dead_again, 20, 0.5, "the forced replay to be dead-lettered again")
    assert copies_of(chaos, ids["unknown_task"]) == 1


def test_an_expired_scheduled_run_is_recognisable_and_purge_selects_it(chaos: Chaos) -> None:
    # Given scheduled runs of two entries, and a run with no entry, expiring with no worker up
    runs = {
        name: worker_tasks.add.apply_async(
            (1, 2), queue="default", expires=1, headers={ENTRY_HEADER: name} if name else {}
        ).id
        for name in ("nightly-report", "hourly-sync", None)
    }
    wait_for(lambda: set(runs.values()) <= set(listed(chaos)), 30, 0.5, "the expired runs")

    # Then each is listed as expired, with its schedule entry
    expired = listed(chaos, "--reason", "expired")
    assert {expired[task_id]["schedule"] for task_id in runs.values()} == set(runs)
    assert all(expired[task_id]["replayable"] for task_id in runs.values())

    # When one entry's expired runs are purged, only they go
    purged = dlq(chaos, "purge", "--reason", "expired", "--schedule", "nightly-report", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert "purged 1 message(s)" in purged.stdout
    left = {runs["hourly-sync"], runs[None]}
    wait_for(lambda: set(listed(chaos)) == left, 10, 0.5, "the other runs to stay")
    # ... and a selection asks first, like a full purge
    refused = dlq(chaos, "purge", "--task", "tests.add", input="n\n")
    assert refused.returncode != 0
    assert set(listed(chaos)) == left


def test_a_worker_killed_between_the_dead_letter_copy_and_the_ack_leaves_one_or_two(
    chaos: Chaos,
) -> None:
    # Given a worker that exits right after the broker confirmed a dead-letter copy
    crashing = chaos.start_worker("crash", concurrency=1, env={EXIT_AFTER_COPY_ENV: "1"})
    task_id = str(uuid.uuid4())
    publish_raw(chaos.rabbit, task_body([]), headers=task_headers("nobody.knows", task_id))
    assert crashing.process is not None
    wait_for(lambda: crashing.process.poll() is not None, 30, 0.5, "the worker to exit")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(crashing.process.pid, signal.SIGKILL)  # its orphaned pool, if any
    assert crashing.process.returncode == 70
    assert copies_of(chaos, task_id) == 1

    # When a worker starts again, the unacked original is delivered and dead-lettered again
    wait_for(
        lambda: chaos.rabbit.message_counts()["default"] == 1, 20, 0.5, "the original returned"
    )
    chaos.start_worker("after-crash", concurrency=1)
    wait_for(lambda: chaos.rabbit.message_counts()["default"] == 0, 30, 0.5, "the original acked")

    # Then there is a duplicate dead letter at worst, never none
    assert 1 <= copies_of(chaos, task_id) <= 2
