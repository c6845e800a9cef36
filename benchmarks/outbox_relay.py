"""The outbox: `python -m benchmarks.outbox_relay [--quick] [--json PATH]` (also run by
`python -m benchmarks`).

On a private RabbitMQ node and a fresh database on the PostgreSQL server at
CONVEYOR_BENCH_POSTGRES_URL (default: the local one as `postgres`, trust auth), measures:
- the request's cost: one `outbox.delay()` + commit against one confirmed `task.delay()`
  (p50/p99 ms per call, one at a time, as a web request makes them);
- commit -> publish latency at 100 tasks/s: each row is written and committed in its own
  transaction while a relay runs; the time runs from the commit's return to the message's
  arrival at a consumer of the queue (so it includes the broker's delivery too);
- relay throughput: a backlog of rows published, confirmed and marked by one relay (rows/s),
  beside tasks.bulk.enqueue_many of as many tasks in the same run (its ceiling: the same
  confirmed publisher without the database).
The relay runs in this process (a thread), with the settings' defaults (batch of 500).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from benchmarks.environment import machine, percentiles, private_services, summarize

SERVER_URL = os.environ.get(
    "CONVEYOR_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SYSTEM = "conveyor_outbox"


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new database with the outbox schema, dropped afterwards."""
    from outbox.cli import migrate_database

    name = f"conveyor_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(SERVER_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    url = urlsplit(SERVER_URL)._replace(path=f"/{name}").geturl()
    try:
        migrate_database(url)
        yield url
    finally:
        with psycopg.connect(SERVER_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def point_app(broker_url: str, result_backend: str) -> Any:
    """Conveyor's app on the private broker (other benchmarks may have pointed it elsewhere)."""
    from kombu import pools

    os.environ["CELERY_BROKER_URL"] = broker_url
    os.environ["CELERY_RESULT_BACKEND"] = result_backend
    import benchmarks.conveyor_tasks  # noqa: F401  bench.noop
    from tasks import app

    pools.reset()
    app._pool = None
    app.amqp._producer_pool = None
    app.conf.update(broker_url=broker_url, result_backend=result_backend)
    return app


@contextmanager
def running_relay(app: Any, url: str) -> Iterator[None]:
    from outbox.relay import Relay, Settings

    relay = Relay(app, Settings.from_app(app, url))
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        relay.stop()
        thread.join(30)


class Arrivals:
    """Consumes the default queue in a thread, noting when each task id arrives."""

    def __init__(self, broker_url: str) -> None:
        from kombu import Connection

        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._connection = Connection(broker_url)
        channel = self._connection.default_channel
        channel.basic_consume("default", callback=self._arrived, no_ack=True)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _arrived(self, message: Any) -> None:
        self.seen[message.headers["id"]] = time.perf_counter()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                self._connection.drain_events(timeout=0.2)
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._connection.release()


def request_cost(app: Any, url: str, calls: int) -> list[dict[str, Any]]:
    """Per-call ms of outbox.delay() + commit, and of a direct confirmed delay()."""
    from benchmarks.conveyor_tasks import noop
    from tasks import outbox

    outbox_ms, direct_ms = [], []
    with psycopg.connect(url) as db:
        for _ in range(calls):
            started = time.perf_counter()
            outbox.delay(db, noop)
            db.commit()
            outbox_ms.append((time.perf_counter() - started) * 1000)
    for _ in range(calls):
        started = time.perf_counter()
        noop.delay()
        direct_ms.append((time.perf_counter() - started) * 1000)
    rows = []
    for name, samples in (("outbox_delay_commit", outbox_ms), ("direct_delay", direct_ms)):
        for key, value in percentiles(samples).items():
            rows.append(summarize(SYSTEM, f"{name}_{key}", "ms", [value]))
    return rows


def commit_to_publish(app: Any, url: str, broker_url: str, seconds: float) -> dict[str, float]:
    """p50/p95/p99 ms from each commit to the message's arrival, at 100 rows/s."""
    from benchmarks.conveyor_tasks import noop
    from tasks import outbox

    arrivals = Arrivals(broker_url)
    committed: dict[str, float] = {}
    count = int(seconds * 100)
    try:
        with running_relay(app, url), psycopg.connect(url) as db:
            time.sleep(1)  # the relay's connections are open
            started = time.perf_counter()
            for i in range(count):
                pause = started + i / 100 - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                task_id = outbox.delay(db, noop)
                db.commit()
                committed[task_id] = time.perf_counter()
            deadline = time.monotonic() + 60
            while not committed.keys() <= arrivals.seen.keys() and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        arrivals.close()
    samples = [(arrivals.seen[i] - t) * 1000 for i, t in committed.items() if i in arrivals.seen]
    if len(samples) < count:
        raise TimeoutError(f"{count - len(samples)} of {count} tasks never arrived")
    return percentiles(samples)


def relay_throughput(app: Any, url: str, rows: int) -> float:
    """Rows/s one relay publishes (confirmed) and marks, from a backlog of `rows`."""
    from benchmarks.conveyor_tasks import noop
    from tasks import outbox

    with psycopg.connect(url) as db:
        for _ in range(rows):
            outbox.delay(db, noop)
        db.commit()
    # The relay's own counter (written in each batch's transaction, with the marks) is one
    # row to read: counting the waiting rows would scan the table every poll, taking CPU from
    # the relay and the broker on a small machine.
    query = "SELECT coalesce(max(value), 0) FROM conveyor_outbox_counters WHERE name = %s"
    name = ("published:default",)
    with psycopg.connect(url, autocommit=True) as watch:
        target = watch.execute(query, name).fetchone()[0] + rows  # type: ignore[index]
        with running_relay(app, url):
            started = time.perf_counter()
            while watch.execute(query, name).fetchone()[0] < target:  # type: ignore[index]
                time.sleep(0.02)
            return rows / (time.perf_counter() - started)


def bulk_reference(app: Any, rows: int) -> float:
    """Msgs/s of tasks.bulk.enqueue_many (the same confirmed publisher, no database): the
    relay's ceiling on this machine at this moment."""
    from benchmarks.conveyor_tasks import noop
    from tasks.bulk import enqueue_many

    started = time.perf_counter()
    enqueue_many(noop, (() for _ in range(rows)))
    return rows / (time.perf_counter() - started)


def purge(broker_url: str) -> None:
    from kombu import Connection

    with Connection(broker_url) as connection:
        connection.default_channel.queue_purge("default")


def run(quick: bool = False) -> list[dict[str, Any]]:
    repeats, backlog, seconds, calls = (3, 5000, 3.0, 300) if quick else (5, 20_000, 15.0, 2000)
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-bench-outbox-"))
    results = []
    with private_services(workdir) as services, fresh_database() as url:
        app = point_app(services.broker_url, f"{services.redis_url}/0")
        # Declares the queues the relay publishes to (no worker runs here).
        purge_and_declare(app)
        results += request_cost(app, url, calls)
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("TRUNCATE conveyor_outbox")  # its rows were never meant to be relayed
        purge(services.broker_url)
        latency: dict[str, list[float]] = {"p50": [], "p95": [], "p99": []}
        rates, ceiling = [], []
        for _ in range(repeats):
            for key, value in commit_to_publish(app, url, services.broker_url, seconds).items():
                latency[key].append(value)
            purge(services.broker_url)
            rates.append(relay_throughput(app, url, backlog))
            purge(services.broker_url)
            ceiling.append(bulk_reference(app, backlog))
            purge(services.broker_url)
        for key, values in latency.items():
            results.append(summarize(SYSTEM, f"commit_to_publish_{key}_at_100_per_s", "ms", values))
        results.append(summarize(SYSTEM, "relay_throughput", "rows/s", rates))
        results.append(summarize(SYSTEM, "bulk_enqueue_same_run", "msgs/s", ceiling))
    return results


def purge_and_declare(app: Any) -> None:
    with app.connection_for_write() as connection:
        for queue in app.conf.task_queues:
            queue(connection.default_channel).declare()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.outbox_relay", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"machine": machine(), "results": run(args.quick)}
    for row in report["results"]:
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
