"""A whole worker killed with SIGKILL mid-batch changes nothing in the final numbers."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.batch import api
from tests.batch.conftest import FAST_RETRIES, INCLUDE, expected_aggregate, make_rows
from tests.conftest import StartWorker
from tests.infra import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def kill_mid_batch(
    batch_app: Any, tmp_path: Path, broker_url: str, start_worker: StartWorker
) -> Callable[[str], Any]:
    """Run a submitted batch on a worker killed (SIGKILL, whole group) mid-batch, then on a
    new worker; returns the final status."""
    return partial(_kill_mid_batch, tmp_path, broker_url, start_worker)


def _kill_mid_batch(
    tmp_path: Path, broker_url: str, start_worker: StartWorker, batch_id: str
) -> Any:
    options: dict[str, Any] = {"broker_url": broker_url, "include": INCLUDE, "env": FAST_RETRIES}
    with start_worker("doomed", workdir=tmp_path / "first", **options) as first:
        wait_for(lambda: api.status(batch_id).succeeded >= 600, 90, what="the batch to get going")
        first.kill_group()
        assert api.status(batch_id).state == "running"
    with start_worker("survivor", workdir=tmp_path / "second", **options):
        return api.wait(batch_id, timeout=180)


def test_a_worker_killed_mid_batch_changes_nothing_in_the_final_numbers(
    kill_mid_batch: Callable[[str], Any], ledger: redis.Redis
) -> None:
    # Given a batch of 3,000 items in 60 chunks, submitted before any worker runs
    rows = make_rows(3_000, seed=13)
    batch_id = api.submit(
        "tests.slow_aggregate",
        rows,
        chunk_size=50,
        options={"delay": 0.002, "count_runs": True},
        callback="tests.batch_done",
    )
    assert api.status(batch_id).state == "pending"

    # When the worker is killed (SIGKILL, whole group) mid-batch and another takes over
    final = kill_mid_batch(batch_id)

    # Then some items really ran twice (the killed chunks were redelivered) ...
    runs = [int(v) for v in ledger.mget([f"runs:{batch_id}:{i}" for i in range(3_000)])]
    assert min(runs) == 1
    assert max(runs) >= 2, "no chunk was redelivered: the kill came too late to test anything"
    # ... yet every item is counted exactly once and the aggregate is exact
    assert final.state == "completed"
    assert (final.total, final.succeeded, final.failed) == (3_000, 3_000, 0)
    assert final.result == expected_aggregate(rows)
    # And the completion callback ran once
    wait_for(lambda: ledger.get(f"callback:{batch_id}"), 30, what="the callback")
    assert ledger.get(f"callback:{batch_id}") == "1"


def test_side_effects_keyed_on_the_idempotency_key_happen_once_despite_a_kill(
    kill_mid_batch: Callable[[str], Any], tmp_path: Path, ledger: redis.Redis
) -> None:
    # Given a batch that writes one file per item
    out = tmp_path / "out"
    items = [{"n": n} for n in range(2_000)]
    batch_id = api.submit(
        "tests.slow_write_files",
        items,
        chunk_size=50,
        options={"delay": 0.003, "count_runs": True, "directory": str(out)},
    )

    final = kill_mid_batch(batch_id)

    # Then items ran twice, but each file exists once, whole, with its item
    runs = [int(v) for v in ledger.mget([f"runs:{batch_id}:{i}" for i in range(2_000)])]
    assert max(runs) >= 2, "no chunk was redelivered: the kill came too late to test anything"
    files = sorted(out.glob("[!.]*.json"))
    assert len(files) == 2_000
    # A write cut short by the kill was redone under the same temporary name: no debris
    assert not list(out.glob(".*.tmp"))
    for n in (0, 999, 1_999):
        assert json.loads((out / f"{batch_id}-{n}.json").read_text()) == {"n": n}
    assert final.state == "completed"
    assert final.succeeded == 2_000
    # The redelivered chunks found their earlier files: written + existing counts each item once
    assert final.result["written"] + final.result["existing"] == 2_000
    assert final.result["existing"] >= 1
