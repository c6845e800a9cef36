"""The base class of every Conveyor task: bounded, broker-friendly publishing."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

import amqp.exceptions
import celery
import kombu.exceptions
import kombu.utils.json as kombu_json
import redis
import redis.exceptions
from celery.exceptions import Reject, Retry
from celery.utils.log import get_task_logger

from core import forks
from core.dead_letters import RetriesExhausted
from core.events import sent_events
from core.publisher import typed_broker_errors
from core.redis import client as redis_client
from tasks.idempotency import EffectInProgress, Outcome, run_once, run_once_in_redis

T = TypeVar("T")
logger = get_task_logger(__name__)

#: Errors worth another attempt: a service (Redis, RabbitMQ, a socket) was briefly unreachable
#: or slow. The client libraries raise their own classes, none of them subclasses of the
#: builtins, so each is named. Every Conveyor task retries these (Task.autoretry_for).
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    ConnectionError,  # builtin: refused, reset, broken pipe
    TimeoutError,  # builtin, and socket.timeout
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,  # kombu's wrapper of a failed publish or connect
    amqp.exceptions.RecoverableConnectionError,  # connection closed or forced by the broker
)
#: What runs before every task starts, in the worker: (task, task_id) -> None. A feature adds
#: its own with `on_before_start` from its connect() (tasks/celery_app.py calls those); raising
#: celery.exceptions.Ignore skips the run. This class knows no feature.
BeforeStart = Callable[["Task", str], None]
BEFORE_START: list[BeforeStart] = []


def on_before_start(hook: BeforeStart) -> BeforeStart:
    """Run `hook` before every task starts (once, however often it is registered)."""
    if hook not in BEFORE_START:
        BEFORE_START.append(hook)
    return hook


#: Message header counting how often a task waited out another delivery's idempotency lease.
LEASE_WAITS_HEADER = "conveyor_lease_waits"
#: Seconds of random delay added to a lease wait, so that copies waiting on one key spread out.
LEASE_WAIT_JITTER = 2.0


def lease_waits(request: Any) -> int:
    """How many lease waits the running delivery has behind it (its message header)."""
    try:
        return max(0, int(getattr(request, LEASE_WAITS_HEADER, 0) or 0))
    except (TypeError, ValueError):
        return 0


def lease_wait_countdown(retry_after: float, rng: random.Random | None = None) -> float:
    """Seconds until a delivery blocked by a lease tries again: its remaining time + jitter."""
    return max(0.0, retry_after) + (rng or random).uniform(0, LEASE_WAIT_JITTER)


class InvalidArguments(ValueError):
    """The arguments cannot be published for this task (see check_publishable)."""


class ArgumentsMismatch(InvalidArguments, TypeError):
    """The arguments don't bind to the task's signature. Also a TypeError, which is what
    Celery's own check raised before."""


class ArgumentsTooLarge(InvalidArguments):
    """The serialized arguments exceed conveyor_max_argument_bytes: pass an id, not the data."""


