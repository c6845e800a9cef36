"""Queue depth over AMQP itself: one passive ``queue.declare`` per queue.

A passive declare returns a queue's ready-message and consumer counts without the management
plugin, and never creates or changes a queue. A queue that does not exist answers 404, which
closes the channel: the next queue gets a new one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kombu import Connection


@dataclass(frozen=True)
class Depth:
    messages: int  # ready, not counting those delivered and not yet acknowledged
    consumers: int


def passive_depths(connection: Connection, names: Iterable[str]) -> dict[str, Depth | None]:
    """Each queue's Depth, in the order given; None for a queue that does not exist."""
    depths: dict[str, Depth | None] = {}
    channel: Any = connection.channel()
    try:
        for name in names:
            try:
                _, messages, consumers = channel.queue_declare(queue=name, passive=True)
            except connection.channel_errors:
                depths[name] = None
                channel = connection.channel()
                continue
            depths[name] = Depth(int(messages), int(consumers))
    finally:
        try:
            channel.close()
        except connection.connection_errors + connection.channel_errors:
            pass
    return depths
