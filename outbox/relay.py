"""The relay: publishes committed outbox rows with pipelined confirms, then marks them.

Order. Each queue's rows are published in id order by one relay at a time: a relay takes the
queue's transaction-scoped advisory lock with ``pg_try_advisory_xact_lock`` (never waiting; a
queue another relay holds is skipped), reads up to ``batch_size`` waiting rows ``FOR UPDATE
SKIP LOCKED``, publishes them through one confirmed channel while PostgreSQL marks them
published in the same open transaction, and commits only once every confirm is in (a nack or a
confirm timeout rolls the marks back). Rows of one connection's transactions carry
increasing ids (identity values are taken in statement order, and a later transaction starts
after the earlier one committed), so per queue they go out in commit order. Several relays
share the work queue by queue; none ever waits for another.

Crashes. A relay killed mid-batch holds its row locks and the queue's lock only inside its
open transaction: PostgreSQL rolls it back when the connection drops, and the next relay to
look at the queue publishes the same rows again from the first unmarked one, in order and
under the same task ids. That is the duplicate bound: at most ``batch_size`` rows per killed
relay (or per failed commit), each a second message with the first one's task id.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from json import JSONDecoder
from pathlib import Path
from typing import Any

import psycopg
from celery.exceptions import NotRegistered
from kombu.exceptions import OperationalError
from kombu.utils.json import object_hook

from core.publisher import ConfirmedPublisher, PublishError, Route, route
from tasks.outbox import CHANNEL, TABLE
from workers.health import probe_path

logger = logging.getLogger(__name__)

#: First key of the advisory locks (the second is the queue's hash): a namespace of its own,
#: so the locks never meet an application's advisory locks that use one bigint key.
LOCK_NAMESPACE = 0x0C0E_0B0C

#: Waiting queues by a loose index scan (one index probe per queue, however long the backlog).
WAITING_QUEUES = f"""
WITH RECURSIVE q AS (
    (SELECT queue FROM {TABLE} WHERE published_at IS NULL ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT queue FROM {TABLE} WHERE published_at IS NULL AND queue > q.queue
            ORDER BY queue LIMIT 1)
    FROM q WHERE q.queue IS NOT NULL
)
SELECT queue FROM q WHERE queue IS NOT NULL
"""
LOCK_QUEUE = "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))"
CLAIM = f"""
SELECT id, task_id, task_name, args::text, kwargs::text, eta FROM {TABLE}
WHERE queue = %s AND published_at IS NULL ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED
"""
MARK = f"UPDATE {TABLE} SET published_at = clock_timestamp() WHERE id = ANY(%s)"
COUNT = (
    f"INSERT INTO {TABLE}_counters (name, value) VALUES (%s, %s) "
    f"ON CONFLICT (name) DO UPDATE SET value = {TABLE}_counters.value + EXCLUDED.value"
)
CLEANUP = f"""
DELETE FROM {TABLE} WHERE id IN (
    SELECT id FROM {TABLE} WHERE published_at < clock_timestamp() - make_interval(secs => %s)
    LIMIT 10000)
