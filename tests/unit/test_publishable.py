"""tests.base.check_publishable: what a caller may publish, decided in the caller's process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from celery import Celery

from tasks.base import (
    ArgumentsMismatch,
    ArgumentsTooLarge,
    InvalidArguments,
    Task,
    check_publishable,
)


class Order(Task):
    """A class-based task with its own argument check."""

    name = "tests.order"

    def run(self, order_id: int, amount: Decimal) -> None:
        """Never runs here."""

    def validate_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        amount = kwargs.get("amount", args[1] if len(args) > 1 else None)
        if not isinstance(amount, Decimal) or amount <= 0:
            raise ValueError(f"amount must be a positive Decimal, got {amount!r}")


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("unit", set_as_current=False, task_cls="tasks.base:Task")
    app.config_from_object("celeryconfig")
    app.conf.conveyor_max_argument_bytes = 200
    yield app
    app.close()


def test_arguments_that_do_not_bind_are_a_value_error_and_a_type_error(app: Celery) -> None:
    @app.task(name="tests.pair", shared=False)
    def pair(a: int, b: int) -> int:
        return a + b

    check_publishable(pair, (1,), {"b": 2})
    for args, kwargs in [((1,), {}), ((1, 2, 3), {}), ((1, 2), {"c": 3}), ("12", {})]:
        with pytest.raises(ArgumentsMismatch) as refused:
            check_publishable(pair, args, kwargs)
        assert isinstance(refused.value, ValueError) and isinstance(refused.value, TypeError)


def test_decimal_datetime_and_uuid_travel_but_other_objects_do_not(app: Celery) -> None:
    @app.task(name="tests.any", shared=False)
    def anything(value: Any) -> None:
        """Never runs here."""

    for value in (Decimal("1.5"), datetime.now(UTC), uuid.uuid4(), b"raw", [1, {"a": None}]):
        check_publishable(anything, (value,), {})
    for value in ({1, 2}, object(), complex(1, 2)):
        with pytest.raises(InvalidArguments, match="not JSON-serialisable"):
            check_publishable(anything, (value,), {})


def test_arguments_over_the_limit_are_refused(app: Celery) -> None:
    @app.task(name="tests.blob", shared=False)
    def blob(data: str) -> None:
        """Never runs here."""

    check_publishable(blob, ("x" * 100,), {})
    with pytest.raises(ArgumentsTooLarge, match="the limit is 200"):
        check_publishable(blob, ("x" * 300,), {})


def test_a_task_s_own_check_runs_in_the_caller_s_process(app: Celery) -> None:
    order = app.register_task(Order())
    check_publishable(order, (1, Decimal("9.90")), {})
    with pytest.raises(ValueError, match="positive Decimal"):
        check_publishable(order, (1,), {"amount": Decimal("-1")})
    with pytest.raises(ValueError, match="positive Decimal"):
        order.apply_async((1, Decimal("0")))  # refused before any broker connection


def test_a_type_error_from_a_task_s_check_is_reported_as_invalid_arguments(app: Celery) -> None:
    def check(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        len(args[0])  # a TypeError for an int

    @app.task(name="tests.checked", shared=False, validate_arguments=staticmethod(check))
    def checked(value: Any) -> None:
        """Never runs here."""

    with pytest.raises(InvalidArguments, match=r"tests\.checked"):
        check_publishable(checked, (1,), {})
