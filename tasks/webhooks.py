"""Webhook delivery: POST a JSON event to a subscriber's URL, retried with backoff.

A web app calls ``deliver.delay(url, event, payload)`` instead of making the HTTP call inside
its request. Each delivery carries a stable ``Idempotency-Key`` (the task id), so a subscriber
can drop the duplicate that at-least-once delivery occasionally produces.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from celery.utils.log import get_task_logger

from tasks.celery_app import app

logger = get_task_logger(__name__)

#: Seconds for connect + response (conveyor_webhook_timeout, CONVEYOR_WEBHOOK_TIMEOUT).
REQUEST_TIMEOUT = float(app.conf.conveyor_webhook_timeout)
#: Statuses worth another attempt: the subscriber is overloaded or briefly broken.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: The serialized payload is bounded: a webhook is a notification, not a file transfer.
MAX_PAYLOAD_BYTES = 256 * 1024


class TransientDeliveryError(Exception):
    """The subscriber may accept the same delivery later (timeout, 5xx, 429)."""


class DeliveryRejected(Exception):
    """The subscriber refused the delivery for good (4xx other than 408/425/429)."""


@dataclass(frozen=True)
class DeliveryResult:
    status: int
    url: str
    event: str


def sign(body: bytes, secret: str) -> str:
    """HMAC-SHA256 of the body, hex: what a subscriber recomputes to trust the sender."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _json_value(value: Any) -> str:
    """The JSON form of the values a payload may hold beyond JSON's own: Decimal as its exact
    string ("1.50", no float rounding), datetime/date/time as ISO 8601, UUID as its canonical
    string. These arrive in the worker as the same types (kombu's JSON tags them)."""
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def validate_request(url: str, event: str, payload: dict[str, Any]) -> bytes:
    """Check the caller's input and return the body; ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"webhook url must be an absolute http(s) URL, got {url!r}")
    if not event or not isinstance(event, str):
        raise ValueError("webhook event must be a non-empty string")
    if not isinstance(payload, dict):
        raise ValueError(f"webhook payload must be a JSON object, got {type(payload).__name__}")
    try:
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True, default=_json_value)
    except (TypeError, ValueError) as exc:  # ValueError: a circular reference
        raise ValueError(f"webhook payload cannot be sent as JSON: {exc}") from exc
    body = text.encode()
    if len(body) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"webhook payload is {len(body)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    return body


def post_event(
    url: str,
    event: str,
    payload: dict[str, Any],
    *,
    idempotency_key: str,
    secret: str | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> DeliveryResult:
    """POST one event. Raises TransientDeliveryError or DeliveryRejected when not accepted."""
    body = validate_request(url, event, payload)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "conveyor-webhooks/1",
        "X-Conveyor-Event": event,
        "Idempotency-Key": idempotency_key,
    }
    if secret:
        headers["X-Conveyor-Signature"] = f"sha256={sign(body, secret)}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        if exc.code in RETRYABLE_STATUSES:
            raise TransientDeliveryError(f"{url} answered {exc.code}") from exc
        raise DeliveryRejected(f"{url} answered {exc.code}: {exc.reason}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise TransientDeliveryError(f"{url} unreachable: {exc}") from exc
    return DeliveryResult(status=status, url=url, event=event)


def _validate_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """deliver's check in the caller's process (Task.validate_arguments)."""
    validate_request(*args, **kwargs)


@app.task(
    name="webhooks.deliver",
    bind=True,
    validate_arguments=staticmethod(_validate_call),
    autoretry_for=(TransientDeliveryError,),
    retry_backoff=5,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=8,
)
def deliver(self: Any, url: str, event: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Deliver one webhook event; transient failures retry with backoff for up to about 20
    minutes (5, 10, ... 320 s, then 600 s: 1235 s at most, half that on average)."""
    result = post_event(
        url,
        event,
        payload,
        idempotency_key=self.request.id,
        secret=app.conf.conveyor_webhook_secret,
    )
    logger.info("delivered event=%s url=%s status=%s", event, url, result.status)
    return asdict(result)


def enqueue(url: str, event: str, payload: dict[str, Any]) -> Any:
    """deliver.delay: bad input raises ValueError at the call (deliver's validate_arguments),
    and nothing is published."""
    return deliver.delay(url, event, payload)
