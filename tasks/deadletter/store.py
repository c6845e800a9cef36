"""Read, replay and purge the dead-letter queue without ever losing a message.

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
from typing import Any

from kombu import Connection, Producer, Queue

#: Headers RabbitMQ adds on dead-lettering; a replayed message starts a fresh history.
_DEATH_HEADERS = ("x-death", "x-delivery-count")
_DEATH_PREFIXES = ("x-first-death-", "x-last-death-")
REPLAYS_HEADER = "x-conveyor-replays"


@dataclass(frozen=True)
class Entry:
    """One dead-lettered message and why it is there."""

    id: str
    task: str | None
    queue: str | None
    reason: str | None
    deaths: int
    died_at: str | None
    content_type: str | None
    size: int
    headers: dict[str, Any] = field(repr=False)
    properties: dict[str, Any] = field(repr=False)
    body: bytes = field(repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task": self.task,
            "queue": self.queue,
            "reason": self.reason,
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
    return Entry(
        id=str(task_id),
        task=headers.get("task"),
        queue=last.get("queue"),
        reason=last.get("reason"),
        deaths=int(sum(int(d.get("count", 1)) for d in deaths)),
        died_at=died_at.isoformat() if hasattr(died_at, "isoformat") else died_at,
        content_type=message.content_type,
        size=len(body),
        headers=headers,
        properties=properties,
        body=body,
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


def list_entries(
    connection: Connection, queue: str, *, origin: str | None = None, task: str | None = None
) -> list[Entry]:
    """The dead-lettered messages, optionally only those from queue `origin` or task `task`."""
    with held(connection, queue) as messages:
        return [
            entry
            for entry, _ in messages
            if (origin is None or entry.queue == origin) and (task is None or entry.task == task)
        ]


def find(connection: Connection, queue: str, entry_id: str) -> Entry | None:
    return next((e for e in list_entries(connection, queue) if e.id == entry_id), None)


def replay(
    connection: Connection,
    queue: str,
    *,
    exchange: str,
    select: Callable[[Entry], bool],
    dry_run: bool = False,
    confirm_timeout: float = 10.0,
) -> list[Entry]:
    """Republish the selected messages to their original queue; returns what was replayed.

    The copy keeps the message's id, task name, arguments and properties; it is routed through
    `exchange` with the original queue's name as routing key (Conveyor binds each queue by its
    name), and the dead-letter copy is acked only after the broker confirmed the new one.
    """
    replayed: list[Entry] = []
    # A connection opened with confirm_publish makes py-amqp wait for each confirm inside
    # basic_publish (and raise on nack, timeout or channel error). Calling confirm_select() on
    # an ordinary channel is not enough: publish would return before the broker answered, and
    # the ack below would drop a message whose copy the broker refused (found by
    # test_an_interrupted_replay_leaves_the_message_in_the_dead_letter_queue).
    options = {**(connection.transport_options or {}), "confirm_publish": True}
    publisher = connection.clone(transport_options=options)
    try:
        publish_channel: Any = publisher.channel()
        producer = Producer(publish_channel)
        with held(connection, queue) as messages:
            for entry, message in messages:
                if not select(entry) or entry.queue is None:
                    continue
                replayed.append(entry)
                if dry_run:
                    continue
                headers = {
                    k: v
                    for k, v in entry.headers.items()
                    if k not in _DEATH_HEADERS and not k.startswith(_DEATH_PREFIXES)
                }
                headers[REPLAYS_HEADER] = int(headers.get(REPLAYS_HEADER, 0)) + 1
                properties = {
                    k: v
                    for k, v in entry.properties.items()
                    if k
                    in (
                        "correlation_id",
                        "reply_to",
                        "priority",
                        "message_id",
                        "expiration",
                        "type",
                    )
                }
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
                # Reached only once the broker confirmed the publish (confirm mode raises
                # otherwise): now the dead-letter copy may go.
                message.ack()
    finally:
        publisher.close()
    return replayed


def purge(connection: Connection, queue: str) -> int:
    """Delete every message in the dead-letter queue; returns how many there were."""
    channel: Any = connection.channel()
    try:
        return int(channel.queue_purge(queue) or 0)
    finally:
        channel.close()
