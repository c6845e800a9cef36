"""The benchmark command runs every system end to end (tiny sizes: a check, not a measurement)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_benchmark_command_writes_rows_for_all_four_systems(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--json", str(out),
         "--only", "raw_amqp", "conveyor", "celery_stock", "dramatiq"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1
    systems = {row["system"] for row in report["results"]}
    assert systems == {"raw_amqp", "conveyor", "celery_stock", "dramatiq"}
    for row in report["results"]:
        assert row["value"] > 0, row
        assert row["min"] <= row["value"] <= row["max"]
