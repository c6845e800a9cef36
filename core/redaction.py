"""Keep passwords out of `celery inspect conf`, Flower's config view and dead-letter reasons.

Celery masks settings whose names match its HIDDEN_SETTINGS pattern (API, KEY, PASS, ...) and
the password in the broker and result-backend URLs, but not in other URL settings:
`redbeat_redis_url` or `conveyor_idempotency_url` would be shown with the Redis password.
The censoring function is wrapped so that the password of any URL-valued setting is masked,
whatever the setting's name. `redact_text` applies the same masking to free text (an
exception's message), and also masks ``key=value`` pairs whose key names a secret.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from celery.app import utils
from kombu.utils.url import maybe_sanitize_url

MASK = "*" * 8
#: A URL inside free text; masked when it carries credentials.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
#: The words _SECRET_PAIR's keys contain, looked for first (substring tests are cheap).
_SECRET_WORDS = ("passw", "pwd", "secret", "token", "apikey", "api_key", "signature", "authoriz")
#: ``password=...`` or ``api_key: ...`` in free text (names as in Celery's HIDDEN_SETTINGS).
_SECRET_PAIR = re.compile(
    r"(?i)\b([\w-]*(?:passw(?:or)?d|pwd|secret|token|api_?key|signature|authorization)[\w-]*)"
    r"(\s*[=:]\s*)([^\s,;&'\")\]}]+)"
)


def _sanitize(value: Any) -> Any:
    if isinstance(value, str) and "://" in value and "@" in value:
        return maybe_sanitize_url(value, mask=MASK)
    if isinstance(value, Mapping):
        return {key: _sanitize(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_sanitize(item) for item in value)
    return value


def redact_text(text: str) -> str:
    """`text` with URL passwords and ``secret=value`` pairs masked."""
    # Each pattern is tried only when the text can hold a match: the scans cost about 70 µs
    # on a 200-character log line, and every worker log line passes through here.
    if "://" in text:
        text = _URL.sub(lambda match: str(_sanitize(match.group(0))), text)
    lowered = text.lower()
    if any(word in lowered for word in _SECRET_WORDS):
        text = _SECRET_PAIR.sub(lambda match: match.group(1) + match.group(2) + MASK, text)
    return text


def redact(value: Any) -> Any:
    """`value` with every string in it passed through redact_text (mappings and lists walked):
    for whole headers, bodies and results shown to a person (the console)."""
    if isinstance(value, str):
        return redact_text(value)
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
        return {key: _sanitize(value) for key, value in original(conf).items()}

    filter_hidden_settings.conveyor_wrapped = True  # type: ignore[attr-defined]
    namespace["filter_hidden_settings"] = filter_hidden_settings
