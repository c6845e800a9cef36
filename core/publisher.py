"""Publishing many chunk messages with pipelined publisher confirms.

Celery's own publish path, with ``confirm_publish``, waits for the broker's confirm after
every message: one network round trip per chunk. Here the channel is put in confirm mode by
hand, messages go out back to back, and the broker's acks (which may each cover many messages)
are collected as they arrive. At most ``max_unconfirmed`` messages are in flight, so a slow
broker slows the producer down instead of letting the backlog grow, and ``close()`` returns
only when every message is confirmed. A nack, a lost connection or a confirm that does not
come within ``timeout`` raises: the caller never believes an unconfirmed chunk was published.

Messages sent back to back leave in full TCP segments (Linux's TCP_CORK, set while sending and
cleared before any wait for confirms, and before a publish that declares its queue, a round
trip that a held request would stall): py-amqp writes each message with its own ``sendall``,
and with TCP_NODELAY each became a segment of its own, which the broker then read one by one.
On the 2-core development machine that took the relay's CPU per message from about 180 to 130
µs and the broker's as much again (docs/performance.md). A caller that pauses between sends
leaves its last partial segment in the kernel until the next wait, or at most 200 ms (the
kernel's own limit on a cork); ``flush()`` sends it at once.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import amqp.exceptions
import celery
from celery.utils.nodenames import anon_nodename
from kombu.exceptions import OperationalError

from core.events import sent_events

#: What py-amqp and the socket raise when the broker refuses a publish or cannot be reached:
#: a wrong password (AccessRefused), a missing vhost (NotAllowed), a closed connection, a
#: nack, a timeout. None of them is a kombu OperationalError.
RAW_BROKER_ERRORS: tuple[type[Exception], ...] = (
    amqp.exceptions.AMQPError,
    amqp.exceptions.MessageNacked,
    OSError,  # ConnectionError, TimeoutError, socket errors
)


#: Linux only; elsewhere messages go out as py-amqp writes them.
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)


class BrokerError(OperationalError):
    """The broker refused the publish or could not be reached; the original is __cause__.

    A subclass of kombu.exceptions.OperationalError, the one error a caller needs to catch
    for any broker failure at publish.
    """


class PublishError(BrokerError):
    """The broker refused (nacked) a message or did not confirm it in time."""


@contextmanager
def typed_broker_errors() -> Iterator[None]:
    """Raise py-amqp's and the socket's errors as BrokerError (an OperationalError)."""
    try:
        yield
    except OperationalError:
        raise
    except RAW_BROKER_ERRORS as exc:
        raise BrokerError(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Route:
    """What Celery's apply_async and send_task work out for one task name and queue before
    building a message: the exec options, the router's destination, the limits. They are the
    same for every message of the pair, so a publisher of many works them out once (route)."""

    name: str
    time_limit: float | None
    soft_time_limit: float | None
    ignore_result: bool
    options: dict[str, Any]


def route(app: Any, task: Any, queue: str | None = None) -> Route | None:
    """The Route of `task` to `queue` (None: where the router sends it), as send_task would
    compute it for an immediate publish; None when a message needs the full path: a task whose
    `expires` or shadow name is worked out per call."""
    if getattr(task, "expires", None) is not None:
        return None
    if getattr(task.shadow_name, "__func__", None) is not celery.Task.shadow_name:
        return None
    # As Task.apply_async merges them: None values included (a None priority, say, is sent
    # as no priority rather than kombu's default 0).
    options = dict(task._get_exec_options())
    time_limit = options.pop("time_limit", None)
    soft_time_limit = options.pop("soft_time_limit", None)
    options.pop("expires", None)
    if queue is not None:
        options["queue"] = queue
    options = app.amqp.router.route(options, task.name, (), {}, task)
    return Route(task.name, time_limit, soft_time_limit, bool(task.ignore_result), options)


class ConfirmedPublisher:
    """A producer whose publishes are confirmed in a pipeline, not one round trip each."""

    def __init__(self, app: Any, *, max_unconfirmed: int = 100, timeout: float = 10.0) -> None:
        self.app = app
        self.max_unconfirmed = max(1, int(max_unconfirmed))
        self.timeout = float(timeout)
        self.published = 0
        self._unconfirmed: set[int] = set()
        self._nacked = 0
        self._declared: set[str] = set()
        self._write_timeout = float(app.conf.conveyor_publish_timeout)
        # The producer role may not declare (conveyor_declare_on_publish, tasks.base).
        self._declare = bool(app.conf.conveyor_declare_on_publish)
        # The app's broker settings (URL, TLS, login, timeouts) with confirms switched to this
        # class's own handling. Heartbeats would need a thread to answer them while a slow
        # input is read; without them a dead broker still shows, as a failing publish or a
        # confirm timeout. write_timeout is py-amqp's SO_SNDTIMEO: as apply_async's per-call
        # timeout (tasks.base.publish_options), a broker that stops reading (a memory alarm)
        # fails the socket write within conveyor_publish_timeout instead of blocking it
        # forever, without py-amqp setting and restoring the socket's timeout around each
        # message.
        self.connection = app.connection_for_write(
            heartbeat=0,
            transport_options={"confirm_publish": False, "write_timeout": self._write_timeout},
        )
        with typed_broker_errors():
            channel: Any = self.connection.default_channel  # py-amqp's Channel underneath
        self._socket: socket.socket = self.connection.connection.sock
        self._corked = False
        # The origin header Celery would work out for each message (this process's node name:
        # a hostname lookup and formatting, about 4% of a routed publish).
        self._origin = anon_nodename()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        # Every publish on this channel takes the next delivery tag, including Celery's
        # task-sent events, so the count is kept where all of them pass.
        send = channel.basic_publish

        def counted(*args: Any, **kwargs: Any) -> Any:
            kwargs.pop("confirm_timeout", None)
            result = send(*args, **kwargs)
            self.published += 1
            self._unconfirmed.add(self.published)
            return result

        channel.basic_publish = counted
        self.producer = app.amqp.Producer(channel)
        # The process's buffered task-sent events (lists of conveyor_sent_event_batch),
        # flushed once every task is confirmed.
        self.events = sent_events(app) if app.conf.task_send_sent_event else None

    def _on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self._unconfirmed = {t for t in self._unconfirmed if t > tag}
        else:
            self._unconfirmed.discard(tag)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._nacked += 1
        self._on_ack(tag, multiple)

    def send(
        self,
        task: Any,
        args: list[Any],
        task_id: str,
        argsrepr: str,
        *,
        ignore_result: bool = True,
        **options: Any,
    ) -> None:
        """Publish one task message; waits only when too many are unconfirmed.

        `argsrepr` is what Flower and the logs show for the arguments: Celery would otherwise
        walk the whole chunk to build it, which costs more than serialising it.
        """
        route = str(options.get("queue") or task.name)
        if route in self._declared:
            # Declaring on publish (conveyor_declare_on_publish) is done with the first message
            # of each queue only: kombu's per-publish check of an already declared queue costs
            # about a tenth of a bulk publish.
            options.setdefault("declare", [])
        self._coalesce(declaring=self._declare and route not in self._declared)
        self._declared.add(route)
        if self.events is not None:
            options.setdefault("event_dispatcher", self.events)
        task.apply_async(
            args,
            task_id=task_id,
            producer=self.producer,
            retry=False,
            ignore_result=ignore_result,
            argsrepr=argsrepr,
            **{"kwargsrepr": "{}", **options},
        )
        self.wait(self.max_unconfirmed)

    def send_routed(
        self,
        route: Route,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        argsrepr: str,
        kwargsrepr: str,
    ) -> None:
        """Publish one task message along a worked-out Route: Celery's own message building
        and sending (amqp.create_task_message, amqp.send_task_message, with their signals,
        serializer and sent event) without apply_async's per-call work. That work costs about
        twice the publish itself; the caller has already checked the arguments (a relay
        publishes rows written through check_publishable)."""
        amqp = self.app.amqp
        options = route.options
        message = amqp.create_task_message(
            task_id,
            route.name,
            args,
            kwargs,
            reply_to=self.app.thread_oid,
            time_limit=route.time_limit,
            soft_time_limit=route.soft_time_limit,
            create_sent_event=self.events is not None,
            ignore_result=route.ignore_result,
            argsrepr=argsrepr,
            kwargsrepr=kwargsrepr,
            origin=self._origin,
            **options,
        )
        queue = str(options["queue"].name)
        declaring = self._declare and queue not in self._declared
        self._coalesce(declaring)
        # The socket's write timeout is the connection's (__init__): no per-call timeout.
        with typed_broker_errors():
            amqp.send_task_message(
                self.producer,
                route.name,
                message,
                # None: Celery declares the queue (the first message of each, as send does).
                declare=None if declaring else [],
                retry=False,
                event_dispatcher=self.events,
                **options,
            )
        self._declared.add(queue)
        self.wait(self.max_unconfirmed)

    def _coalesce(self, declaring: bool) -> None:
        """Cork the socket for a plain publish; flush it before one that declares its queue,
        whose declare is a round trip that a corked request would hold up (see the module)."""
        if declaring:
            self.flush()
        elif not self._corked and _TCP_CORK is not None:
            with typed_broker_errors():
                self._socket.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)
            self._corked = True

    def flush(self) -> None:
        """Send the messages the kernel still holds for a full segment (see the module)."""
        if self._corked and _TCP_CORK is not None:
            with typed_broker_errors():
                self._socket.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 0)
            self._corked = False

    def wait(self, at_most: int = 0) -> None:
        """Wait until at most `at_most` messages are unconfirmed."""
        deadline = time.monotonic() + self.timeout
        if len(self._unconfirmed) > at_most:
            self.flush()  # a message still in the kernel cannot be confirmed
        while len(self._unconfirmed) > at_most:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError(
                    f"{len(self._unconfirmed)} messages unconfirmed after {self.timeout}s"
                )
            self._drain(remaining)
        if self._nacked:
            raise PublishError(f"the broker refused {self._nacked} message(s)")
        if at_most == 0 and self.events is not None:
            # Every task is confirmed: their task-sent events may follow.
            self.events.flush()

    def _drain(self, timeout: float) -> None:
        """Take in the broker's acks and nacks for at most `timeout` seconds."""
        # TimeoutError (socket.timeout is the same class): nothing came yet.
        with typed_broker_errors(), suppress(TimeoutError):
            self.connection.drain_events(timeout=timeout)

    def close(self) -> None:
        try:
            self.wait(0)
        finally:
            self.connection.release()

    def __enter__(self) -> ConfirmedPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.connection.release()
