"""``python -m benchmarks.console [--batches N] [--dead-letters N] [--json PATH]``

How long each console page takes to answer with 1,000 batches and 10,000 dead letters (the
sizes issue 16 names; the goal is under 300 ms per page). It starts a private RabbitMQ and
Redis, records the batches (their chunks wait in the batch queue: no worker runs), publishes
the dead letters straight to the dead-letter exchange with Conveyor's reason headers, starts
the real `celery -A tasks console` process, waits for its dead-letter snapshot to hold them
all, then requests every page and JSON endpoint. It prints the machine's details, and the
console's memory and how long one full read of the dead-letter queue took.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil
from kombu import Producer
from port_for import get_port

from benchmarks.environment import machine, percentiles, private_services

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "/",
    "/queues",
    "/batches",
    "/batches?page=10",
    "/batches/{batch}",
    "/schedules",
    "/dead-letters",
    "/dead-letters?page=100",
    "/dead-letters?reason=retries_exhausted&task=bench.task3",
    "/dead-letters/{letter}",
    "/api/queues",
    "/api/batches",
    "/api/batches/{batch}",
    "/api/schedules",
    "/api/dead-letters",
]
REASONS = ("retries_exhausted", "unknown_task", "malformed", "expired")


def make_batches(count: int) -> str:
    """`count` small batches through tasks.batch.api; returns the last one's id."""
    from tasks.batch import api

    last = ""
    for n in range(count):
        items = [{"key": f"k{i % 5}", "value": i} for i in range(20)]
        last = api.submit("aggregate", items, chunk_size=10, options={"note": str(n)})
    return last


def make_dead_letters(app: Any, count: int) -> str:
    """`count` dead letters as workers publish them (CONTRACTS.md); returns one id."""
    from workers.dead_letter import dead_letter_entities

    exchange, queue = dead_letter_entities(app.conf)
    body = json.dumps([["x" * 200, {"url": "https://example.com/hook"}], {}, {}])
    letter = ""
    with app.connection_for_write() as connection:
        channel = connection.channel()
        queue.bind(channel).declare()
        producer = Producer(channel)
        for n in range(count):
            letter = str(uuid.uuid4())
            headers = {
                "id": letter,
                "task": f"bench.task{n % 7}",
                "x-conveyor-reason": REASONS[n % len(REASONS)],
                "x-conveyor-exception": "ConnectionError",
                "x-conveyor-message": "the partner API timed out",
                "x-conveyor-worker": "worker@bench",
                "x-conveyor-failed-at": "2026-12-03T12:00:00+00:00",
                "x-conveyor-queue": "default",
            }
            producer.publish(
                body,
                exchange=exchange,
                routing_key="default",
                headers=headers,
                content_type="application/json",
                content_encoding="utf-8",
                serializer=None,
            )
    return letter


def get(url: str, auth: str) -> float:
    request = urllib.request.Request(url, headers={"Authorization": auth})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
    return (time.perf_counter() - started) * 1000


def wait_for_snapshot(base: str, auth: str, count: int, timeout: float = 600) -> float:
    """Seconds until the console's dead-letter snapshot holds `count` messages."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        request = urllib.request.Request(
            base + "/api/dead-letters", headers={"Authorization": auth}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                if json.load(response)["total"] >= count:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the console's snapshot did not reach {count} dead letters")


def run(batches: int, dead_letters: int, requests: int) -> dict[str, Any]:
    import base64

    workdir = Path(tempfile.mkdtemp(prefix="conveyor-bench-console-"))
    with private_services(workdir) as services:
        backend = f"{services.redis_url}/0"
        os.environ.update(CELERY_BROKER_URL=services.broker_url, CELERY_RESULT_BACKEND=backend)
        from tasks.celery_app import app

        app.conf.update(broker_url=services.broker_url, result_backend=backend)
        with app.connection_for_write() as connection:
            channel = connection.channel()
            for queue in app.conf.task_queues:
                queue(channel).declare()
        started = time.monotonic()
        batch = make_batches(batches)
        letter = make_dead_letters(app, dead_letters)
        setup = time.monotonic() - started
        port = get_port(None)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CONVEYOR_CONSOLE_AUTH": "bench:bench"}
        celery = str(Path(sys.executable).with_name("celery"))
        command = [celery, "-A", "tasks", "console", "--address=127.0.0.1", f"--port={port}"]
        log = (workdir / "console.log").open("wb")
        console = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            auth = "Basic " + base64.b64encode(b"bench:bench").decode()
            base = f"http://127.0.0.1:{port}"
            read_seconds = wait_for_snapshot(base, auth, dead_letters)
            pages = {}
            for page in PAGES:
                path = page.format(batch=batch, letter=letter)
                samples = [get(base + path, auth) for _ in range(requests)]
                pages[page] = {k: round(v, 1) for k, v in percentiles(samples).items()}
                pages[page]["max"] = round(max(samples), 1)
            rss = psutil.Process(console.pid).memory_info().rss / 2**20
        finally:
            console.terminate()
            console.wait(20)
    return {
        "batches": batches,
        "dead_letters": dead_letters,
        "requests_per_page": requests,
        "setup_seconds": round(setup, 1),
        "first_dead_letter_read_seconds": round(read_seconds, 1),
        "console_rss_mib": round(rss, 1),
        "pages_ms": pages,
    }


def rows(quick: bool) -> list[dict[str, Any]]:
    """For `python -m benchmarks`: each page's p95 as a result row (quick: a tenth the size)."""
    batches, dead_letters = (100, 1000) if quick else (1000, 10_000)
    report = run(batches, dead_letters, 20)
    system = f"console, {batches:,} batches, {dead_letters:,} dead letters"
    return [
        {"system": system, "metric": f"GET {page} p95", "value": figures["p95"], "unit": "ms"}
        for page, figures in report["pages_ms"].items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.console", description=__doc__)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--dead-letters", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=20, help="requests per page")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    report = {"machine": machine(), **run(args.batches, args.dead_letters, args.requests)}
    print(json.dumps(report["machine"]))
    for key in ("batches", "dead_letters", "setup_seconds", "first_dead_letter_read_seconds"):
        print(f"{key}: {report[key]}")
    print(f"console RSS: {report['console_rss_mib']} MiB")
    print(f"{'page':58} {'p50':>7} {'p95':>7} {'max':>7}  (ms)")
    for page, figures in report["pages_ms"].items():
        print(f"{page:58} {figures['p50']:7} {figures['p95']:7} {figures['max']:7}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
