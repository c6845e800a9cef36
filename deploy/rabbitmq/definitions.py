"""Write RabbitMQ definitions for Conveyor: the vhost, one user per role, the topology.

    python deploy/rabbitmq/definitions.py > definitions.json

Compose runs this once before the broker starts (the broker loads the file at boot); on an
existing broker, import it with deploy/rabbitmq/provision.sh. Passwords come from the
environment or from *_FILE paths (Docker secrets) and are written only as salted SHA-256
hashes, RabbitMQ's own format.

Roles (permissions are regular expressions over exchange and queue names in the vhost):
- producer: publish tasks (and their task-sent events) and nothing else: it cannot
  consume, purge, declare or delete a task queue;
- worker: everything Celery's worker and beat declare and use, nothing outside the vhost;
- monitor (Flower): its own event and reply queues, inspect broadcasts, passive declares
  (queue depth) and the management API's read-only `monitoring` tag; it cannot publish tasks,
  but its write on `celery.pidbox` also carries control commands (shutdown, revoke);
- exporter (the metrics exporter, `overview`): read-only. Its own event queues, passive
  declares and the `monitoring` tag; it can publish to nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kombu.transport.native_delayed_delivery import (
    CELERY_DELAYED_DELIVERY_EXCHANGE,
    MAX_LEVEL,
    level_name,
)

import celeryconfig  # the queue arguments have one source of truth
from core.config import ConfigurationError, optional_secret

VHOST = os.environ.get("CONVEYOR_VHOST", "conveyor")
TASK_QUEUES = "|".join(celeryconfig.conveyor_queue_names)
TASK_EXCHANGE = celeryconfig.conveyor_task_exchange

#: Everything Celery touches for Conveyor: task exchange and queues, dead-letter and other
#: conveyor.* entities, native delayed delivery, events, remote control and its replies.
CELERY_ENTITIES = (
    rf"^({TASK_EXCHANGE}|{TASK_EXCHANGE}\..*|{TASK_QUEUES}|celery_delayed_.*"
    r"|celeryev|celeryev\..*|celery\.pidbox|reply\.celery\.pidbox"
    r"|.*\.celery\.pidbox|.*\.reply\.celery\.pidbox)$"
)
MONITOR_OWN = r"celeryev\..*|.*\.reply\.celery\.pidbox"
#: An event receiver's own queue (celeryev.<uuid>): declared, bound and consumed by it alone.
EVENT_QUEUES = r"celeryev\..*"

PERMISSIONS: dict[str, dict[str, str]] = {
    "producer": {
        "configure": r"^celeryev$",
        "write": rf"^({TASK_EXCHANGE}|celery_delayed_27|celeryev)$",
        "read": r"^$",
    },
    "worker": {"configure": CELERY_ENTITIES, "write": CELERY_ENTITIES, "read": CELERY_ENTITIES},
    "monitor": {
        # Declaring the event and remote-control exchanges (idempotent) is part of binding to
        # them; that is the only configure right it has on shared entities.
        "configure": rf"^({MONITOR_OWN}|celeryev|celery\.pidbox|reply\.celery\.pidbox)$",
        "write": rf"^({MONITOR_OWN}|celery\.pidbox)$",
        "read": rf"^({MONITOR_OWN}|celeryev|reply\.celery\.pidbox)$",
    },
    "exporter": {
        # Declaring the `celeryev` exchange is part of binding an event queue to it. Write
        # covers binding its own queues only: publishing needs write on an exchange, and
        # no exchange matches, not even the default one (`amq.default`).
        "configure": rf"^({EVENT_QUEUES}|celeryev)$",
        "write": rf"^{EVENT_QUEUES}$",
        "read": rf"^({EVENT_QUEUES}|celeryev)$",
    },
}
TAGS = {
    "admin": "administrator",
    "producer": "",
    "worker": "",
    "monitor": "monitoring",
    "exporter": "monitoring",
}


def secret(name: str) -> str:
    """NAME from the environment or the file NAME_FILE names, with core.config's rules (both
    set, or an unreadable file, is an error naming the variable); missing is an error too."""
    try:
        value = optional_secret(name)
    except ConfigurationError as exc:
        raise SystemExit(str(exc)) from None
    if not value:
        raise SystemExit(f"{name} (or {name}_FILE) must be set")
    return value


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def user_name(role: str) -> str:
    return os.environ.get(f"CONVEYOR_{role.upper()}_USER", f"conveyor-{role}")


def exchange(name: str, kind: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": VHOST,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": arguments or {},
    }


def queue(name: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": VHOST,
        "durable": True,
        "auto_delete": False,
        "arguments": dict(arguments or {}),
    }


def binding(source: str, destination: str, routing_key: str, kind: str = "queue") -> dict[str, Any]:
    return {
        "source": source,
        "vhost": VHOST,
        "destination": destination,
        "destination_type": kind,
        "routing_key": routing_key,
        "arguments": {},
    }


def delayed_delivery() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Exchanges, queues and bindings of native delayed delivery (countdown/ETA).

    The same topology kombu's declare_native_delayed_delivery_exchanges_and_queues and
    bind_queue_to_native_delayed_delivery_exchange declare when a worker starts, with the same
    names and arguments: without it a producer's first countdown publish, before any worker
    has ever run, would go to a `celery_delayed_27` exchange that does not exist yet.
    """
    queue_type = getattr(celeryconfig, "broker_native_delayed_delivery_queue_type", "quorum")
    exchanges, queues, bindings = [], [], []
    routing_key = "1.#"
    for level in range(MAX_LEVEL, -1, -1):
        name = level_name(level)
        arguments: dict[str, Any] = {
            "x-queue-type": queue_type,
            "x-overflow": "reject-publish",
            "x-message-ttl": 2**level * 1000,
            "x-dead-letter-exchange": level_name(level - 1)
            if level > 0
            else CELERY_DELAYED_DELIVERY_EXCHANGE,
        }
        if queue_type == "quorum":
            arguments["x-dead-letter-strategy"] = "at-least-once"
        exchanges.append(exchange(name, "topic"))
        queues.append(queue(name, arguments))
        bindings.append(binding(name, name, routing_key))
        routing_key = "*." + routing_key
    # A message whose bit at this level is 0 skips the level's queue: on to the next exchange.
    routing_key = "0.#"
    for level in range(MAX_LEVEL, 0, -1):
        bindings.append(binding(level_name(level), level_name(level - 1), routing_key, "exchange"))
        routing_key = "*." + routing_key
    exchanges.append(exchange(CELERY_DELAYED_DELIVERY_EXCHANGE, "topic"))
    bindings.append(
        binding(level_name(0), CELERY_DELAYED_DELIVERY_EXCHANGE, routing_key, "exchange")
    )
    # Due messages leave through the delivery exchange to the task exchange and its queues.
    for task_queue in celeryconfig.task_queues:
        key = task_queue.routing_key
        key = key if key.startswith("#") else f"#.{key}"
        bindings.append(
            binding(CELERY_DELAYED_DELIVERY_EXCHANGE, task_queue.exchange.name, key, "exchange")
        )
        bindings.append(binding(task_queue.exchange.name, task_queue.name, key))
    return exchanges, queues, bindings


