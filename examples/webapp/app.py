"""An order service that notifies a webhook through the outbox (docs/outbox.md).

``POST /orders`` inserts the order and enqueues ``webhooks.deliver`` in one database
transaction: the webhook goes out only if the order committed, and it goes out even when
RabbitMQ is down at that moment (the relay publishes it when the broker is back). The request
never talks to RabbitMQ.

    CONVEYOR_OUTBOX_URL=postgresql://... celery -A tasks outbox migrate
    CONVEYOR_OUTBOX_URL=postgresql://... uvicorn --factory examples.webapp.app:create_app
"""

from __future__ import annotations

import os
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tasks import outbox
from tasks.webhooks import deliver

metadata = sa.MetaData()
orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("customer", sa.Text, nullable=False),
    sa.Column("amount", sa.Numeric(12, 2), nullable=False),
    sa.Column("webhook_url", sa.Text, nullable=False),
    sa.Column("task_id", sa.Text, nullable=False),
)
#: The outbox row of an order's webhook: waiting until the relay published it.
OUTBOX_STATE = sa.text("SELECT published_at FROM conveyor_outbox WHERE task_id = :task_id")


class BadOrder(ValueError):
    pass


def parse(body: Any) -> tuple[str, Decimal, str]:
    """customer, amount and webhook_url from the request body."""
    try:
        customer, amount, url = str(body["customer"]), Decimal(body["amount"]), body["webhook_url"]
    except (KeyError, TypeError, InvalidOperation) as exc:
        raise BadOrder("expected customer, amount and webhook_url") from exc
    if amount <= 0:
        raise BadOrder("amount must be positive")
    return customer, amount, str(url)


def place_order(engine: sa.Engine, customer: str, amount: Decimal, url: str) -> dict[str, Any]:
    """The order and its webhook in one transaction: both commit, or neither does."""
    with engine.begin() as connection:
        order_id = connection.execute(
            orders.insert()
            .values(customer=customer, amount=amount, webhook_url=url, task_id="")
            .returning(orders.c.id)
        ).scalar_one()
        payload = {"order_id": order_id, "customer": customer, "amount": str(amount)}
        task_id = outbox.delay(connection, deliver, url, "order.created", payload)
        connection.execute(orders.update().where(orders.c.id == order_id).values(task_id=task_id))
    return {"order_id": order_id, "task_id": task_id}


def read_order(engine: sa.Engine, order_id: int) -> dict[str, Any] | None:
    with engine.connect() as connection:
        order = connection.execute(orders.select().where(orders.c.id == order_id)).one_or_none()
        if order is None:
            return None
        published = connection.execute(OUTBOX_STATE, {"task_id": order.task_id}).scalar()
    return {
        "order_id": order.id,
        "customer": order.customer,
        "amount": str(order.amount),
        "task_id": order.task_id,
        "webhook": "published" if published else "waiting",
    }


def create_app(database_url: str | None = None) -> Starlette:
    """The app, on the database that holds conveyor_outbox (CONVEYOR_OUTBOX_URL)."""
    url = database_url or os.environ["CONVEYOR_OUTBOX_URL"]
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    metadata.create_all(engine)

    async def create(request: Request) -> JSONResponse:
        try:
            order = parse(await request.json())
        except (BadOrder, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        created = await run_in_threadpool(place_order, engine, *order)
        return JSONResponse(created, status_code=201)

    async def show(request: Request) -> JSONResponse:
        order = await run_in_threadpool(read_order, engine, int(request.path_params["order_id"]))
        if order is None:
            return JSONResponse({"error": "no such order"}, status_code=404)
        return JSONResponse(order)

    return Starlette(
        routes=[
            Route("/orders", create, methods=["POST"]),
            Route("/orders/{order_id:int}", show, methods=["GET"]),
        ]
    )
