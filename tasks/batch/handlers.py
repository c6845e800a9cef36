"""Named item handlers: what a batch does with each item, and how chunk results combine.

A handler is a class registered under a name with ``@register("name")``. The worker makes one
instance per chunk with the batch's options, calls ``process(item, key)`` for each item, folds
the chunk's return values with ``combine`` (the map step) and, once the whole batch is done,
folds every chunk's partial with ``reduce`` (the reduce step). Partials and results are JSON.

``key`` is the item's idempotency key, ``<batch id>:<item index>``: stable across redelivery
and retries, so side effects keyed on it happen once.

``process`` raises ``ItemError`` for an item that fails without retrying inside the chunk
(``batch retry`` re-runs it), ``InvalidItemError`` when the item itself is invalid (a missing or
malformed field: it would fail the same way again, so ``batch retry`` leaves it failed unless
asked), and ``TransientItemError`` (or another type in ``transient``) for failures worth
retrying; those are retried with backoff inside the chunk before the item counts as failed.

Before anything is published, the producer calls ``check_input(options, fields)`` with the
input's field names when it knows them up front (a CSV's header): a handler refuses options
that do not fit the input there (ValueError), and fills in defaults that depend on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, ClassVar, TypeVar

__all__ = [
    "Handler",
    "InvalidItemError",
    "ItemError",
    "TransientItemError",
    "get",
    "names",
    "register",
]


class ItemError(Exception):
    """The item can never succeed (malformed or invalid input): fail it without retrying."""


class InvalidItemError(ItemError):
    """The item itself is invalid (a field missing or malformed): it fails the same way every
    time, so a retry of the batch leaves it failed unless asked to include input errors."""


class TransientItemError(Exception):
    """The item may succeed if tried again shortly (a service was briefly away)."""


class Handler:
    """Base class: override ``process``, and ``combine``/``reduce`` for a map-reduce result."""

    #: Exception types retried with backoff before the item counts as failed.
    transient: ClassVar[tuple[type[BaseException], ...]] = (
        TransientItemError,
        ConnectionError,
        TimeoutError,
    )

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)

    @classmethod
    def check_input(
        cls, options: Mapping[str, Any], fields: Sequence[str] | None
    ) -> dict[str, Any]:
        """The options to run the batch with, given the field names of the input's records
        (None when the input does not say them up front). Runs in the producer before
        anything is published: raise ValueError for an option that does not fit the input."""
        return dict(options)

    def process(self, item: Any, key: str) -> Any:
        raise NotImplementedError

    def combine(self, values: list[Any]) -> Any:
        """The chunk's partial result from its items' return values (None: no result)."""
        return None

    def reduce(self, partials: Iterable[Any]) -> Any:
        """The batch's result from every chunk's partial, in no particular order."""
        return None


H = TypeVar("H", bound=type[Handler])
_registry: dict[str, type[Handler]] = {}


def register(name: str) -> Callable[[H], H]:
    """Register a handler class under `name` (the name batches are submitted with)."""

    def decorator(cls: H) -> H:
        if name in _registry and _registry[name] is not cls:
            raise ValueError(f"batch handler {name!r} is already registered")
        _registry[name] = cls
        return cls

    return decorator


def get(name: str) -> type[Handler]:
    try:
        return _registry[name]
    except KeyError:
        known = ", ".join(sorted(_registry)) or "none"
        raise LookupError(f"unknown batch handler {name!r} (registered: {known})") from None


def names() -> list[str]:
    return sorted(_registry)


@register("noop")
class Noop(Handler):
    """Does nothing with each item: measures the batch machinery itself (benchmarks)."""

    def process(self, item: Any, key: str) -> Any:
        return None


def _number(text: Any, field: str) -> Decimal:
    if text is None or text == "":
        raise InvalidItemError(f"missing value in field {field!r}")
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise InvalidItemError(f"field {field!r} is not a number: {text!r}") from None
    if not value.is_finite():
        raise InvalidItemError(f"field {field!r} is not a finite number: {text!r}")
    return value


def _field_option(options: dict[str, Any], option: str, default: str, fields: Sequence[str]) -> str:
    """The column `option` names (or `default`), refused when the input has no such column."""
    name = options.get(option)
    columns = ", ".join(fields) or "none"
    if not name and default in fields:
        return str(default)
    if not name:
        raise ValueError(
            f"the input has no column {default!r} (the default of option {option}): set "
            f"{option} to one of its columns: {columns}"
        )
    if name not in fields:
        raise ValueError(
            f"unknown field {name!r} (option {option}); the input's columns are: {columns}"
        )
    return str(name)


def _merge_stats(into: dict[str, list[Any]], key: str, stats: list[Any]) -> None:
    # stats: [count, sum, min, max] with Decimals; merging is exact and order-independent.
    found = into.get(key)
    if found is None:
        into[key] = list(stats)
        return
    found[0] += stats[0]
    found[1] += stats[1]
    found[2] = min(found[2], stats[2])
    found[3] = max(found[3], stats[3])


@register("aggregate")
class Aggregate(Handler):
    """Per-key count, sum, min, max and mean of a numeric field, exactly (decimal arithmetic).

    Options: ``key_field`` and ``value_field``. By default they are ``key`` and ``value``;
    for a CSV without those columns but with exactly two, the first column is the key and
    the second the value (``region,amount`` needs no option). Items are mappings, as CSV rows
    and JSONL objects are. Numbers travel as decimal strings, so the result does not depend
    on how the items were chunked or in which order chunks finished.
    """

    @classmethod
    def check_input(
        cls, options: Mapping[str, Any], fields: Sequence[str] | None
    ) -> dict[str, Any]:
        chosen = dict(options)
        if fields is None:
            return chosen  # JSONL or an iterable: each item is checked as it comes
        pair = len(fields) == 2
        default_key = "key" if "key" in fields or not pair else fields[0]
        key = chosen["key_field"] = _field_option(chosen, "key_field", default_key, fields)
        others = [name for name in fields if name != key]
        default_value = "value" if "value" in fields or not pair else others[0]
        chosen["value_field"] = _field_option(chosen, "value_field", default_value, fields)
        return chosen

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.key_field = str(self.options.get("key_field", "key"))
        self.value_field = str(self.options.get("value_field", "value"))

    def process(self, item: Any, key: str) -> tuple[str, Decimal]:
        if not isinstance(item, Mapping):
            raise InvalidItemError(f"expected a record (mapping), got {type(item).__name__}")
        group = item.get(self.key_field)
        if group is None or group == "":
            raise InvalidItemError(f"missing value in field {self.key_field!r}")
        return str(group), _number(item.get(self.value_field), self.value_field)

    def combine(self, values: list[tuple[str, Decimal]]) -> dict[str, list[Any]]:
        stats: dict[str, list[Any]] = {}
        for group, value in values:
            _merge_stats(stats, group, [1, value, value, value])
        return {group: [s[0], *map(str, s[1:])] for group, s in stats.items()}

    def reduce(self, partials: Iterable[Any]) -> dict[str, dict[str, Any]]:
        stats: dict[str, list[Any]] = {}
        for partial in partials:
            for group, (count, total, low, high) in (partial or {}).items():
                _merge_stats(stats, group, [count, Decimal(total), Decimal(low), Decimal(high)])
        return {
            group: {
                "count": count,
                "sum": str(total),
                "min": str(low),
                "max": str(high),
                "mean": str(total / count),
            }
            for group, (count, total, low, high) in sorted(stats.items())
        }


@register("write_files")
class WriteFiles(Handler):
    """Writes each item as JSON to ``<directory>/<batch id>-<index>.json``, exactly once.

    Option ``directory`` (required; the worker creates it, the producer only checks that it
    is given). The file name is the idempotency key, and the file appears
    by an atomic rename of a complete, fsynced temporary file, so a redelivered chunk finds the
    file and writes nothing, and no reader ever sees a half-written one. Result:
    ``{"written": n, "existing": m}`` (existing counts items a previous delivery wrote).
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        if not self.options.get("directory"):
            raise ValueError("write_files needs the option directory=<path>")
        self.directory = Path(str(self.options["directory"]))
        self._made = False

    def process(self, item: Any, key: str) -> bool:
        if not self._made:  # here, not in __init__: the producer validates with __init__ too
            self.directory.mkdir(parents=True, exist_ok=True)
            self._made = True
        name = f"{key.replace(':', '-')}.json"
        path = self.directory / name
        if path.exists():
            return False
        # The temporary name is the key's too: a delivery killed mid-write leaves a partial
        # temporary file that the redelivery overwrites and renames, so no debris piles up.
        tmp = self.directory / f".{name}.tmp"
        try:
            with tmp.open("w") as out:
                json.dump(item, out, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except FileNotFoundError:
            if path.exists():  # a concurrent duplicate delivery renamed the same content first
                return False
            raise
        return True

    def combine(self, values: list[bool]) -> dict[str, int]:
        written = sum(values)
        return {"written": written, "existing": len(values) - written}

    def reduce(self, partials: Iterable[Any]) -> dict[str, int]:
        total = {"written": 0, "existing": 0}
        for partial in partials:
            for name in total:
                total[name] += int(partial[name])
        return total
