"""A chunk's items as one compact JSON text inside the task message.

A chunk message carries its items as a single string instead of a JSON list. The producer
encodes each chunk once, and Celery's argument-size check and kombu then only copy a string
where they would each walk a list of thousands of items. The worker's main process, which
Celery makes decode every message body (``'args' in message.payload``), decodes one string
instead of building every item only to hand them to the pool.

Plain items (str, int, float, bool, None, lists, dicts with str keys) are encoded with orjson,
an order of magnitude faster than the json module, and the message says so (``plain``): the
worker then decodes with orjson too. Anything else, and anything orjson would write
differently from Celery's serializer (NaN and infinities, which it writes as null; integers
beyond 64 bits, which it refuses and whose text it would read back as floats), is encoded and
decoded the way Celery's JSON serializer does it, so datetimes, Decimals and the like arrive
as the same types. One difference remains: orjson writes a UUID as its string, where Celery's
serializer would send a tagged value that arrives as a UUID.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn, cast

import orjson
from kombu.utils.json import JSONEncoder, object_hook

#: orjson hands these to `default` (which refuses them) instead of writing them its own way.
_PASSTHROUGH = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _not_plain(value: Any) -> NoReturn:
    raise TypeError(type(value).__name__)


def encode(items: list[Any]) -> tuple[str, bool]:
    """(the items as compact JSON, whether they are plain: see the module's docstring)."""
    try:
        text = orjson.dumps(items, default=_not_plain, option=_PASSTHROUGH)
    except TypeError:  # orjson.JSONEncodeError: a type it does not know, or a huge int
        pass
    else:
        # orjson writes NaN and the infinities as null; only None may produce it otherwise.
        if b"null" not in text:
            return text.decode(), True
    return json.dumps(items, cls=JSONEncoder, separators=(",", ":")), False


def decode(payload: str | list[Any], plain: bool = False) -> list[Any]:
    """The items of a chunk message: text from `encode`, or a plain list (older messages)."""
    if not isinstance(payload, str):
        return payload
    if plain:
        return cast(list[Any], orjson.loads(payload))
    # Every value kombu tags with its type carries this key; text without it decodes to the
    # same objects with or without kombu's per-object hook, and faster without.
    if '"__type__"' in payload:
        return cast(list[Any], json.loads(payload, object_hook=object_hook))
    return cast(list[Any], json.loads(payload))
