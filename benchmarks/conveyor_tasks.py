"""Benchmark tasks on Conveyor's own app and configuration (loaded with --include)."""

from __future__ import annotations

from benchmarks.workload import record_latency
from tasks.celery_app import app


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.latency")
def latency(sent: float) -> None:
    record_latency(sent)
