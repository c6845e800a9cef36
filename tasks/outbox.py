"""Transactional enqueue: a task written as a row in the caller's own database transaction.

``outbox.delay(connection, task, *args, **kwargs)`` inserts one row into ``conveyor_outbox``
through the caller's connection and returns the task id at once, without contacting the
broker. The row commits or rolls back with the request's data; the relay
(``celery -A tasks outbox relay``, the ``outbox`` package) publishes committed rows with
publisher confirms. See docs/outbox.md.

The connection is a SQLAlchemy ``Connection`` or ``Session``, or a DB-API connection whose
driver takes ``%(name)s`` parameters: psycopg 3, psycopg2, or Django's ``django.db.connection``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu.utils.json import dumps

from tasks.base import InvalidArguments, check_publishable

#: The table and the LISTEN/NOTIFY channel (outbox/schema.sql creates both).
TABLE = "conveyor_outbox"
CHANNEL = "conveyor_outbox"

INSERT = (
    f"INSERT INTO {TABLE} (task_id, task_name, queue, args, kwargs, eta) "
    "VALUES (%(task_id)s, %(task_name)s, %(queue)s, %(args)s::json, %(kwargs)s::json, %(eta)s)"
)


#: The arguments are not JSON as Celery's json serializer writes it: the same error
#: apply_async raises (tasks.base.check_publishable makes the check for both).
NotSerializable = InvalidArguments


def delay(connection: Any, task: Any, *args: Any, **kwargs: Any) -> str:
    """Enqueue `task(*args, **kwargs)` in the connection's transaction; returns the task id."""
    return apply_async(connection, task, args, kwargs)


def apply_async(
    connection: Any,
    task: Any,
    args: Any = None,
    kwargs: Any = None,
    *,
    countdown: float | None = None,
    eta: datetime | str | None = None,
    queue: str | None = None,
) -> str:
    """Like `task.apply_async`, written as an outbox row; returns the task id.

    Invalid arguments raise ValueError here, in the request, never later in the relay. A
    countdown counts from now (the request), not from the moment the relay publishes.
    """
    args = list(args or ())
    kwargs = dict(kwargs or {})
    check_publishable(task, args, kwargs)
    task_id = str(uuid.uuid4())
    params = {
        "task_id": task_id,
        "task_name": task.name,
        "queue": queue_for(task, args, kwargs, queue),
        "args": serialize(args),
        "kwargs": serialize(kwargs),
        "eta": due_at(countdown, eta, datetime.now(UTC)),
    }
    execute(connection, INSERT, params)
    return task_id


def serialize(value: Any) -> str:
    """JSON exactly as Celery's json serializer (kombu's encoder) writes task arguments."""
    try:
        return str(dumps(value))
    except (TypeError, ValueError) as exc:
        raise NotSerializable(f"task arguments are not JSON-serializable: {exc}") from exc


def queue_for(task: Any, args: list[Any], kwargs: dict[str, Any], queue: str | None) -> str:
    """The queue apply_async would route to; an unknown queue name fails here."""
    name = queue or getattr(task, "queue", None)
    options = {"queue": name} if name else {}
    route = task.app.amqp.router.route(options, task.name, args, kwargs)
    return str(route["queue"].name)


def due_at(countdown: float | None, eta: datetime | str | None, now: datetime) -> datetime | None:
    """The absolute time a delayed task is due, so the delay counts from the enqueue."""
    if countdown is not None:
        return now + timedelta(seconds=float(countdown))
    if isinstance(eta, str):
        eta = datetime.fromisoformat(eta)
    if eta is not None and eta.tzinfo is None:
        eta = eta.replace(tzinfo=UTC)
    return eta


def execute(connection: Any, sql: str, params: dict[str, Any]) -> None:
    """Run one statement through the caller's connection, in its current transaction."""
    if type(connection).__module__.startswith("sqlalchemy"):
        # A Session's statements run on its transaction's Connection; exec_driver_sql passes
        # the SQL to the driver as it is, so one text serves every connection kind.
        bound = connection.connection() if hasattr(connection, "get_bind") else connection
        bound.exec_driver_sql(sql, params)
        return
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