def encode_arguments(args: Any, kwargs: Any) -> str:
    """args + kwargs as compact JSON, with Celery's JSON encoder (kombu's: Decimal, datetime,
    date, time, UUID and bytes travel tagged and come back as the same type in the worker).
    InvalidArguments names what cannot travel."""
    try:
        return kombu_json.dumps([args or (), kwargs or {}], separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidArguments(f"task arguments are not JSON-serialisable: {exc}") from exc


def argument_size(args: Any, kwargs: Any) -> int | None:
    """Bytes of args + kwargs as compact JSON; None when they do not serialize."""
    try:
        return len(encode_arguments(args, kwargs))
    except InvalidArguments:
        return None


def check_argument_size(args: Any, kwargs: Any, limit: int, size: int | None = None) -> None:
    """Raise ArgumentsTooLarge when args + kwargs serialize to more than `limit` bytes."""
    size = argument_size(args, kwargs) if size is None else size
    if size is not None and size > limit:
        raise ArgumentsTooLarge(
            f"task arguments serialize to {size} bytes; the limit is {limit} "
            "(conveyor_max_argument_bytes). Store the data elsewhere and pass its id."
        )


def check_binding(task: Any, args: Any, kwargs: Any) -> None:
    """Raise ArgumentsMismatch unless args and kwargs bind to the task's signature."""
    if args is not None and not isinstance(args, list | tuple):
        raise ArgumentsMismatch(f"{task.name}: args must be a list or tuple, not {type(args)}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ArgumentsMismatch(f"{task.name}: kwargs must be a dict, not {type(kwargs)}")
    header = getattr(task, "__header__", None)
    if header is None or not getattr(task, "typing", True):
        return  # a class-based task, or one that asked for no checking (typing=False)
    try:
        header(*(args or ()), **(kwargs or {}))
    except TypeError as exc:
        raise ArgumentsMismatch(f"{task.name}: {exc}") from exc


def check_publishable(task: Any, args: Any, kwargs: Any) -> None:
    """Raise ValueError (InvalidArguments or a subclass) unless the call can be published and
    used: the arguments bind to the signature, serialize to JSON as Celery sends them, stay
    within conveyor_max_argument_bytes, and pass the task's own `validate_arguments` hook.

    Runs in the caller's process (Task.apply_async calls it), so a bad call fails there and
    nothing is published.
    """
    check_binding(task, args, kwargs)
    try:
        size = len(encode_arguments(args, kwargs))
    except InvalidArguments as exc:
        raise InvalidArguments(f"{task.name}: {exc}") from exc.__cause__
    check_argument_size(args, kwargs, int(task.app.conf.conveyor_max_argument_bytes), size)
    validate = getattr(task, "validate_arguments", None)
    if validate is None:
        return
    try:
        validate(tuple(args or ()), dict(kwargs or {}))
    except TypeError as exc:
        raise InvalidArguments(f"{task.name}: {exc}") from exc


def publish_options(
    options: dict[str, Any],
    *,
    publish_timeout: float,
    now: datetime,
    declare_on_publish: bool = True,
) -> dict[str, Any]:
    """Return apply_async options with bounded waits and a delay the broker can carry.

    Native delayed delivery has whole-second resolution and Celery truncates the delay with
    int(), so `countdown=0.5` raises ValueError and `countdown=1.7` runs 0.7 s early. The delay
    is rounded up instead: a job never runs before its time, and at most 1 s after it.
    """
    options = dict(options)
    if not declare_on_publish:
        # The producer role may only publish: declaring the queue needs `configure` on it,
        # which would also let a web app delete it. The topology comes from provisioning.
        options.setdefault("declare", [])
    options.setdefault("timeout", publish_timeout)
    options.setdefault("confirm_timeout", publish_timeout)

    eta = options.pop("eta", None)
    countdown = options.pop("countdown", None)
    if eta is not None and countdown is None:
        if isinstance(eta, str):
            eta = datetime.fromisoformat(eta)
        if eta.tzinfo is None:
            eta = eta.replace(tzinfo=UTC)
        countdown = (eta - now).total_seconds()
    if countdown is not None:
        delay = math.ceil(float(countdown))
        if delay > 0:
            options["countdown"] = delay
    return options


class Task(celery.Task):  # type: ignore[type-arg]
    """Bounded publishing, transient-error retries, and dead-lettering when retries run out.

    - every apply_async checks its arguments first (check_publishable: ValueError, nothing
      published), gets publish/confirm timeouts and whole-second delays, and raises only
      kombu's OperationalError for a broker failure (core.publisher.BrokerError);
    - TRANSIENT_ERRORS retry with exponential backoff and full jitter: retry n (from 0) waits
      a random 0 to min(2**n, retry_backoff_max) seconds, at most `max_retries` times, so with
      the defaults all five retries fit in 31 s (15.5 s on average); a task may change these;
    - a busy idempotency lease (EffectInProgress) is waited out instead: the task retries once
      the lease's remaining time has passed, without using up `max_retries`, at most
      conveyor_idempotency_lease_waits times in a row;
    - when the last retry fails, the message is rejected to the dead-letter queue (and the
      failure stored as the result) instead of being acked as a silent failure.
    """

    autoretry_for = (*TRANSIENT_ERRORS, EffectInProgress)
    retry_backoff = True
    #: Caps one countdown; with max_retries = 5 the longest is 16 s, so it only matters to a
    #: task that raises max_retries past 9.
    retry_backoff_max = 600
    retry_jitter = True
    max_retries = 5

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: Exception | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: Any = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        request = self.request
        in_worker = not request.called_directly and not request.is_eager
        if isinstance(exc, EffectInProgress) and in_worker:
            return self._wait_for_lease(exc, args, kwargs, throw, options)
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit and in_worker:
            self._dead_letter("retries exhausted", exc)
        waits = lease_waits(request)
        if waits:
            # Carried through transient retries too, so the two bounds multiply, never loop.
            options["headers"] = {**(options.get("headers") or {}), LEASE_WAITS_HEADER: waits}
        return super().retry(
            args, kwargs, exc, throw, eta, countdown, max_retries=max_retries, **options
        )

    def _wait_for_lease(
        self,
        exc: EffectInProgress,
        args: Any,
        kwargs: Any,
        throw: bool,
        options: dict[str, Any],
    ) -> Any:
        """Retry once the lease that blocked the effect has run out, keeping `retries`.

        A lease outlives the whole backoff window (60 s against 31 s by default), so counting
        the wait as a transient retry would dead-letter a task whose holder was killed, and
        its effect would never happen. The wait is counted in its own header instead.
        """
        request = self.request
        waits = lease_waits(request)
        if waits >= int(self.app.conf.conveyor_idempotency_lease_waits):
            self._dead_letter("idempotency lease waits exhausted", exc)
        countdown = lease_wait_countdown(exc.retry_after)
        headers = {**(options.pop("headers", None) or {}), LEASE_WAITS_HEADER: waits + 1}
        signature = self.signature_from_request(
            request,
            args,
            kwargs,
            countdown=countdown,
            retries=request.retries,
            headers=headers,
            **options,
        )
        logger.info(
            "effect busy; retrying task=%s id=%s in %.1f s (lease wait %d)",
            self.name,
            request.id,
            countdown,
            waits + 1,
        )
        try:
            signature.apply_async()
        except Exception as publish_error:
            # As Celery's own retry does: the message goes to the dead-letter queue.
            raise Reject(publish_error, requeue=False) from publish_error
        retry = Retry(exc=exc, when=datetime.now(UTC) + timedelta(seconds=countdown), sig=signature)
        if throw:
            raise retry
        return retry

    def _dead_letter(self, why: str, exc: Exception | None) -> NoReturn:
        """Store the failure and send the message to the dead-letter queue with its reason.

        RetriesExhausted is a Reject: the worker (workers/bad_input.py) dead-letters a copy
        carrying the reason ``retries_exhausted`` and the exception, then acks the original.
        """
        request = self.request
        reason: Exception = exc if exc is not None else RuntimeError(why)
        logger.error(
            "%s; dead-lettering task=%s id=%s retries=%s lease_waits=%s reason=%r",
            why,
            self.name,
            request.id,
            request.retries,
            lease_waits(request),
            reason,
        )
        self.backend.mark_as_failure(str(request.id), reason, request=request)
        raise RetriesExhausted(reason, requeue=False)

    def run_once(
        self,
        key: str,
        effect: Callable[[], T],
        *,
        ttl: int | None = None,
        lease: float | None = None,
    ) -> Outcome[T]:
        """Run a side effect at most once per key (see tasks.idempotency)."""
        client, ttl, lease = self._idempotency(ttl, lease)
        return run_once(client, key, effect, ttl=ttl, lease=lease)

    def run_once_in_redis(
        self,
        key: str,
        effect: Callable[[Any], None],
        *,
        ttl: int | None = None,
        lease: float | None = None,
    ) -> Outcome[list[Any] | None]:
        """Redis writes at most once per key, committed with their done-marker (see
        tasks.idempotency.run_once_in_redis); they go to conveyor_idempotency_url's database."""
        client, ttl, lease = self._idempotency(ttl, lease)
        return run_once_in_redis(client, key, effect, ttl=ttl, lease=lease)

    def _idempotency(self, ttl: int | None, lease: float | None) -> tuple[redis.Redis, int, float]:
        """The idempotency store and the ttl and lease, defaulting to the configured ones."""
        conf = self.app.conf
        return (
            redis_client(conf.conveyor_idempotency_url),
            int(conf.conveyor_idempotency_ttl if ttl is None else ttl),
            float(conf.conveyor_idempotency_lease if lease is None else lease),
        )

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        check_publishable(self, args, kwargs)
        forks.track(self.app)
        options = publish_options(
            options,
            publish_timeout=float(self.app.conf.conveyor_publish_timeout),
            now=datetime.now(UTC),
            declare_on_publish=bool(self.app.conf.conveyor_declare_on_publish),
        )
        if self.app.conf.task_send_sent_event:
            # The task-sent event off the task's confirmed channel and off the caller's path:
            # buffered, sent as a list at most conveyor_sent_event_interval later
            # (core/events.py).
            options.setdefault("event_dispatcher", sent_events(self.app))
        with typed_broker_errors():
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )

    def validate_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise ValueError when the call's arguments are unusable: runs in the caller's
        process before publishing (check_publishable). Tasks override it; this accepts all."""

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        for hook in tuple(BEFORE_START):
            hook(self, task_id)
