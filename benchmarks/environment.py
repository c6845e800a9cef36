"""What a benchmark run needs around it: the machine's details, private nodes, measurements."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pika
import psutil
from port_for import get_port
from pytest_redis.executor.process import RedisExecutor

from tests.infra import RabbitNode


def machine() -> dict[str, Any]:
    """The details a reader needs to compare figures between runs."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("celery", "kombu", "amqp", "pika", "dramatiq", "redis"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "rabbitmq": rabbitmq_version(),
        "redis_server": redis_version(),
        "packages": versions,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "commit": commit(),
    }


def commit() -> str | None:
    """The checkout's commit, with "+changes" when the tree differs from it: a figure is only
    comparable with runs of the same code."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "-uno")
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}+changes" if dirty else head


def rabbitmq_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def redis_version() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        return out.stdout.split()[2].removeprefix("v=")
    except (OSError, IndexError):
        return "unknown"


@dataclass
class Services:
    broker_url: str
    redis_url: str


@contextmanager
def private_services(workdir: Path) -> Iterator[Services]:
    """A private RabbitMQ node and Redis on free loopback ports, stopped afterwards."""
    rabbit = RabbitNode(workdir / "rabbit").start()
    port = get_port(None)
    redis = RedisExecutor(
        "redis-server",
        databases=16,
        redis_timeout=30,
        loglevel="warning",
        host="127.0.0.1",
        port=port,
        datadir=Path(tempfile.mkdtemp(prefix="bench-redis-")),
    )
    redis.start()
    try:
        yield Services(broker_url=rabbit.url, redis_url=f"redis://127.0.0.1:{port}")
    finally:
        redis.stop()
        rabbit.stop()


def pika_parameters(broker_url: str) -> pika.URLParameters:
    """pika spells the default vhost "/%2F" where kombu writes "//"."""
    if broker_url.endswith("//"):
        broker_url = broker_url[:-1] + "%2F"
    return pika.URLParameters(broker_url)


class QueueProbe:
    """Reads a queue's ready count and consumers with passive declares on its own channel."""

    def __init__(self, broker_url: str, queue: str) -> None:
        self.connection = pika.BlockingConnection(pika_parameters(broker_url))
        self.channel = self.connection.channel()
        self.queue = queue

    def counts(self) -> tuple[int, int]:
        frame = self.channel.queue_declare(self.queue, passive=True)
        return frame.method.message_count, frame.method.consumer_count

    def wait_for_consumers(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.counts()[1] == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no consumer on {self.queue} after {timeout}s")
            time.sleep(0.05)

    def wait_until_ready_count(self, target: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.counts()[0] < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.queue} never reached {target} ready messages")
            time.sleep(0.05)

    def close(self) -> None:
        self.connection.close()


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its children, in bytes."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


@dataclass
class Drain:
    messages: int
    seconds: float
    peak_rss: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def measure_drain(probe: QueueProbe, total: int, worker_pid: int, timeout: float = 300) -> Drain:
    """Time from the first message leaving the queue to the queue being empty.

    Polls the ready count: the same outside view for every system, nothing added to the
    task path. Starts counting at the first poll that sees the queue below `total`.
    """
    peak = 0
    deadline = time.monotonic() + timeout
    while True:
        ready, _ = probe.counts()
        peak = max(peak, tree_rss(worker_pid))
        if ready < total:
            started, remaining_at_start = time.perf_counter(), ready
            break
        if time.monotonic() > deadline:
            raise TimeoutError("the worker never started consuming")
        time.sleep(0.002)
    while True:
        ready, _ = probe.counts()
        peak = max(peak, tree_rss(worker_pid))
        if ready == 0:
            finished = time.perf_counter()
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"drain stalled with {ready} messages ready")
        time.sleep(0.005)
    return Drain(remaining_at_start, finished - started, peak)


def summarize(system: str, metric: str, unit: str, values: list[float]) -> dict[str, Any]:
    """One result row: the median of the repeats, with min, max and every value."""
    return {
        "system": system,
        "metric": metric,
        "value": round(statistics.median(values), 3),
        "unit": unit,
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "repeats": len(values),
    }


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98]}