def definitions() -> dict[str, Any]:
    users = [
        {
            "name": user_name(role),
            "password_hash": password_hash(secret(f"CONVEYOR_{role.upper()}_PASSWORD")),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": [tag] if tag else [],
        }
        for role, tag in TAGS.items()
    ]
    permissions = [
        {"user": user_name("admin"), "vhost": VHOST, "configure": ".*", "write": ".*", "read": ".*"}
    ] + [{"user": user_name(role), "vhost": VHOST, **rules} for role, rules in PERMISSIONS.items()]
    task_exchange = celeryconfig.task_queues[0].exchange
    dead_letter = celeryconfig.conveyor_dead_letter_queue
    unroutable = celeryconfig.conveyor_unroutable_queue
    exchanges = [
        exchange(TASK_EXCHANGE, "topic", dict(task_exchange.arguments or {})),
        exchange(celeryconfig.conveyor_dead_letter_exchange, "topic"),
        exchange(celeryconfig.conveyor_unroutable_exchange, "fanout"),
    ]
    queues = [queue(q.name, q.queue_arguments) for q in celeryconfig.task_queues] + [
        queue(name, {"x-queue-type": "quorum"}) for name in (dead_letter, unroutable)
    ]
    bindings = [binding(TASK_EXCHANGE, q.name, q.routing_key) for q in celeryconfig.task_queues]
    bindings += [
        binding(celeryconfig.conveyor_dead_letter_exchange, dead_letter, "#"),
        binding(celeryconfig.conveyor_unroutable_exchange, unroutable, ""),
    ]
    delayed_exchanges, delayed_queues, delayed_bindings = delayed_delivery()
    exchanges += delayed_exchanges
    queues += delayed_queues
    bindings += delayed_bindings
    return {
        "vhosts": [{"name": VHOST}],
        "users": users,
        "permissions": permissions,
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
    }


if __name__ == "__main__":
    json.dump(definitions(), sys.stdout, indent=2)
    sys.stdout.write("\n")
