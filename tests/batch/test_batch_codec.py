"""Chunk payloads: items arrive as they were submitted, by the fast path or the exact one."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from tasks.batch import codec, handlers, runner


@pytest.mark.parametrize(
    "items",
    [
        list(range(1000)),
        [{"key": "k1", "value": "12.50"}, {"key": "é", "value": "-3"}],
        ["text", 1.5, True, [1, [2, {"a": "b"}]], {"nested": {"x": 0}}],
    ],
)
def test_plain_items_take_the_fast_path_and_arrive_unchanged(items: list[Any]) -> None:
    payload, plain = codec.encode(items)

    assert plain
    assert codec.decode(payload, plain) == items


@pytest.mark.parametrize(
    ("items", "arrive"),
    [
        ([1, None, 2], None),  # orjson writes NaN as null too: null takes the exact path
        ([2**70, -(2**65)], None),  # orjson refuses them, and would read them back as floats
        ([Decimal("1.10"), datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)], None),
        ([{1: "an int key"}], [{"1": "an int key"}]),  # as Celery's serializer sends it
    ],
)
def test_other_items_are_encoded_as_celery_does_and_arrive_as_the_same_values(
    items: list[Any], arrive: list[Any] | None
) -> None:
    payload, plain = codec.encode(items)

    assert not plain
    decoded = codec.decode(payload, plain)
    assert decoded == (items if arrive is None else arrive)
    assert [type(item) for item in decoded] == [type(item) for item in items]


def test_nan_and_infinities_survive() -> None:
    payload, plain = codec.encode([math.nan, math.inf, -math.inf])

    nan, inf, minus_inf = codec.decode(payload, plain)
    assert math.isnan(nan) and (inf, minus_inf) == (math.inf, -math.inf)


def test_a_list_payload_from_an_older_producer_is_read_as_it_is() -> None:
    assert codec.decode([1, "a"]) == [1, "a"]


class FailsOnOdd(handlers.Handler):
    transient = (ConnectionError,)

    def __init__(self) -> None:
        super().__init__({})
        self.tries: dict[str, int] = {}

    def process(self, item: Any, key: str) -> Any:
        self.tries[key] = self.tries.get(key, 0) + 1
        if item == 3 and self.tries[key] == 1:
            raise ConnectionError("briefly away")
        if item % 2:
            raise ValueError(f"odd {item}")
        return item


def test_the_item_loop_goes_on_after_a_failure_and_retries_transient_errors() -> None:
    handler = FailsOnOdd()
    entries = zip(range(6), range(10, 16), [0, 1, 2, 3, 4, 6], strict=True)

    values, failed = runner.process_items(handler, "b", entries, backoff=0)

    assert values == [0, 2, 4, 6]
    assert failed == {1: "ValueError: odd 1", 3: "ValueError: odd 3"}
    assert handler.tries == {f"b:{index}": 2 if index == 13 else 1 for index in range(10, 16)}


class NeverComesBack(handlers.Handler):
    transient = (ConnectionError,)

    def __init__(self) -> None:
        super().__init__({})
        self.tries = 0

    def process(self, item: Any, key: str) -> Any:
        self.tries += 1
        raise ConnectionError(f"still away (try {self.tries})")


@pytest.mark.parametrize("attempts", [1, 2, 3, 5])
def test_an_item_whose_transient_error_persists_fails_after_exactly_the_configured_tries(
    attempts: int,
) -> None:
    handler = NeverComesBack()

    values, failed = runner.process_items(
        handler, "b", [(0, 7, "item")], item_attempts=attempts, backoff=0
    )

    assert handler.tries == attempts
    assert values == []
    assert failed == {0: f"ConnectionError: still away (try {attempts})"}
