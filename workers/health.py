"""Liveness and readiness probes for compose healthchecks and Kubernetes.

The worker keeps two files per node name in CONVEYOR_HEALTH_DIR:
- ``<node>.live`` is touched every few seconds by a thread of the worker's main process, so a
  stale file means the process is gone or its interpreter is stuck;
- ``<node>.ready`` exists only while the consumer is connected to the broker and consuming;
  a lost connection removes it until the worker has reconnected.

``python -m workers.health live|ready [--node NAME] [--max-age SECONDS]`` exits 0 when healthy
and 1 with the reason otherwise. It reads files only: no broker round trip per probe.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from celery import bootsteps

#: Seconds between liveness touches; probes allow several missed beats before failing.
BEAT_INTERVAL = 5.0
DEFAULT_MAX_AGE = 30.0


def health_dir() -> Path:
    return Path(os.environ.get("CONVEYOR_HEALTH_DIR", "/tmp/conveyor-health"))


def probe_path(node: str, kind: str, directory: Path | None = None) -> Path:
    return (directory or health_dir()) / f"{node}.{kind}"


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


class LivenessProbe(bootsteps.StartStopStep):
    """Worker step: a daemon thread touches ``<node>.live`` while the main process lives."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._path: Path | None = None

    def start(self, parent: Any) -> None:
        self._path = probe_path(parent.hostname, "live")
        self._stopped.clear()
        self._thread = threading.Thread(target=self._beat, name="liveness", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        assert self._path is not None
        while not self._stopped.is_set():
            _touch(self._path)
            self._stopped.wait(BEAT_INTERVAL)

    def stop(self, parent: Any) -> None:
        self._stopped.set()
        if self._path is not None:
            self._path.unlink(missing_ok=True)


class ReadinessProbe(bootsteps.StartStopStep):
    """Consumer step: ``<node>.ready`` exists while the consumer is connected and consuming."""

    # After delayed delivery too (Conveyor's replacement of Celery's step, workers/failover.py):
    # until it has declared the celery_delayed_* exchanges and bound the task queues to them,
    # a countdown publish fails (no exchange) or is dropped.
    requires = (
        "celery.worker.consumer.tasks:Tasks",
        "workers.failover:ClusterDelayedDelivery",
    )

    def start(self, c: Any) -> None:
        _touch(probe_path(c.hostname, "ready"))

    def stop(self, c: Any) -> None:
        probe_path(c.hostname, "ready").unlink(missing_ok=True)

    def shutdown(self, c: Any) -> None:
        self.stop(c)


def check(
    kind: str,
    node: str,
    max_age: float,
    *,
    now: float | None = None,
    directory: Path | None = None,
) -> str | None:
    """Return None when healthy, else the reason."""
    path = probe_path(node, kind, directory)
    try:
        age = (now if now is not None else time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return f"{kind}: {path} is missing"
    if kind == "live" and age > max_age:
        return f"live: {path} last touched {age:.0f}s ago (limit {max_age:.0f}s)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.health", description=__doc__)
    parser.add_argument("kind", choices=("live", "ready"))
    parser.add_argument(
        "--node", default="celery@%h", help="worker node name; %%h is this host's name"
    )
    parser.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE)
    args = parser.parse_args(argv)
    node = args.node.replace("%h", socket.gethostname())
    reason = check(args.kind, node, args.max_age)
    if reason:
        sys.stderr.write(f"unhealthy {reason}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
