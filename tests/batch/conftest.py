"""Fixtures for the batch tests: a real worker that also loads the test handlers."""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.infra import WorkerProcess

#: The worker's --include replaces the default one, so it names both test modules.
INCLUDE = "--include=tests.worker_tasks,tests.batch_handlers"
#: Transient-error backoff short enough for tests (the default is 0.2 s, doubling).
FAST_RETRIES = {"CELERY_CONVEYOR_BATCH_ITEM_BACKOFF": "0.01"}


def batch_worker_process(
    workdir: Path, broker_url: str, result_backend: str, ledger_url: str, name: str
) -> WorkerProcess:
    return WorkerProcess(
        broker_url=broker_url,
        result_backend=result_backend,
        workdir=workdir,
        name=name,
        extra_args=[INCLUDE],
        env={"CONVEYOR_TEST_LEDGER_URL": ledger_url, **FAST_RETRIES},
    )


@pytest.fixture(scope="session")
def batch_app(conveyor_app: Any) -> Any:
    """The project's app, with the test handlers known to the producer (it validates names)."""
    import tests.batch_handlers  # noqa: F401

    return conveyor_app


@pytest.fixture(scope="module")
def batch_worker(
    tmp_path_factory: pytest.TempPathFactory,
    batch_app: Any,
    broker_url: str,
    result_backend: str,
    ledger_url: str,
) -> Iterator[WorkerProcess]:
    """A real worker (2 pool processes) shared by the tests of one module."""
    process = batch_worker_process(
        tmp_path_factory.mktemp("batch-worker"), broker_url, result_backend, ledger_url, "batch"
    ).start()
    yield process
    process.stop()


def make_rows(count: int, *, seed: int = 7, keys: int = 12) -> list[dict[str, str]]:
    """Records with a key and a two-decimal value, some negative, reproducibly."""
    rng = random.Random(seed)
    return [
        {"key": f"k{rng.randrange(keys)}", "value": f"{rng.randrange(-50_000, 500_000) / 100:.2f}"}
        for _ in range(count)
    ]


def expected_aggregate(rows: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """The aggregate computed directly, in one pass, for comparison."""
    stats: dict[str, list[Any]] = {}
    for row in rows:
        value = Decimal(row["value"])
        found = stats.setdefault(row["key"], [0, Decimal(0), value, value])
        found[0] += 1
        found[1] += value
        found[2] = min(found[2], value)
        found[3] = max(found[3], value)
    return {
        key: {"count": n, "sum": str(s), "min": str(lo), "max": str(hi), "mean": str(s / n)}
        for key, (n, s, lo, hi) in sorted(stats.items())
    }


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=["key", "value"])
        writer.writeheader()
        writer.writerows(rows)
    return path
