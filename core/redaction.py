"""Keep every password in a URL setting out of `celery inspect conf` and Flower's config view.

Celery masks settings whose names match its HIDDEN_SETTINGS pattern (API, KEY, PASS, ...) and
the password in the broker and result-backend URLs, but not in other URL settings:
`redbeat_redis_url` or `conveyor_idempotency_url` would be shown with the Redis password.
The censoring function is wrapped so that the password of any URL-valued setting is masked,
whatever the setting's name. `redact` is the same masking for anything else shown to a person
(the console's dead-letter headers and bodies, batch items): every URL password in any string.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from celery.app import utils

MASK = "*" * 8
#: scheme://user:PASSWORD@ anywhere in a text (a URL alone, or inside a message).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")


def redact(value: Any) -> Any:
    """`value` with the password of every URL in it masked, in strings, mappings and lists."""
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\g<head>{MASK}@", value) if "://" in value else value
    if isinstance(value, Mapping):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(item) for item in value)
    return value


def install() -> None:
    namespace = vars(utils)  # the stubs do not declare filter_hidden_settings' module globals
    original: Callable[[Any], dict[str, Any]] = namespace["filter_hidden_settings"]
    if getattr(original, "conveyor_wrapped", False):
        return

    def filter_hidden_settings(conf: Any) -> dict[str, Any]:
        return {key: redact(value) for key, value in original(conf).items()}

    filter_hidden_settings.conveyor_wrapped = True  # type: ignore[attr-defined]
    namespace["filter_hidden_settings"] = filter_hidden_settings
