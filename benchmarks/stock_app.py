"""Stock Celery: every default, except a quorum queue so that all systems share a queue type."""

from __future__ import annotations

import os

from celery import Celery

from benchmarks.workload import record_latency

app = Celery("stock", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.task_default_queue = "bench_stock"
app.conf.task_default_queue_type = "quorum"


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.latency")
def latency(sent: float) -> None:
    record_latency(sent)
