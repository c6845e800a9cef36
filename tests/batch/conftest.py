"""Fixtures for the batch tests: a real worker that also loads the test handlers."""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StartWorker
from tests.infra import WorkerProcess

#: Test task modules the batch worker loads besides tests.worker_tasks.
INCLUDE = ("tests.batch_handlers",)
#: Transient-error backoff short enough for tests (the default is 0.2 s, doubling).
FAST_RETRIES = {"CELERY_CONVEYOR_BATCH_ITEM_BACKOFF": "0.01"}


@pytest.fixture(scope="session")
def batch_app(conveyor_app: Any) -> Any:
    """The project's app, with the test handlers known to the producer (it validates names)."""
    import tests.batch_handlers  # noqa: F401

    return conveyor_app


@pytest.fixture(scope="module")
def batch_worker(
    batch_app: Any, broker_url: str, start_worker: StartWorker
) -> Iterator[WorkerProcess]:
    """A real worker (2 pool processes) shared by the tests of one module."""
    with start_worker("batch", broker_url=broker_url, include=INCLUDE, env=FAST_RETRIES) as process:
        yield process


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
