"""Side effects that happen once per key, across redeliveries and duplicate publishes.

At-least-once delivery means a task can run twice: after a pool process dies, after a lost
connection, or when a producer re-publishes after a timeout. A task whose effect must not repeat
(charge a card, send an e-mail) wraps that effect in :func:`run_once`:

- the first delivery takes a *lease* on the key (Redis ``SET NX PX``) and runs the effect;
- when the effect returns, the key becomes *done* (with the effect's JSON result) for ``ttl``;
- a later delivery of the same key finds *done* and returns the stored result without running
  the effect; one that finds a live lease raises :class:`EffectInProgress` with the lease's
  remaining time, and every Conveyor task retries it once that time has passed (tasks.base.Task),
  so it comes back after the holder finished or its lease expired;
- an effect that raises releases the lease, so a retry can run it.

The one window left is a process killed after the effect but before the done-marker is
written (a Redis round trip): the effect then runs again once the lease expires. The chaos runs
do hit it now and then (a whole worker SIGKILLed while both its processes are inside that
window). :func:`run_once_in_redis` closes it for effects that are Redis writes: the effect's
commands and the done-marker commit in one MULTI/EXEC, so a kill leaves either both or neither.
For effects elsewhere, the same rule holds: write the key in the effect's own transaction (a
unique row in the same database transaction), or pass it to the remote side (as webhooks do
with ``Idempotency-Key``).

:func:`enqueue_once` is the producer side: a second publish with the same key is a no-op that
returns the first task's result handle.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis

from core.redis import client as redis_client

T = TypeVar("T")

EFFECT_PREFIX = "conveyor:effect:"
ENQUEUE_PREFIX = "conveyor:enqueue:"
#: uuid5 namespace: the same (task, key) always gets the same task id.
TASK_ID_NAMESPACE = uuid.UUID("6f1b8f7e-4f43-4c55-9a55-9d0b4d0c6a01")

#: Deletes the lease only if this delivery still holds it (another may have taken it over).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"


class EffectInProgress(Exception):
    """Another delivery holds the key's lease; try again in `retry_after` seconds.

    `retry_after` is the lease's remaining time (0 when it is gone or unknown): by then the
    holder has either written the done-marker or, killed, left the key to the next delivery.
    """

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = max(0.0, retry_after)


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """`ran` is False when the effect had already run and `value` is its stored result."""

    ran: bool
    value: T


def run_once(
    client: redis.Redis,
    key: str,
    effect: Callable[[], T],
    *,
    ttl: int,
    lease: float,
) -> Outcome[T]:
    """Run `effect` unless it already ran for `key`; return what it returned either time."""
    name = EFFECT_PREFIX + key
    token = f"lease:{uuid.uuid4()}"
    if not client.set(name, token, nx=True, px=int(lease * 1000)):
        return _done_or_in_progress(client, name, key)
    try:
        value = effect()
    except BaseException:
        client.eval(_RELEASE, 1, name, token)
        raise
    client.set(name, "done:" + json.dumps(value), ex=ttl)
    return Outcome(ran=True, value=value)


def run_once_in_redis(
    client: redis.Redis,
    key: str,
    effect: Callable[[Any], None],
    *,
    ttl: int,
    lease: float,
) -> Outcome[list[Any] | None]:
    """Run Redis writes at most once per key, committed together with the done-marker.

    `effect` queues its commands on the transaction pipeline it is given (it must not read:
    nothing has run yet). They and the marker go in one MULTI/EXEC on `client`'s database,
    guarded by WATCH on the lease: if the lease expired or another delivery took it, nothing is
    applied and EffectInProgress is raised, so the task retries and finds the effect done.
    The value is the effect's command results on the run that applied it, None on repeats.
    """
    name = EFFECT_PREFIX + key
    token = f"lease:{uuid.uuid4()}"
    if not client.set(name, token, nx=True, px=int(lease * 1000)):
        return _done_or_in_progress(client, name, key)
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(name)  # type: ignore[no-untyped-call]
            if pipe.get(name) != token:
                raise EffectInProgress(f"effect {key!r}: the lease expired before the commit")
            pipe.multi()
            effect(pipe)
            pipe.set(name, "done:null", ex=ttl)
            results = pipe.execute()
        except redis.WatchError as exc:
            raise EffectInProgress(f"effect {key!r}: the lease changed before the commit") from exc
        except BaseException:
            client.eval(_RELEASE, 1, name, token)
            raise
    return Outcome(ran=True, value=list(results[:-1]))


def _done_or_in_progress(client: redis.Redis, name: str, key: str) -> Outcome[Any]:
    with client.pipeline(transaction=True) as pipe:
        pipe.get(name)
        pipe.pttl(name)
        raw, pttl = pipe.execute()
    state = raw.decode() if isinstance(raw, bytes) else raw
    if state is not None and state.startswith("done:"):
        return Outcome(ran=False, value=json.loads(state[5:]))
    # PTTL is -2 when the lease expired between the SET NX and now: retry at once.
    raise EffectInProgress(
        f"effect {key!r} is held by another delivery ({state})",
        retry_after=max(0, int(pttl)) / 1000,
    )


def task_id_for(task_name: str, key: str) -> str:
    return str(uuid.uuid5(TASK_ID_NAMESPACE, f"{task_name}:{key}"))


def enqueue_once(
    task: Any,
    *,
    key: str,
    client: redis.Redis | None = None,
    ttl: int | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> Any:
    """Publish `task` once per key; later calls with the key return the same AsyncResult.

    The marker lives in `client` for `ttl` seconds, by default conveyor_idempotency_url and
    conveyor_idempotency_ttl of the task's app. The task id is derived from the key, so even
    two publishes racing past the marker produce one id, which idempotent effects then run once.
    """
    if client is None:
        client = redis_client(task.app.conf.conveyor_idempotency_url)
    if ttl is None:
        ttl = int(task.app.conf.conveyor_idempotency_ttl)
    task_id = task_id_for(task.name, key)
    marker = f"{ENQUEUE_PREFIX}{task.name}:{key}"
    if client.set(marker, task_id, nx=True, ex=ttl):
        try:
            task.apply_async(args, kwargs, task_id=task_id, **options)
        except BaseException:
            client.delete(marker)
            raise
    return task.AsyncResult(task_id)
