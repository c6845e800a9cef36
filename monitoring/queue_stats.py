"""Queue depth and consumers, read from RabbitMQ for the exporter and `celery -A tasks overview`.

Two sources, the same answer where both have it:
- the management API (``conveyor_rabbitmq_api``, e.g. ``http://user:pw@rabbitmq:15672/api/``)
  gives ready AND unacknowledged counts, and the delayed-delivery queues, in one request. Its
  figures are refreshed every ``collect_statistics_interval`` (5 s by default);
- without it, a passive ``queue.declare`` per queue gives ready messages and consumers at once,
  but no unacknowledged count. A passive declare never creates or changes a queue.

An ``https://`` management API is verified against the same CA (and given the same client
certificate) as the amqps:// broker connection, ``broker_use_ssl``: one private CA for both.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from celery import Celery

from core.amqp import passive_depths

#: Prefix of the queues in which RabbitMQ holds countdown/ETA messages (native delayed delivery).
DELAYED_PREFIX = "celery_delayed_"
#: Seconds one management API request may take; a scrape must not hang on a slow broker.
API_TIMEOUT = 5.0


@dataclass(frozen=True)
class QueueStats:
    name: str
    ready: int
    #: None when the source cannot tell (passive declare).
    unacked: int | None
    consumers: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BrokerSnapshot:
    source: str
    queues: dict[str, QueueStats]
    #: Messages waiting in the celery_delayed_* queues; None when the source cannot tell.
    delayed: int | None


def monitored_queues(app: Celery) -> list[str]:
    """The task queues and the dead-letter queue, from the configuration."""
    names = [queue.name for queue in app.conf.task_queues]
    return [*names, app.conf.conveyor_dead_letter_queue]


def _split_credentials(api_url: str) -> tuple[str, str | None]:
    """The URL without user:password, and the Basic authorization header value for them."""
    parts = urlsplit(api_url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/", "", ""))
    if parts.username is None:
        return base, None
    token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return base, "Basic " + base64.b64encode(token).decode()


def management_api_context(broker_use_ssl: object) -> ssl.SSLContext:
    """TLS context for the management API: the broker connection's CA and client certificate.

    Without a CA in `broker_use_ssl` the system's trust store verifies it. Verification and
    host-name checks are never turned off.
    """
    ca, client = broker_tls_files(broker_use_ssl)
    context = ssl.create_default_context(cafile=ca)
    if client is not None:
        context.load_cert_chain(*client)
    return context


def broker_tls_files(broker_use_ssl: object) -> tuple[str | None, tuple[str, str] | None]:
    """The amqps:// connection's CA file and client (certificate, key), from py-amqp's keys in
    `broker_use_ssl`: every client of the management API verifies it with the same ones."""
    options = broker_use_ssl if isinstance(broker_use_ssl, dict) else {}
    cert, key = options.get("certfile"), options.get("keyfile")
    return options.get("ca_certs") or None, (cert, key) if cert and key else None


def from_management_api(
    api_url: str, vhost: str, names: list[str], context: ssl.SSLContext | None = None
) -> BrokerSnapshot:
    """Read every queue of `vhost` in one request; raises OSError/ValueError when unreachable.

    `context` verifies an https:// API (by default against the system's trust store).
    """
    base, authorization = _split_credentials(api_url)
    url = (
        f"{base}queues/{quote(vhost, safe='')}"
        "?columns=name,messages_ready,messages_unacknowledged,consumers"
    )
    request = urllib.request.Request(url)
    if authorization:
        request.add_header("Authorization", authorization)
    with urllib.request.urlopen(request, timeout=API_TIMEOUT, context=context) as response:
        rows: list[dict[str, Any]] = json.load(response)
    queues: dict[str, QueueStats] = {}
    delayed = 0
    for row in rows:
        name = str(row["name"])
        # A queue appears before its first statistics tick; without figures it is not reported
        # rather than reported as empty.
        if "messages_ready" not in row:
            continue
        if name.startswith(DELAYED_PREFIX):
            delayed += int(row["messages_ready"]) + int(row.get("messages_unacknowledged", 0))
        if name in names:
            queues[name] = QueueStats(
                name=name,
                ready=int(row["messages_ready"]),
                unacked=int(row.get("messages_unacknowledged", 0)),
                consumers=int(row.get("consumers", 0)),
            )
    return BrokerSnapshot(source="management", queues=queues, delayed=delayed)


def from_passive_declare(app: Celery, names: list[str]) -> BrokerSnapshot:
    """One passive queue.declare per queue; a queue that does not exist is left out."""
    with app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1)
        found = passive_depths(connection, names)
    queues = {
        name: QueueStats(name=name, ready=depth.messages, unacked=None, consumers=depth.consumers)
        for name, depth in found.items()
        if depth is not None
    }
    return BrokerSnapshot(source="passive_declare", queues=queues, delayed=None)


def snapshot(app: Celery, api_url: str | None = None) -> BrokerSnapshot:
    """Queue figures from the management API when configured, else from passive declares."""
    names = monitored_queues(app)
    api_url = api_url or app.conf.get("conveyor_rabbitmq_api")
    if api_url:
        with app.connection_for_read() as connection:
            vhost = connection.virtual_host or "/"
        context = management_api_context(app.conf.broker_use_ssl)
        return from_management_api(api_url, vhost, names, context)
    return from_passive_declare(app, names)
