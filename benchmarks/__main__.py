"""``python -m benchmarks [--quick] [--json PATH] [--only SYSTEM ...]``

Runs every system on one private RabbitMQ node (quorum queues) and Redis, in one run, and
reports each metric as the median of several repeats, with min and max. Ratios against the
raw-AMQP floor and Dramatiq are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from benchmarks import batch, console, outbox_relay, raw_amqp
from benchmarks.environment import (
    QueueProbe,
    Services,
    machine,
    measure_drain,
    percentiles,
    private_services,
    summarize,
)
from benchmarks.systems import ALL, Conveyor, System
from benchmarks.workload import LATENCY_KEY


@dataclass(frozen=True)
class Sizes:
    repeats: int
    drain: int
    publish: int
    bulk: int
    latency_seconds: float
    latency_rate: int = 100


QUICK = Sizes(repeats=3, drain=1000, publish=400, bulk=10_000, latency_seconds=2)
#: Only proves that every system runs end to end (the test suite uses it); not a measurement.
SMOKE = Sizes(repeats=1, drain=100, publish=50, bulk=500, latency_seconds=0.5)
FULL = Sizes(repeats=5, drain=10_000, publish=3000, bulk=200_000, latency_seconds=15)


def bench_drain(system: System, sizes: Sizes) -> list[dict[str, Any]]:
    rates, peaks = [], []
    for _ in range(sizes.repeats):
        system.fill(sizes.drain)
        probe = QueueProbe(system.services.broker_url, system.queue)
        try:
            probe.wait_until_ready_count(sizes.drain)
            worker = system.start_worker()
            try:
                drain = measure_drain(probe, sizes.drain, worker.pid)
            finally:
                worker.stop()
        finally:
            probe.close()
        rates.append(drain.rate)
        peaks.append(drain.peak_rss / 2**20)
    return [
        summarize(system.name, "drain_throughput", "tasks/s", rates),
        summarize(system.name, "worker_peak_rss", "MiB", peaks),
    ]


def bench_publish(system: System, sizes: Sizes) -> list[dict[str, Any]]:
    rates = []
    for _ in range(sizes.repeats):
        for _warmup in range(50):
            system.send_noop()
        started = time.perf_counter()
        for _message in range(sizes.publish):
            system.send_noop()
        rates.append(sizes.publish / (time.perf_counter() - started))
        system.purge()
    return [summarize(system.name, "publish_confirmed_single", "msgs/s", rates)]


def bench_latency(system: System, sizes: Sizes, redis_url: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(f"{redis_url}/1")
    count = int(sizes.latency_seconds * sizes.latency_rate)
    runs: dict[str, list[float]] = {"p50": [], "p95": [], "p99": []}
    # One worker serves every repeat: its start-up (several seconds for Celery) is not what is
    # measured, and starting it once per repeat took a fifth of the quick run.
    worker = system.start_worker()
    probe = QueueProbe(system.services.broker_url, system.queue)
    try:
        probe.wait_for_consumers()
        time.sleep(1)  # let the last pool processes finish starting
        for _ in range(sizes.repeats):
            client.delete(LATENCY_KEY)
            started = time.perf_counter()
            for i in range(count):
                delay = started + i / sizes.latency_rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                system.send_latency(time.time())
            deadline = time.monotonic() + 60
            while client.llen(LATENCY_KEY) < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{system.name}: latency samples missing")
                time.sleep(0.05)
            samples = [float(x) * 1000 for x in client.lrange(LATENCY_KEY, 0, -1)]
            for key, value in percentiles(samples).items():
                runs[key].append(value)
    finally:
        probe.close()
        worker.stop()
    return [
        summarize(system.name, f"latency_{key}_at_{sizes.latency_rate}_per_s", "ms", values)
        for key, values in runs.items()
    ]


def bench_bulk_raw(services: Services, sizes: Sizes) -> list[dict[str, Any]]:
    rates = []
    for _ in range(sizes.repeats):
        seconds = raw_amqp.publish_pipelined(services.broker_url, sizes.bulk, "bench_bulk_raw")
        rates.append(sizes.bulk / seconds)
    return [summarize("raw_amqp", "bulk_enqueue_pipelined", "msgs/s", rates)]


def bench_bulk_conveyor(system: Conveyor, sizes: Sizes) -> list[dict[str, Any]]:
    """tasks.bulk.enqueue_many: Conveyor's task messages, pipelined confirms (the bulk path)."""
    from tasks.bulk import enqueue_many

    rates = []
    for _ in range(sizes.repeats):
        started = time.perf_counter()
        enqueue_many(system.noop, (() for _ in range(sizes.bulk)))
        rates.append(sizes.bulk / (time.perf_counter() - started))
        system.purge()
    return [summarize(system.name, "bulk_enqueue_pipelined", "msgs/s", rates)]


def ratios(results: list[dict[str, Any]]) -> list[str]:
    """Readable ratios of Conveyor against the floor and the peers, same run."""
    table = {(r["system"], r["metric"]): r["value"] for r in results}
    lines = []
    for metric in sorted({r["metric"] for r in results}):
        mine = table.get(("conveyor", metric))
        if mine is None:
            continue
        for other in ("raw_amqp", "celery_stock", "dramatiq"):
            theirs = table.get((other, metric))
            if theirs:
                lines.append(f"{metric}: conveyor / {other} = {mine / theirs:.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, under 3 minutes")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--only", nargs="*", help="run only these systems (or batch, console, outbox)"
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL

    report: dict[str, Any] = {"machine": machine(), "sizes": sizes.__dict__, "results": []}
    results: list[dict[str, Any]] = report["results"]
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    started = time.monotonic()
    with private_services(workdir) as services:
        for system_cls in ALL:
            if args.only and system_cls.name not in args.only:
                continue
            system = system_cls(services, workdir)
            try:
                for bench in (bench_drain, bench_publish):
                    rows = bench(system, sizes)
                    results.extend(rows)
                    for row in rows:
                        print(json.dumps(row), flush=True)
                rows = bench_latency(system, sizes, services.redis_url)
                if isinstance(system, Conveyor):
                    rows += bench_bulk_conveyor(system, sizes)
                results.extend(rows)
                for row in rows:
                    print(json.dumps(row), flush=True)
            finally:
                system.close()
        if not args.only or "raw_amqp" in args.only:
            rows = bench_bulk_raw(services, sizes)
            results.extend(rows)
            for row in rows:
                print(json.dumps(row), flush=True)
    if not args.only or "batch" in args.only:
        rows = batch.run(args.quick)
        results.extend(rows)
        for row in rows:
            print(json.dumps(row), flush=True)
    if not args.only or "console" in args.only:
        rows = console.rows(args.quick or args.smoke)
        results.extend(rows)
        for row in rows:
            print(json.dumps(row), flush=True)
    if not args.only or "outbox" in args.only:
        # Needs a PostgreSQL server (CONVEYOR_BENCH_POSTGRES_URL); benchmarks/outbox_relay.py.
        rows = outbox_relay.run(args.quick or args.smoke)
        results.extend(rows)
        for row in rows:
            print(json.dumps(row), flush=True)
    report["elapsed_seconds"] = round(time.monotonic() - started, 1)
    print("\n".join(ratios(results)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
