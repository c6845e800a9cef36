"""Batches end to end: a real worker, a private RabbitMQ and a private Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.batch import api
from tests.batch.conftest import expected_aggregate, make_rows, write_csv
from tests.infra import WorkerProcess, wait_for

pytestmark = pytest.mark.integration


def test_a_10000_item_batch_ends_with_the_exact_aggregate_and_one_callback(
    batch_worker: WorkerProcess, ledger: redis.Redis
) -> None:
    # Given 10,000 records from a generator (never a list on the producer side)
    rows = make_rows(10_000)

    # When they are submitted in chunks of 500 with a completion callback
    batch_id = api.submit(
        "aggregate", (dict(r) for r in rows), chunk_size=500, callback="tests.batch_done"
    )
    final = api.wait(batch_id, timeout=180)

    # Then every item is counted once and the aggregate is exact
    assert final.state == "completed"
    assert (final.total, final.succeeded, final.failed, final.pending) == (10_000, 10_000, 0, 0)
    assert final.chunks == 20
    assert final.result == expected_aggregate(rows)
    assert final.started_at and final.finished_at and final.items_per_second
    # And the user's callback ran exactly once
    wait_for(lambda: ledger.get(f"callback:{batch_id}"), 30, what="the callback")
    assert ledger.get(f"callback:{batch_id}") == "1"


def test_malformed_rows_are_reported_with_their_line_and_the_batch_goes_on(
    batch_worker: WorkerProcess, tmp_path: Path
) -> None:
    # Given a CSV whose lines 3, 5 and 6 are ragged, not a number, and empty-keyed
    path = tmp_path / "sales.csv"
    path.write_text("key,value\na,1.5\na,2,extra\nb,4\nb,four\n,7\nb,0.25\n")

    batch_id = api.submit_file("aggregate", path, chunk_size=2)
    final = api.wait(batch_id, timeout=60)

    assert final.state == "completed_with_failures"
    assert (final.total, final.succeeded, final.failed) == (6, 3, 3)
    failures = {f["line"]: f for f in api.failures(batch_id)}
    assert sorted(failures) == [3, 5, 6]
    assert "3 fields, the header has 2" in failures[3]["error"]
    assert "'value' is not a number: 'four'" in failures[5]["error"]
    assert "missing value in field 'key'" in failures[6]["error"]
    assert failures[5]["item"] == {"key": "b", "value": "four"}
    # The good rows are aggregated all the same
    one = {"count": 1, "sum": "1.5", "min": "1.5", "max": "1.5", "mean": "1.5"}
    assert final.result["a"] == one
    assert final.result["b"]["count"] == 2 and final.result["b"]["sum"] == "4.25"


def test_a_malformed_jsonl_line_fails_only_that_item(
    batch_worker: WorkerProcess, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"key": "x", "value": 1}\n\n{"key": "x", "value": \n{"key": "x", "value": 2}\n'
    )

    final = api.wait(api.submit_file("aggregate", path), timeout=60)

    assert (final.total, final.succeeded, final.failed) == (3, 2, 1)
    [failure] = api.failures(final.id)
    assert failure["line"] == 3 and failure["error"].startswith("malformed JSON")
    assert final.result["x"]["sum"] == "3"


def test_transient_item_errors_are_retried_before_an_item_counts_as_failed(
    batch_worker: WorkerProcess, ledger: redis.Redis
) -> None:
    # Given items whose first try fails transiently (about one in ten)
    rows = make_rows(400, seed=11)
    flaky = sum(r["value"].endswith("3") for r in rows)
    assert flaky > 10

    final = api.wait(api.submit("tests.flaky_aggregate", rows, chunk_size=50), timeout=120)

    # Then each was tried again and none failed
    assert final.state == "completed"
    assert (final.succeeded, final.failed) == (400, 0)
    assert final.result == expected_aggregate(rows)
    assert len(ledger.keys("tries:*")) == flaky


def test_failed_items_are_retried_as_a_new_attempt_of_the_same_batch(
    batch_worker: WorkerProcess, ledger: redis.Redis
) -> None:
    # Given a batch whose items with a value ending in 0 fail the first time
    rows = make_rows(1_000, seed=3)
    rejected = sum(r["value"].endswith("0") for r in rows)
    batch_id = api.submit(
        "tests.fail_until_fixed", rows, chunk_size=100, callback="tests.batch_done"
    )
    first = api.wait(batch_id, timeout=120)
    assert first.state == "completed_with_failures"
    assert (first.succeeded, first.failed) == (1_000 - rejected, rejected)

    # When the cause is fixed and the failed items are retried
    ledger.set("fixed", "1")
    assert api.retry(batch_id) == rejected
    second = api.wait(batch_id, timeout=120)

    # Then the same batch completes with every item counted once, and the exact aggregate
    assert second.id == batch_id and second.attempt == 2
    assert second.state == "completed"
    assert (second.total, second.succeeded, second.failed) == (1_000, 1_000, 0)
    assert second.result == expected_aggregate(rows)
    assert api.failures(batch_id) == []
    # The callback ran once per attempt's completion
    wait_for(lambda: ledger.get(f"callback:{batch_id}") == "2", 30, what="both callbacks")


def test_a_cancelled_batch_skips_the_chunks_not_yet_started(batch_worker: WorkerProcess) -> None:
    # Given a slow batch of 100 chunks under way (2 pool processes, about 0.2 s a chunk)
    rows = make_rows(2_000, seed=5)
    batch_id = api.submit("tests.slow_aggregate", rows, chunk_size=20, options={"delay": 0.01})
    wait_for(lambda: api.status(batch_id).succeeded >= 100, 60, what="the batch to start")

    # When it is cancelled
    assert api.cancel(batch_id) is True
    assert api.status(batch_id).state == "cancelled"

    # Then the remaining chunks are skipped promptly, not processed
    def settled() -> Any:
        s = api.status(batch_id)
        return s if s.succeeded + s.failed + s.skipped == s.total else None

    final = wait_for(settled, 30, what="the skipped chunks to drain")
    assert final.state == "cancelled"
    assert final.skipped >= 1_000
    assert final.succeeded < 1_000
    assert final.result is None
    assert api.cancel(batch_id) is False  # already finished


def test_status_and_failures_are_json_serialisable(batch_worker: WorkerProcess) -> None:
    final = api.wait(api.submit("aggregate", [{"key": "k", "value": "x"}]), timeout=60)
    json.dumps(final.as_dict())
    json.dumps(api.failures(final.id))
    assert final.state == "completed_with_failures"


def test_a_file_published_by_a_worker_returns_the_batch_id_at_once(
    batch_worker: WorkerProcess, tmp_path: Path
) -> None:
    rows = make_rows(5_000, seed=21)
    path = write_csv(tmp_path / "shared.csv", rows)

    batch_id = api.submit_file("aggregate", path, chunk_size=500, publish_in_worker=True)
    at_once = api.status(batch_id)
    final = api.wait(batch_id, timeout=120)

    assert at_once.published is False and at_once.succeeded < 5_000
    assert final.state == "completed" and final.succeeded == 5_000
    assert final.result == expected_aggregate(rows)


def test_a_retry_reruns_what_can_succeed_and_leaves_input_errors_failed_unless_asked(
    batch_worker: WorkerProcess, ledger: redis.Redis
) -> None:
    # Given a batch with items rejected until a cause is fixed, and items that are invalid
    rows = make_rows(400, seed=11)
    invalid = [n for n in range(0, 400, 7) if not rows[n]["value"].endswith("0")]
    for n in invalid:
        rows[n] = {"key": rows[n]["key"], "value": "not a number"}
    rejected = sum(r["value"].endswith("0") for r in rows)
    batch_id = api.submit("tests.fail_until_fixed", rows, chunk_size=50)
    first = api.wait(batch_id, timeout=120)
    assert first.failed == rejected + len(invalid)

    # When the cause is fixed and the batch retried
    ledger.set("fixed", "1")
    retried = api.retry(batch_id)
    second = api.wait(batch_id, timeout=120)

    # Then only the rejected items ran again; the invalid ones are still failed, as input errors
    assert retried == rejected
    assert (second.attempt, second.state) == (2, "completed_with_failures")
    assert (second.succeeded, second.failed) == (400 - len(invalid), len(invalid))
    failed = api.failures(batch_id)
    assert [f["index"] for f in failed] == invalid
    assert all(f["input_error"] and f["kind"] == "invalid" for f in failed)
    # And a retry of input errors only is refused, unless they are asked for
    with pytest.raises(ValueError, match="input errors"):
        api.retry(batch_id)
    assert api.retry(batch_id, include_input_errors=True) == len(invalid)
    assert api.wait(batch_id, timeout=120).failed == len(invalid)
