"""Flower's guard rails, applied by flowerconfig.py when `celery -A tasks flower` starts.

Flower serves every interface without authentication by default. Conveyor's Flower refuses to
start unless it has authentication (basic auth, or OAuth with an email regexp) or listens on a
loopback address or a unix socket only, where nobody else can reach it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from typing import Any

from core.config import ConfigurationError, exit_on_command_line, optional_secret
from monitoring.queue_stats import broker_tls_files

#: Host names that resolve to loopback on every machine Conveyor supports.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class UnsafeFlowerConfiguration(SystemExit):
    """Raised (and so exiting with its message) when Flower would be open to the network."""


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; False for '' and 0.0.0.0 (every interface)."""
    host = address.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_problem(
    *, address: str, unix_socket: str, basic_auth: Sequence[str] | None, auth: str
) -> str | None:
    """None when Flower may start with these options, else why not."""
    if basic_auth and any(":" not in pair or pair.startswith(":") for pair in basic_auth):
        return "FLOWER_BASIC_AUTH must be user:password pairs separated by commas"
    if basic_auth or auth:
        return None
    if unix_socket or is_loopback(address):
        return None
    shown = address or "every interface"
    return (
        f"Flower would serve {shown} without authentication. Set FLOWER_BASIC_AUTH=user:password "
        "(or FLOWER_AUTH with FLOWER_AUTH_PROVIDER and FLOWER_OAUTH2_* for OAuth), or bind it "
        "to loopback with --address=127.0.0.1."
    )


def check(options: object) -> None:
    """Exit with the reason when Flower's options would expose it unauthenticated."""
    problem = access_problem(
        address=str(getattr(options, "address", "") or ""),
        unix_socket=str(getattr(options, "unix_socket", "") or ""),
        basic_auth=list(getattr(options, "basic_auth", None) or []),
        auth=str(getattr(options, "auth", "") or ""),
    )
    if problem:
        raise UnsafeFlowerConfiguration(f"refusing to start: {problem}")


#: Flower options that carry a secret, by the variable that sets them. Each may come from a
#: file instead, NAME_FILE (the Docker secrets convention), read with celeryconfig's rules
#: (core.config.optional_secret).
SECRET_OPTIONS = {"FLOWER_BROKER_API": "broker_api", "FLOWER_BASIC_AUTH": "basic_auth"}


def apply_secret_files(options: Any) -> None:
    """Set Flower's secret-bearing options from their *_FILE paths, when given.

    Flower reads FLOWER_* variables itself but knows no *_FILE form. Setting both forms, or
    naming an unreadable file, is an error naming the variable (core.config.ConfigurationError).
    """
    for variable, option in SECRET_OPTIONS.items():
        if not os.environ.get(f"{variable}_FILE"):
            continue
        try:
            value = optional_secret(variable)
        except ConfigurationError as error:
            exit_on_command_line(error)  # `celery ... flower`: one line, exit status 2
            raise
        if value is None:
            raise UnsafeFlowerConfiguration(f"{variable}_FILE names an empty file")
        # basic_auth is a list option: Flower splits its variable on commas too.
        setattr(options, option, value.split(",") if option == "basic_auth" else value)


def management_api_tls(broker_use_ssl: object) -> dict[str, object]:
    """Tornado HTTP client options for Flower's calls to the RabbitMQ management API.

    Flower derives them from `broker_use_ssl`, but reads Redis-style keys (`ssl_ca_certs`,
    `ssl_cert_reqs`) that py-amqp refuses, so with Conveyor's `ca_certs` it verified the API's
    certificate against the system store only and a private CA failed. This reads the py-amqp
    keys the broker connection itself uses: one CA and client certificate for both. Verification
    is never turned off here.
    """
    ca, client = broker_tls_files(broker_use_ssl)
    options: dict[str, object] = {"validate_cert": True}
    if ca is not None:
        options["ca_certs"] = ca
    if client is not None:
        options["client_cert"], options["client_key"] = client
    return options


def verify_management_api_with_broker_ca() -> None:
    """Make Flower's management-API client trust the broker's CA (see management_api_tls)."""
    from flower.utils import broker  # type: ignore[import-untyped]

    if not callable(getattr(broker.RabbitMQ, "_tls_kwargs", None)):
        raise RuntimeError(
            "this Flower version has no RabbitMQ._tls_kwargs; check how it verifies the "
            "management API's certificate before upgrading"
        )

    def _tls_kwargs(self: Any) -> dict[str, object]:
        return management_api_tls(self.kwargs.get("broker_use_ssl"))

    broker.RabbitMQ._tls_kwargs = _tls_kwargs


#: Events of a task's earlier publish that may reach a monitor after its task-retried event.
STALE_AFTER_RETRY = frozenset({"sent", "received"})


def keep_retry_until_next_attempt() -> None:
    """Make Celery's event state (Flower's task list and API) keep RETRY until the next attempt.

    `celery.events.state.Task.event` lets any event overwrite RETRY. A retry publishes the next
    attempt's message with a buffered task-sent event (core/events.py) that reaches monitors
    after the worker's task-retried, so a task waiting out its countdown showed PENDING while
    `AsyncResult` said RETRY. Here a task-sent or task-received event stamped at or before the
    retry keeps its fields (as Celery merges an out-of-order task-received) but not its state;
    the next attempt's task-received or task-started, or its end, moves the task on.
    """
    from celery import states
    from celery.events import state

    task_class: Any = state.Task
    original = task_class.event
    if getattr(original, "keeps_retry", False):
        return
    keep = task_class.merge_rules[states.RECEIVED]

    def event(
        self: Any,
        type_: str,
        timestamp: float | None = None,
        local_received: float | None = None,
        fields: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        stale = (
            self.state == states.RETRY
            and type_ in STALE_AFTER_RETRY
            and (timestamp or 0) <= (self.retried or 0)
        )
        if not stale:
            return original(self, type_, timestamp, local_received, fields, **kwargs)  # type: ignore[no-any-return]
        setattr(self, type_, timestamp)
        self.__dict__.update({k: v for k, v in (fields or {}).items() if k in keep})
        return None

    event.keeps_retry = True  # type: ignore[attr-defined]
    task_class.event = event
