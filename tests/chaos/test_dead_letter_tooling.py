"""`celery -A tasks dlq`, and retries that end in the dead-letter queue, against a real node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from kombu import Connection

from tasks.deadletter import store
from tests import worker_tasks
from tests.chaos.conftest import Chaos
from tests.infra import ROOT, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

DLQ = "conveyor.dead_letter"


def dlq(chaos: Chaos, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    env = {**os.environ, "CELERY_BROKER_URL": chaos.rabbit.url}
    return subprocess.run(
        [celery, "-A", "tasks", "dlq", *args],
        cwd=ROOT,
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def in_dlq(chaos: Chaos, task_id: str) -> store.Entry | None:
    with Connection(chaos.rabbit.url) as connection:
        return store.find(connection, DLQ, task_id)


def dead_lettered_transient(chaos: Chaos, key: str, queue: str = "default") -> Any:
    """Publish a task whose error outlasts its retries; return its result once dead-lettered."""
    chaos.ledger.set(f"broken:{key}", 1)
    result = worker_tasks.transient.apply_async((key,), queue=queue)
    wait_for(lambda: in_dlq(chaos, result.id), 60, 0.5, "the exhausted task's dead letter")
    return result


def listed_ids(chaos: Chaos, *options: str) -> set[str]:
    listed = dlq(chaos, "list", *options, "--json")
    assert listed.returncode == 0, listed.stderr
    return {entry["id"] for entry in json.loads(listed.stdout)}


def test_a_transient_error_retries_with_backoff_then_is_dead_lettered_not_dropped(
    chaos: Chaos,
) -> None:
    chaos.start_worker("retries")
    result = dead_lettered_transient(chaos, "exhausted")

    # It ran once plus max_retries (2) times, and its failure is recorded
    assert chaos.ledger.hget("runs", result.id) == "3"
    assert result.state == "FAILURE"
    entry = in_dlq(chaos, result.id)
    assert entry is not None
    assert entry.reason == "retries_exhausted"
    assert entry.task == "tests.transient"
    assert entry.queue == "default"


def test_dlq_replay_brings_a_dead_lettered_task_back_and_it_runs(chaos: Chaos) -> None:
    chaos.start_worker("replay")
    result = dead_lettered_transient(chaos, "replayed")

    # list and show describe it
    listed = dlq(chaos, "list", "--task", "tests.transient", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [e["id"] for e in json.loads(listed.stdout)] == [result.id]
    shown = dlq(chaos, "show", result.id)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["body"][0] == ["replayed"]

    # a dry run changes nothing
    dry = dlq(chaos, "replay", "--id", result.id, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would replay" in dry.stdout
    assert in_dlq(chaos, result.id) is not None

    # When the cause is fixed and the operator replays it
    chaos.ledger.delete("broken:replayed")
    done = dlq(chaos, "replay", "--id", result.id)
    assert done.returncode == 0, done.stderr

    # Then it runs under its original id, and leaves the dead-letter queue
    wait_for(lambda: result.state == "SUCCESS", 30, 0.5, "the replayed task to succeed")
    assert result.get(timeout=5) == "ok"
    assert in_dlq(chaos, result.id) is None


def test_an_interrupted_replay_leaves_the_message_in_the_dead_letter_queue(
    chaos: Chaos,
) -> None:
    chaos.start_worker("interrupted")
    result = dead_lettered_transient(chaos, "interrupted")

    # When the republish is not confirmed (here: the target exchange does not exist)
    with Connection(chaos.rabbit.url) as connection, pytest.raises(Exception, match="404"):
        store.replay(connection, DLQ, exchange="no-such-exchange", select=lambda e: True)

    # Then nothing was removed (a quorum queue takes back returned messages asynchronously)
    wait_for(lambda: in_dlq(chaos, result.id), 10, 0.5, "the message back in the queue")


def test_dlq_purge_asks_first_and_empties_the_queue(chaos: Chaos) -> None:
    chaos.start_worker("purge")
    result = dead_lettered_transient(chaos, "purged")

    refused = dlq(chaos, "purge", input="n\n")
    assert refused.returncode != 0
    assert in_dlq(chaos, result.id) is not None

    purged = dlq(chaos, "purge", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert in_dlq(chaos, result.id) is None


def test_dlq_list_filters_by_queue_and_replay_selects_by_task_or_all(chaos: Chaos) -> None:
    from tests.chaos.test_bad_input import publish_raw, task_body, task_headers

    chaos.start_worker("selection")
    # Given a task dead-lettered from `default`, and one no worker knows from `batch`
    transient = dead_lettered_transient(chaos, "selection")
    unknown = str(uuid.uuid4())
    publish_raw(
        chaos.rabbit,
        task_body([]),
        headers=task_headers("nobody.knows", unknown),
        routing_key="batch",
    )
    wait_for(lambda: in_dlq(chaos, unknown), 20, 0.5, "the unknown task's dead letter")

    # list --queue shows only the messages dead-lettered from that queue
    assert listed_ids(chaos, "--queue", "batch") == {unknown}
    assert listed_ids(chaos, "--queue", "default") == {transient.id}
    assert listed_ids(chaos, "--queue", "priority") == set()
    readable = dlq(chaos, "list", "--queue", "batch")
    assert readable.returncode == 0, readable.stderr
    assert f"{unknown}  task=nobody.knows  queue=batch  reason=unknown_task" in readable.stdout
    assert "1 message(s)" in readable.stdout

    # replay needs exactly one selection, and show/replay say when an id is not there
    for options in ([], ["--id", unknown, "--all"], ["--task", "nobody.knows", "--all"]):
        refused = dlq(chaos, "replay", *options)
        assert refused.returncode == 2, (options, refused.stdout)
        assert "give exactly one of --id, --task or --all" in refused.stderr
    missing = str(uuid.uuid4())
    for command in (["show", missing], ["replay", "--id", missing]):
        absent = dlq(chaos, *command)
        assert absent.returncode == 1, (command, absent.stdout)
        assert f"no dead-lettered message with id {missing}" in absent.stderr
    assert listed_ids(chaos) == {transient.id, unknown}

    # replay --task brings back that task's messages only
    chaos.ledger.delete("broken:selection")
    by_task = dlq(chaos, "replay", "--task", "tests.transient")
    assert by_task.returncode == 0, by_task.stderr
    assert f"replayed {transient.id} task=tests.transient -> default" in by_task.stdout
    assert "replayed 1 message(s)" in by_task.stdout
    wait_for(lambda: transient.state == "SUCCESS", 30, 0.5, "the replayed task to succeed")
    assert listed_ids(chaos) == {unknown}

    # replay --all --force takes the rest, to its own queue; the unknown task is rejected again
    everything = dlq(chaos, "replay", "--all", "--force")
    assert everything.returncode == 0, everything.stderr
    assert f"replayed {unknown} task=nobody.knows -> batch" in everything.stdout
    assert "replayed 1 message(s)" in everything.stdout

    def rejected_again() -> bool:
        entry = in_dlq(chaos, unknown)
        return entry is not None and entry.headers.get("x-conveyor-replays") == 1

    wait_for(rejected_again, 20, 0.5, "the replayed unknown task back in the dead-letter queue")
