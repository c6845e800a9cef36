"""Read, replay and purge the dead-letter queue without ever losing a message.

Each entry says why it is there. A message the worker dead-lettered itself carries Conveyor's
reason headers (core/dead_letters.py): ``content_disallowed``, ``undecodable``, ``malformed``,
``unknown_task`` or ``retries_exhausted``, with the exception, a short redacted message, the
worker, the time and the queue. For one the broker dead-lettered, the reason is RabbitMQ's own
from ``x-death``: ``delivery_limit``, ``expired`` (a scheduled run also names its schedule
entry) or ``rejected``. The first four worker reasons can never succeed as they are: replay
skips them unless forced.

Reading takes every message with basic.get and does not ack it: closing the channel hands all
of them back to RabbitMQ, in order. Replaying publishes a copy to the original queue on a
channel in confirm mode and acks the dead-letter copy only after the broker confirmed the
publish, so an interrupted replay leaves the message in the dead-letter queue (at worst it is
then in both places, and runs once more: tasks are at-least-once anyway).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kombu import Connection, Producer, Queue

from core import dead_letters as reasons

#: Headers RabbitMQ and the worker add on dead-lettering; a replayed message starts afresh.
_DEATH_HEADERS = ("x-death", "x-delivery-count", *reasons.REASON_HEADERS)
_DEATH_PREFIXES = ("x-first-death-", "x-last-death-")
REPLAYS_HEADER = "x-conveyor-replays"
#: The header beat puts on a scheduled run: a wire name shared with the schedule feature
#: (tasks.schedule.entries.ENTRY_HEADER; a unit test holds them equal), not an import of it.
SCHEDULE_HEADER = "conveyor_schedule"


@dataclass(frozen=True)
class Entry:
    """One dead-lettered message and why it is there."""

    id: str
    task: str | None
    queue: str | None
    #: Conveyor's reason (see the module's docstring); RabbitMQ's when the broker dead-lettered.
    reason: str | None
    deaths: int
    died_at: str | None
    content_type: str | None
    size: int
    headers: dict[str, Any] = field(repr=False)
    properties: dict[str, Any] = field(repr=False)
    body: bytes = field(repr=False)
    exception: str | None = None
    message: str | None = None
    worker: str | None = None
    failed_at: str | None = None
    #: The schedule entry of a scheduled run, else None.
    schedule: str | None = None
    #: False when the message itself is at fault: replaying it can never succeed.
    replayable: bool = True

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task": self.task,
            "queue": self.queue,
            "reason": self.reason,
            "exception": self.exception,
            "message": self.message,
            "worker": self.worker,
            "failed_at": self.failed_at,
            "schedule": self.schedule,
            "replayable": self.replayable,
            "deaths": self.deaths,
            "died_at": self.died_at,
            "content_type": self.content_type,
            "size": self.size,
        }

    def details(self) -> dict[str, Any]:
        """Everything an operator needs to decide: arguments decoded when they are JSON."""
        try:
            body: Any = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            body = self.body[:2000].decode("utf-8", errors="replace")
        return {
            **self.summary(),
            "headers": _jsonable(self.headers),
            "properties": _jsonable(self.properties),
            "body": body,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def entry_from(message: Any) -> Entry:
    headers = dict(message.headers or {})
    properties = dict(message.properties or {})
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    deaths = headers.get("x-death") or []
    last = deaths[0] if deaths else {}
    task_id = headers.get("id") or properties.get("correlation_id") or properties.get("message_id")
    if not task_id:
        task_id = "sha1:" + hashlib.sha1(body).hexdigest()[:16]
    died_at: Any = last.get("time")
    if isinstance(died_at, datetime):
        # AMQP timestamps are whole seconds since the epoch; py-amqp gives them naive.
        died_at = (died_at if died_at.tzinfo else died_at.replace(tzinfo=UTC)).isoformat()
    reason = _text(headers.get(reasons.REASON_HEADER)) or _text(last.get("reason"))
    failed_at = _text(headers.get(reasons.FAILED_AT_HEADER))
    return Entry(
        id=str(task_id),
        task=headers.get("task"),
        queue=_text(headers.get(reasons.QUEUE_HEADER)) or _text(last.get("queue")),
        reason=reason,
        deaths=int(sum(int(d.get("count", 1)) for d in deaths)),
        died_at=failed_at or died_at,
        content_type=message.content_type,
        size=len(body),
        headers=headers,
        properties=properties,
        body=body,
        exception=_text(headers.get(reasons.EXCEPTION_HEADER)),
        message=_text(headers.get(reasons.MESSAGE_HEADER)),
        worker=_text(headers.get(reasons.WORKER_HEADER)),
        failed_at=failed_at or died_at,
        schedule=_text(headers.get(SCHEDULE_HEADER)),
        replayable=reason not in reasons.NEVER_REPLAYABLE,
    )


@contextmanager
def held(connection: Connection, queue: str) -> Iterator[list[tuple[Entry, Any]]]:
    """Every message in `queue`, held unacked; whatever is not acked goes back on exit."""
    channel: Any = connection.channel()
    try:
        bound = Queue(queue, no_declare=True).bind(channel)
        messages = []
        while True:
            message = bound.get(no_ack=False, accept=None)
            if message is None:
                break
            messages.append((entry_from(message), message))
        yield messages
    finally:
        # Closing the channel returns every unacked message to the queue.
        channel.close()


def matching(
    *, origin: str | None = None, task: str | None = None, reason: str | None = None
) -> Callable[[Entry], bool]:
    """A selection: the entries from queue `origin`, of task `task`, with reason `reason`."""
    wanted = {"queue": origin, "task": task, "reason": reason}
    return lambda entry: all(v is None or getattr(entry, k) == v for k, v in wanted.items())


def list_entries(
    connection: Connection,
    queue: str,
    *,
    origin: str | None = None,
    task: str | None = None,
    reason: str | None = None,
) -> list[Entry]:
    """The dead-lettered messages, optionally only those from queue `origin`, of task `task`
    or with reason `reason`."""
    select = matching(origin=origin, task=task, reason=reason)
    with held(connection, queue) as messages:
        return [entry for entry, _ in messages if select(entry)]


def find(connection: Connection, queue: str, entry_id: str) -> Entry | None:
    return next((e for e in list_entries(connection, queue) if e.id == entry_id), None)


#: Properties a replayed copy keeps.
_REPLAYED_PROPERTIES = (
    "correlation_id",
    "reply_to",
    "priority",
    "message_id",
    "expiration",
    "type",
)


def replay(
    connection: Connection,
    queue: str,
    *,
    exchange: str,
    select: Callable[[Entry], bool],
    dry_run: bool = False,
    confirm_timeout: float = 10.0,
    force: bool = False,
    on_skip: Callable[[Entry], None] | None = None,
) -> list[Entry]:
    """Republish the selected messages to their original queue; returns what was replayed.

    The copy keeps the message's id, task name, arguments and properties; it is routed through
    `exchange` with the original queue's name as routing key (Conveyor binds each queue by its
    name), and the dead-letter copy is acked only after the broker confirmed the new one.
    A selected entry that can never succeed (not `replayable`) stays, and is passed to
    `on_skip`, unless `force`.
    """
    replayed: list[Entry] = []
    with _confirming_producer(connection) as producer, held(connection, queue) as messages:
        for entry, message in messages:
            if not select(entry) or entry.queue is None:
                continue
            if not (entry.replayable or force):
                if on_skip is not None:
                    on_skip(entry)
                continue
            replayed.append(entry)
            if not dry_run:
                _republish(producer, entry, exchange, confirm_timeout)
                # Reached only once the broker confirmed the publish (confirm mode raises
                # otherwise): now the dead-letter copy may go.
                message.ack()
    return replayed


@contextmanager
def _confirming_producer(connection: Connection) -> Iterator[Producer]:
    """A producer on a clone of `connection` whose publish returns once the broker confirmed.

    A connection opened with confirm_publish makes py-amqp wait for each confirm inside
    basic_publish (and raise on nack, timeout or channel error). Calling confirm_select() on
    an ordinary channel is not enough: publish would return before the broker answered, and
    replay would ack a dead letter whose copy the broker refused (found by
    test_an_interrupted_replay_leaves_the_message_in_the_dead_letter_queue).
    """
    options = {**(connection.transport_options or {}), "confirm_publish": True}
    publisher = connection.clone(transport_options=options)
    try:
        yield Producer(publisher.channel())
    finally:
        publisher.close()


def _republish(producer: Producer, entry: Entry, exchange: str, confirm_timeout: float) -> None:
    headers = {
        k: v
        for k, v in entry.headers.items()
        if k not in _DEATH_HEADERS and not k.startswith(_DEATH_PREFIXES)
    }
    headers[REPLAYS_HEADER] = int(headers.get(REPLAYS_HEADER, 0)) + 1
    properties = {k: v for k, v in entry.properties.items() if k in _REPLAYED_PROPERTIES}
    producer.publish(
        entry.body,
        exchange=exchange,
        routing_key=entry.queue,
        headers=headers,
        content_type=entry.content_type or "application/octet-stream",
        content_encoding=entry.properties.get("content_encoding") or "binary",
        delivery_mode=2,
        confirm_timeout=confirm_timeout,
        **properties,
    )


def purge(
    connection: Connection, queue: str, *, select: Callable[[Entry], bool] | None = None
) -> int:
    """Delete the selected messages (every message when `select` is None); returns how many.

    A selection is read like a listing: the selected messages are acked, the rest go back.
    """
    if select is not None:
        with held(connection, queue) as messages:
            chosen = [message for entry, message in messages if select(entry)]
            for message in chosen:
                message.ack()
            return len(chosen)
    channel: Any = connection.channel()
    try:
        return int(channel.queue_purge(queue) or 0)
    finally:
        channel.close()
