"""Everything the console shows or does, through the functions the CLIs use.

Batches through tasks.batch.api, schedules through tasks.schedule.store, dead letters through
tasks.deadletter.store (read into a background snapshot, console/deadletters.py), queues through
monitoring.queue_stats. Every method blocks (Redis, AMQP): the web layer runs them in threads.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from amqp.exceptions import AMQPError
from celery import Celery
from kombu.exceptions import OperationalError
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import RedisError

from console.deadletters import DeadLetterSnapshot
from core.clock import iso
from monitoring import queue_stats
from tasks.batch import api as batch_api
from tasks.batch.store import FINAL_STATES, BatchNotFound, Status
from tasks.deadletter import store as dead_letters
from tasks.deadletter.store import Entry
from tasks.schedule import last_success
from tasks.schedule import store as schedules

logger = logging.getLogger(__name__)

#: Seconds a queue reading is reused: a page refreshing every few seconds in several browsers
#: costs the broker one read, not one per view.
QUEUE_CACHE_SECONDS = 2.0
#: The exporter's gauge of the oldest waiting task (monitoring/exporter/collector.py).
OLDEST_METRIC = "conveyor_oldest_waiting_task_age_seconds"
#: Errors of a store call that mean "the broker or Redis is away (or refused us)", shown as
#: such on the page rather than as a crash. py-amqp's refusals are not OperationalErrors.
UNAVAILABLE: tuple[type[BaseException], ...] = (OperationalError, OSError, RedisError, AMQPError)


@dataclass(frozen=True)
class Page:
    items: list[Any]
    total: int
    offset: int
    limit: int

    def as_dict(self, key: str, shape: Callable[[Any], Any]) -> dict[str, Any]:
        items = [shape(item) for item in self.items]
        return {key: items, "total": self.total, "offset": self.offset, "limit": self.limit}


def eta_seconds(status: Status) -> float | None:
    """Seconds left at the current pace, for an unfinished batch with a known pace."""
    if status.state in FINAL_STATES or not status.items_per_second:
        return None
    left = status.total - status.succeeded - status.failed - status.skipped
    return max(left, 0) / status.items_per_second


class Sources:
    """The console's reads and actions against one Celery app."""

    def __init__(self, app: Celery, *, snapshot: DeadLetterSnapshot | None = None) -> None:
        self.app = app
        conf = app.conf
        self.dead_letter_queue = str(conf.conveyor_dead_letter_queue)
        self.flower_url = (conf.get("conveyor_flower_url") or "").rstrip("/") or None
        self.exporter_url = conf.get("conveyor_exporter_url") or None
        # One reader of the dead-letter queue at a time in this process: a replay or purge
        # while the snapshot holds every message unacked would see an empty queue.
        self._dead_letter_lock = threading.Lock()
        self.snapshot = snapshot or DeadLetterSnapshot(
            self._read_dead_letters,
            self._dead_letter_depth,
            preview_bytes=int(conf.get("conveyor_console_dead_letter_preview", 512)),
            interval=float(conf.get("conveyor_console_dead_letter_refresh", 5.0)),
        )
        self._queues: tuple[float, dict[str, Any]] | None = None

    # --- queues ---------------------------------------------------------------------------
    def queues(self) -> dict[str, Any]:
        """Depth, consumers, oldest waiting task and dead letters of every queue (cached 2 s)."""
        cached = self._queues
        if cached is not None and time.monotonic() - cached[0] < QUEUE_CACHE_SECONDS:
            return cached[1]
        snap = queue_stats.snapshot(self.app)
        oldest = self._oldest_waiting()
        by_origin = Counter(entry.queue for entry in self.snapshot.current.letters)
        rows = [
            {
                **stats.as_dict(),
                "oldest_waiting_seconds": oldest.get(name),
                "dead_letters": by_origin.get(name, 0),
            }
            for name, stats in snap.queues.items()
            if name != self.dead_letter_queue
        ]
        dead = snap.queues.get(self.dead_letter_queue)
        data = {
            "queues": rows,
            "queue_source": snap.source,
            "delayed_messages": snap.delayed,
            "dead_letters": {
                "queue": self.dead_letter_queue,
                "messages": dead.ready if dead else None,
            },
        }
        self._queues = (time.monotonic(), data)
        return data

    def _oldest_waiting(self) -> dict[str, float]:
        """queue -> age of its oldest waiting task, from the exporter's metrics when known."""
        if not self.exporter_url:
            return {}
        try:
            with urllib.request.urlopen(self.exporter_url, timeout=2) as response:
                text = response.read().decode()
        except OSError as exc:
            logger.warning("console: the exporter at %s did not answer: %s", "exporter", exc)
            return {}
        return {
            sample.labels["queue"]: float(sample.value)
            for family in text_string_to_metric_families(text)
            if family.name == OLDEST_METRIC
            for sample in family.samples
        }

    # --- batches --------------------------------------------------------------------------
    def batches(self, *, offset: int, limit: int, state: str | None) -> Page:
        found = batch_api.list_batches(app=self.app, limit=limit, offset=offset, state=state)
        return Page(found, batch_api.count_batches(app=self.app), offset, limit)

    def batch(self, batch_id: str, *, offset: int, limit: int) -> tuple[Status, Page] | None:
        """A batch's status and a page of its failures; None when there is no such batch."""
        try:
            status = batch_api.status(batch_id, app=self.app)
            found = batch_api.failures(batch_id, app=self.app, limit=limit, offset=offset)
            count = batch_api.failure_count(batch_id, app=self.app)
        except BatchNotFound:
            return None
        return status, Page(found, count, offset, limit)

    def cancel_batch(self, batch_id: str) -> bool:
        return batch_api.cancel(batch_id, app=self.app)

    def retry_batch(self, batch_id: str) -> int:
        return batch_api.retry(batch_id, app=self.app)

    # --- schedules ------------------------------------------------------------------------
    def schedules(self) -> list[dict[str, Any]]:
        """Every entry as `schedule list --json` shows it, with its last success."""
        last = {
            name: iso(at, timespec="seconds") for name, at in last_success.read(self.app).items()
        }
        return [
            {**view.as_dict(), "last_success": last.get(view.name)}
            for view in schedules.list_entries(self.app)
        ]

    def schedule_action(self, action: str, name: str) -> str | None:
        """Pause, resume, run now or remove an entry; run-now returns the task id."""
        if action == "run-now":
            return schedules.run_now(self.app, name)
        {"pause": schedules.pause, "resume": schedules.resume, "remove": schedules.remove}[action](
            self.app, name
        )
        return None

    # --- dead letters ---------------------------------------------------------------------
    def _dead_letter_depth(self) -> int | None:
        snap = queue_stats.from_passive_declare(self.app, [self.dead_letter_queue])
        found = snap.queues.get(self.dead_letter_queue)
        return found.ready if found else None

    def _read_dead_letters(self) -> list[Any]:
        with self._dead_letter_lock, self.app.connection_for_write() as connection:
            return dead_letters.list_entries(connection, self.dead_letter_queue)

    def dead_letters(
        self, *, queue: str | None, task: str | None, reason: str | None
    ) -> list[Entry]:
        select = dead_letters.matching(origin=queue, task=task, reason=reason)
        return [entry for entry in self.snapshot.current.letters if select(entry)]

    def dead_letter(self, entry_id: str) -> Entry | None:
        return next((x for x in self.snapshot.current.letters if x.id == entry_id), None)

    def replay(self, ids: set[str], *, force: bool) -> list[str]:
        """Replay the entries with these ids (the never-replayable ones only with force)."""
        conf = self.app.conf
        with self._dead_letter_lock, self.app.connection_for_write() as connection:
            done = dead_letters.replay(
                connection,
                self.dead_letter_queue,
                exchange=conf.conveyor_task_exchange,
                select=lambda entry: entry.id in ids,
                confirm_timeout=float(conf.conveyor_publish_timeout),
                force=force,
            )
        self.snapshot.request_refresh()
        return [entry.id for entry in done]

    def purge(self, ids: set[str] | None) -> int:
        """Delete the entries with these ids, or every entry (None)."""
        select = None if ids is None else (lambda entry: entry.id in ids)
        with self._dead_letter_lock, self.app.connection_for_write() as connection:
            removed = dead_letters.purge(connection, self.dead_letter_queue, select=select)
        self.snapshot.request_refresh()
        return int(removed)