"""
#: Touched every loop: `python -m workers.health live --node outbox-relay` probes it.
LIVE_FILE = probe_path("outbox-relay", "live")
#: kombu's JSON loads with its type hook (datetimes, UUIDs... as Celery's serializer wrote them),
#: built once: kombu.utils.json.loads builds a new decoder on every call.
loads = JSONDecoder(object_hook=object_hook).decode
#: What the relay waits out and tries again: the broker or the database away.
RETRIED = (OperationalError, PublishError, ConnectionError, TimeoutError, psycopg.OperationalError)


@dataclass
class Settings:
    url: str
    batch_size: int = 500
    poll_interval: float = 1.0
    retention: int = 604800
    cleanup_interval: float = 60.0
    retry_interval: float = 1.0

    @classmethod
    def from_app(cls, app: Any, url: str | None = None) -> Settings:
        conf = app.conf
        url = url or conf.conveyor_outbox_url
        if not url:
            raise RuntimeError("set CONVEYOR_OUTBOX_URL (or CONVEYOR_OUTBOX_URL_FILE)")
        return cls(
            url=url,
            batch_size=int(conf.conveyor_outbox_batch_size),
            poll_interval=float(conf.conveyor_outbox_poll_interval),
            retention=int(conf.conveyor_outbox_retention),
            cleanup_interval=float(conf.conveyor_outbox_cleanup_interval),
            retry_interval=float(conf.conveyor_outbox_retry_interval),
        )


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


class Relay:
    """One relay process's loop; `stop` ends it after the batch in hand."""

    def __init__(self, app: Any, settings: Settings) -> None:
        # Celery subscribes the caller to each published task's result (a Redis round trip per
        # task, and subscriptions that pile up) unless the task ignores its result. The relay
        # never waits for results: with a disabled backend here, the messages still carry the
        # task's own ignore_result, and the workers store results as for any apply_async.
        app.backend_cls = "celery.backends.base:DisabledBackend"
        self.app = app
        self.settings = settings
        self.stopping = threading.Event()
        self._db: psycopg.Connection[Any] | None = None
        self._listener: psycopg.Connection[Any] | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._tasks: dict[str, Any] = {}
        self._routes: dict[tuple[str, str], Route | None] = {}
        self._marker = ThreadPoolExecutor(1, thread_name_prefix="conveyor-outbox-mark")
        self._last_cleanup = 0.0

    def run(self) -> None:
        """Relay until stopped, waiting out a broker or database that is away."""
        try:
            while not self.stopping.is_set():
                touch(LIVE_FILE)
                try:
                    moved = self.relay_once()
                    self.cleanup_if_due()
                except RETRIED as exc:
                    logger.warning("outbox relay: %s: %s; retrying", type(exc).__name__, exc)
                    self.reset()
                    self.stopping.wait(self.settings.retry_interval)
                    continue
                if moved == 0:
                    self.wait_for_rows(self.settings.poll_interval)
        finally:
            self.reset()
            self._marker.shutdown()

    def stop(self) -> None:
        self.stopping.set()

    def relay_once(self) -> int:
        """Publish one batch of every waiting queue no other relay holds; rows published."""
        db = self.db()
        queues = [row[0] for row in db.execute(WAITING_QUEUES).fetchall()]
        db.commit()
        return sum(self.relay_queue(queue) for queue in queues)

    def relay_queue(self, queue: str) -> int:
        """Publish, confirm and mark up to batch_size rows of `queue`, in one transaction."""
        db = self.db()
        try:
            with db.transaction():
                if not db.execute(LOCK_QUEUE, (LOCK_NAMESPACE, queue)).fetchone()[0]:  # type: ignore[index]
                    return 0  # another relay is publishing this queue
                rows = db.execute(CLAIM, (queue, self.settings.batch_size)).fetchall()
                if rows:
                    # PostgreSQL marks the rows (on the marker thread, which waits with the
                    # GIL released) while this thread publishes them; the marks are committed
                    # only after the last confirm.
                    marking = self._marker.submit(self.mark, db, queue, [row[0] for row in rows])
                    try:
                        self.publish(queue, rows)
                    finally:
                        # The connection is free again before the transaction ends; a failed
                        # publish is the error raised, not what the mark may raise after it.
                        wait([marking])
                    marked = marking.result()
                    self.publisher().wait(0)
                    return marked
                return 0
        except RETRIED:
            self.count_failure(queue)
            raise

    @staticmethod
    def mark(db: psycopg.Connection[Any], queue: str, ids: list[int]) -> int:
        """Mark the rows published and count them, in the caller's open transaction."""
        db.execute(MARK, (ids,))
        db.execute(COUNT, (f"published:{queue}", len(ids)))
        return len(ids)

    def publish(self, queue: str, rows: Iterable[tuple[Any, ...]]) -> None:
        """Send every row, and flush them to the broker; the caller waits for the confirms.

        A row due now goes along its task's worked-out Route (core.publisher.send_routed);
        a row with a future eta, or a task whose options are worked out per call, takes the
        full apply_async path, which also sends it through the broker's delayed delivery.
        """
        publisher = self.publisher()
        now = datetime.now(UTC)
        for _id, task_id, name, args, kwargs, eta in rows:
            task = self.task(name)
            routed = self.route(task, queue) if eta is None or eta <= now else None
            if routed is not None:
                publisher.send_routed(routed, task_id, loads(args), loads(kwargs), args, kwargs)
                continue
            publisher.send(
                task,
                loads(args),
                task_id,
                args,
                kwargs=loads(kwargs),
                kwargsrepr=kwargs,
                queue=queue,
                eta=eta,
                ignore_result=bool(task.ignore_result),
            )
        publisher.flush()

    def route(self, task: Any, queue: str) -> Route | None:
        key = (task.name, queue)
        if key not in self._routes:
            self._routes[key] = route(self.app, task, queue)
        return self._routes[key]

    def task(self, name: str) -> Any:
        """The registered task, or a stand-in of the app's base class for a name that this
        process does not import (the relay publishes by name; only the worker runs it)."""
        task = self._tasks.get(name)
        if task is None:
            try:
                task = self.app.tasks[name]
            except NotRegistered:
                task = type("OutboxTask", (self.app.Task,), {"name": name})()
            self._tasks[name] = task
        return task

    def count_failure(self, queue: str) -> None:
        try:
            with self.connect(autocommit=True) as db:
                db.execute(COUNT, (f"failures:{queue}", 1))
        except psycopg.Error as exc:
            logger.warning("outbox relay: cannot count the failure: %s", exc)

    def cleanup_if_due(self) -> None:
        """Delete published rows past the retention period, at most every cleanup_interval."""
        now = time.monotonic()
        if now - self._last_cleanup < self.settings.cleanup_interval:
            return
        self._last_cleanup = now
        db = self.db()
        with db.transaction():
            deleted = db.execute(CLEANUP, (self.settings.retention,)).rowcount
        if deleted:
            logger.info("outbox relay: deleted %d published rows past retention", deleted)

    def wait_for_rows(self, timeout: float) -> None:
        """Sleep until a transaction with outbox rows commits (NOTIFY) or `timeout` passes."""
        listener = self.listener()
        for _ in listener.notifies(timeout=timeout, stop_after=1):
            pass

    def connect(self, **options: Any) -> psycopg.Connection[Any]:
        # The name shows which relay process holds a session in pg_stat_activity.
        name = f"conveyor-outbox-relay:{os.getpid()}"
        return psycopg.connect(
            self.settings.url, connect_timeout=5, application_name=name, **options
        )

    def db(self) -> psycopg.Connection[Any]:
        if self._db is None or self._db.closed:
            self._db = self.connect()
        return self._db

    def listener(self) -> psycopg.Connection[Any]:
        if self._listener is None or self._listener.closed:
            self._listener = self.connect(autocommit=True)
            self._listener.execute(f"LISTEN {CHANNEL}")
        return self._listener

    def publisher(self) -> ConfirmedPublisher:
        if self._publisher is None:
            self._publisher = ConfirmedPublisher(self.app, max_unconfirmed=1000)
        return self._publisher

    def reset(self) -> None:
        """Drop every connection; the next use opens a new one."""
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.connection.release()
        for conn in (self._db, self._listener):
            if conn is not None:
                conn.close()
        self._db = self._listener = None
