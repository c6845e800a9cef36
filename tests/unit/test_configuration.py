"""Every setting in docs/configuration.md, from the environment to its effective value.

The cases are read from the doc's tables, so a documented variable without a way here to check
it, or a setting the doc names that the configuration lacks, fails. Values are read where
Conveyor reads them: a Celery app configured from celeryconfig (derived settings included:
the queues' arguments, TLS, signing), or the module that reads the variable itself.
"""

from __future__ import annotations

import ast
import importlib
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import celeryconfig
from core.config import ConfigurationError
from tests.infra import ROOT

DOC = (ROOT / "docs" / "configuration.md").read_text()


def table(heading: str, column: int = 1) -> list[str]:
    """The cells of `column` (from 1) of the table under `heading`."""
    section = DOC.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [row.split("|")[column] for row in rows[1:]]  # skip the header row


#: Variables of their own, as the doc's first column names them.
VARIABLES = [
    name
    for cell in table("Variables of their own")
    for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell)
]
#: Settings named in the guarantees table's second column (`name` or `name = value`).
GUARANTEE_SETTINGS = sorted(
    {
        token.split(" = ")[0]
        for row in table("The guarantees and the settings behind them", column=2)
        for token in re.findall(r"`([^`]+)`", row)
        if re.fullmatch(r"[a-z][a-z0-9_]*", token.split(" = ")[0])
    }
)
#: Names in that column that are not Conveyor settings: RabbitMQ's consumer_timeout (set in
#: deploy/rabbitmq) and the task exchange's name, `conveyor`.
NOT_SETTINGS = {"consumer_timeout", "conveyor"}


def assigned_names(node: ast.stmt) -> list[str]:
    """Setting names a module-level statement assigns (inside an `if` too, not in loops)."""
    if isinstance(node, ast.If):
        return [name for child in node.body + node.orelse for name in assigned_names(child)]
    targets = node.targets if isinstance(node, ast.Assign) else []
    targets += [node.target] if isinstance(node, ast.AnnAssign) else []
    names = [
        name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)
    ]
    return [name for name in names if name.islower() and not name.startswith("_")]


def settings_before_overrides() -> tuple[list[str], list[str]]:
    """Names assigned in celeryconfig before the apply_overrides call, and those after it."""
    body = ast.parse((ROOT / "celeryconfig.py").read_text()).body
    call = next(
        index
        for index, node in enumerate(body)
        if isinstance(node, ast.Expr) and "apply_overrides" in ast.unparse(node)
    )
    before = [name for node in body[:call] for name in assigned_names(node)]
    after = [name for node in body[call:] for name in assigned_names(node)]
    return before, after


#: Plain settings: every one can be overridden as CELERY_<NAME>.
PLAIN = sorted(
    {
        name
        for name in settings_before_overrides()[0]
        if name not in ("broker_url", "result_backend")
        and (
            getattr(celeryconfig, name) is None
            or isinstance(getattr(celeryconfig, name), str | int | float | list | tuple | dict)
        )
    }
)


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Celery]]:
    """configure(VAR=value, ...) -> a Celery app configured from celeryconfig under them."""
    for name in list(__import__("os").environ):
        if name.startswith(("CELERY_", "CONVEYOR_", "OTEL_")):
            monkeypatch.delenv(name)

    def load(**variables: str) -> Celery:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        module = importlib.reload(celeryconfig)
        app = Celery("probe", set_as_current=False)
        app.config_from_object(module)
        return app

    yield load
    monkeypatch.undo()
    importlib.reload(celeryconfig)


def queue_arguments(app: Celery) -> list[dict[str, Any]]:
    return [queue.queue_arguments for queue in app.conf.task_queues]


def definitions_secret(name: str) -> str:
    sys.path.insert(0, str(ROOT / "deploy" / "rabbitmq"))
    try:
        module = importlib.import_module("definitions")
        return str(module.secret(name))
    finally:
        sys.path.pop(0)
        sys.modules.pop("definitions", None)


def root_logging(log_format: str | None = None) -> tuple[int, str]:
    """Level and formatter class after the worker's logging setup (restored afterwards)."""
    from workers import logs

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.configure(None, log_format)
        return root.level, type(root.handlers[-1].formatter).__name__
    finally:
        root.handlers[:], root.level = handlers, level


NODES = "amqp://a:b@n1:5672//;amqp://a:b@n2:5672//;amqp://a:b@n3:5672//"
TLS_URL = "amqps://a:b@rabbit.example:5671/conveyor"
SIGNING = {
    "CONVEYOR_SIGNING": "on",
    "CONVEYOR_SIGNING_KEY": "/keys/me.key",
    "CONVEYOR_SIGNING_CERT": "/keys/me.pem",
    "CONVEYOR_SIGNING_CERT_STORE": "/keys/trusted/*.pem",
}


def conf(name: str) -> Callable[[Celery], Any]:
    """The setting as Celery reads it (its properties, such as broker_write_url, included)."""
    return lambda app: getattr(app.conf, name)


def conf_item(name: str, key: str) -> Callable[[Celery], Any]:
    return lambda app: getattr(app.conf, name)[key]


def every_queue(key: str) -> Callable[[Celery], Any]:
    """The queues' value of argument `key`, when they all agree."""

    def read(app: Celery) -> Any:
        values = {repr(arguments.get(key)) for arguments in queue_arguments(app)}
        assert len(values) == 1, values
        return queue_arguments(app)[0][key]

    return read


def outside(read: Callable[[], Any]) -> Callable[[Celery], Any]:
    """A value read by the module that reads the variable itself, not from the app."""
    return lambda app: read()


FILE_URL = "amqp://f:pw@from-file:5672/v"
#: Variable -> (the environment that sets it, how its effective value is read, that value).
#: "{file}" stands for a file holding FILE_URL.
PROBES: dict[str, tuple[dict[str, str], Callable[[Celery], Any], Any]] = {
    "CELERY_BROKER_URL": (
        {"CELERY_BROKER_URL": "amqp://u:p@h1/v"},
        conf("broker_write_url"),
        "amqp://u:p@h1/v",
    ),
    "CELERY_RESULT_BACKEND": (
        {"CELERY_RESULT_BACKEND": "redis://h:6379/3"},
        conf("result_backend"),
        "redis://h:6379/3",
    ),
    "CELERY_BROKER_URL_FILE": (
        {"CELERY_BROKER_URL_FILE": "{file}"},
        conf("broker_write_url"),
        FILE_URL,
    ),
    "CELERY_RESULT_BACKEND_FILE": (
        {"CELERY_RESULT_BACKEND_FILE": "{file}"},
        conf("result_backend"),
        FILE_URL,
    ),
    "CONVEYOR_BROKER_TLS_CA": (
        {"CELERY_BROKER_URL": TLS_URL, "CONVEYOR_BROKER_TLS_CA": "/ca.pem"},
        conf_item("broker_use_ssl", "ca_certs"),
        "/ca.pem",
    ),
    "CONVEYOR_BROKER_TLS_CERT": (
        {"CELERY_BROKER_URL": TLS_URL, "CONVEYOR_BROKER_TLS_CERT": "/c.pem"},
        conf_item("broker_use_ssl", "certfile"),
        "/c.pem",
    ),
    "CONVEYOR_BROKER_TLS_KEY": (
        {"CELERY_BROKER_URL": TLS_URL, "CONVEYOR_BROKER_TLS_KEY": "/k.pem"},
        conf_item("broker_use_ssl", "keyfile"),
        "/k.pem",
    ),
    "CONVEYOR_DECLARE_ON_PUBLISH": (
        {"CONVEYOR_DECLARE_ON_PUBLISH": "false"},
        conf("conveyor_declare_on_publish"),
        False,
    ),
    "CONVEYOR_SIGNING": (
        SIGNING,
        lambda app: (app.conf.task_serializer, app.conf.accept_content),
        ("auth", ["auth"]),
    ),
    "CONVEYOR_SIGNING_KEY": (SIGNING, conf("security_key"), "/keys/me.key"),
    "CONVEYOR_SIGNING_CERT": (SIGNING, conf("security_certificate"), "/keys/me.pem"),
    "CONVEYOR_SIGNING_CERT_STORE": (SIGNING, conf("security_cert_store"), "/keys/trusted/*.pem"),
    "CONVEYOR_BROKER_SHUFFLE": (
        {"CELERY_BROKER_URL": NODES, "CONVEYOR_BROKER_SHUFFLE": "false"},
        conf("broker_write_url"),
        NODES,
    ),
    "CONVEYOR_QUORUM_GROUP_SIZE": (
        {"CONVEYOR_QUORUM_GROUP_SIZE": "5"},
        every_queue("x-quorum-initial-group-size"),
        5,
    ),
    "CONVEYOR_DELIVERY_LIMIT": (
        {"CONVEYOR_DELIVERY_LIMIT": "3"},
        every_queue("x-delivery-limit"),
        3,
    ),
    "CONVEYOR_TIMEZONE": ({"CONVEYOR_TIMEZONE": "Europe/Paris"}, conf("timezone"), "Europe/Paris"),
    "CONVEYOR_LOG_LEVEL": (
        {"CONVEYOR_LOG_LEVEL": "WARNING"},
        outside(lambda: root_logging()[0]),
        logging.WARNING,
    ),
    "CONVEYOR_LOG_FORMAT": (
        {"CONVEYOR_LOG_FORMAT": "json"},
        outside(lambda: root_logging()[1]),
        "RedactedJsonFormatter",
    ),
    "CONVEYOR_SCHEDULE_REDIS_URL": (
        {"CONVEYOR_SCHEDULE_REDIS_URL": "redis://s:6379/5"},
        conf("redbeat_redis_url"),
        "redis://s:6379/5",
    ),
    "OTEL_EXPORTER_OTLP_ENDPOINT": (
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318"},
        outside(lambda: _tracing()),
        True,
    ),
    "CONVEYOR_HEALTH_DIR": (
        {"CONVEYOR_HEALTH_DIR": "/run/probes"},
        outside(lambda: _health_dir()),
        Path("/run/probes"),
    ),
    "CONVEYOR_EXPORTER_PASSWORD": (
        {"CONVEYOR_EXPORTER_PASSWORD": "e-pw"},
        outside(lambda: definitions_secret("CONVEYOR_EXPORTER_PASSWORD")),
        "e-pw",
    ),
    "CONVEYOR_MONITOR_PASSWORD": (
        {"CONVEYOR_MONITOR_PASSWORD": "m-pw"},
        outside(lambda: definitions_secret("CONVEYOR_MONITOR_PASSWORD")),
        "m-pw",
    ),
}


def probe(variable: str) -> tuple[dict[str, str], Callable[[Celery], Any], Any]:
    """PROBES' entry, or for CONVEYOR_<NAME> with a setting conveyor_<name> (its own variable),
    a changed value of that setting's type read from the app."""
    if variable in PROBES:
        return PROBES[variable]
    setting = variable.lower()
    assert hasattr(celeryconfig, setting), f"{variable} is documented: add how to check it here"
    raw, expected = changed(setting, getattr(celeryconfig, setting))
    return {variable: raw}, conf(setting), expected


def _eq(got: Any, expected: Any) -> None:
    assert got == expected


def _all(arguments: list[dict[str, Any]], key: str, expected: Any) -> None:
    assert arguments and all(argument[key] == expected for argument in arguments), arguments


def _tracing() -> bool:
    from workers import tracing

    return tracing.enabled()


def _health_dir() -> Path:
    from workers import health

    return health.health_dir()


@pytest.mark.parametrize("variable", VARIABLES)
def test_each_documented_variable_reaches_its_effective_value(
    variable: str, configure: Callable[..., Celery], tmp_path: Path
) -> None:
    variables, read, expected = probe(variable)
    secret_file = tmp_path / "secret"
    secret_file.write_text(f"{FILE_URL}\n")
    app = configure(**{k: v.replace("{file}", str(secret_file)) for k, v in variables.items()})
    assert read(app) == expected


def changed(name: str, value: Any) -> tuple[str, Any]:
    """A different value of the setting's type: as the variable holds it, and as parsed."""
    if value is None:
        annotation = str(celeryconfig.__annotations__.get(name, ""))
        return ("3", 3) if annotation.startswith("int") else ("probe", "probe")
    if isinstance(value, str):
        return f"{value}-probe", f"{value}-probe"
    new = CHANGE[type(value)](value)
    return json.dumps(new), new


#: A different value of each JSON type (bool before int: a bool is an int to isinstance).
CHANGE: dict[type, Callable[[Any], Any]] = {
    bool: lambda value: not value,
    int: lambda value: value + 1,
    float: lambda value: value + 1.5,
    dict: lambda value: {**value, "probe": 1},
    list: lambda value: [*value, "probe"],
    tuple: lambda value: [*value, "probe"],
}


#: What a setting needs beside its override to load (signing refuses to start without keys).
NEEDS = {"conveyor_signing": {k: v for k, v in SIGNING.items() if k != "CONVEYOR_SIGNING"}}


def test_the_guarantees_table_names_only_settings_that_exist() -> None:
    assert GUARANTEE_SETTINGS
    missing = set(GUARANTEE_SETTINGS) - set(PLAIN) - NOT_SETTINGS
    assert not missing, f"docs/configuration.md names settings celeryconfig lacks: {missing}"


@pytest.mark.parametrize("name", PLAIN)
def test_every_setting_can_be_overridden_to_its_effective_value(
    name: str, configure: Callable[..., Celery]
) -> None:
    default = getattr(celeryconfig, name)
    raw, expected = changed(name, default)
    app = configure(**NEEDS.get(name, {}), **{f"CELERY_{name.upper()}": raw})
    got = app.conf[name]
    assert got == (tuple(expected) if isinstance(default, tuple) else expected)
    assert type(got) is type(default) or default is None


def test_every_setting_is_defined_before_the_overrides_are_applied() -> None:
    # A setting defined after apply_overrides() would silently ignore its CELERY_<NAME>: new
    # settings go above that section; below it only what is derived from them.
    before, after = settings_before_overrides()
    derived = set(celeryconfig._DERIVED) | set(before)
    # Celery's own read/write URLs (its variables win anyway), and signing's fixed digest.
    derived |= {"broker_read_url", "broker_write_url", "security_digest"}
    assert set(after) <= derived, set(after) - derived


@pytest.mark.parametrize(
    ("variables", "key", "expected"),
    [
        ({"CELERY_CONVEYOR_DELIVERY_LIMIT": "3"}, "x-delivery-limit", 3),
        ({"CONVEYOR_DELIVERY_LIMIT": "4"}, "x-delivery-limit", 4),
        (
            {"CELERY_CONVEYOR_DEAD_LETTER_EXCHANGE": "other.dlx"},
            "x-dead-letter-exchange",
            "other.dlx",
        ),
        ({"CELERY_CONVEYOR_QUORUM_GROUP_SIZE": "3"}, "x-quorum-initial-group-size", 3),
    ],
)
def test_an_override_reaches_the_queues_derived_from_it(
    variables: dict[str, str], key: str, expected: Any, configure: Callable[..., Celery]
) -> None:
    _all(queue_arguments(configure(**variables)), key, expected)


def test_the_task_exchange_override_reaches_the_queues_and_the_default_exchange(
    configure: Callable[..., Celery],
) -> None:
    app = configure(
        CELERY_CONVEYOR_TASK_EXCHANGE="tasks2", CELERY_CONVEYOR_UNROUTABLE_EXCHANGE="lost2"
    )
    assert app.conf.task_default_exchange == "tasks2"
    for queue in app.conf.task_queues:
        assert queue.exchange.name == "tasks2"
        assert queue.exchange.arguments == {"alternate-exchange": "lost2"}


@pytest.mark.parametrize(
    ("variable", "raw", "why"),
    [
        ("CELERY_TASK_TIME_LIMIT", "abc", "not an integer"),
        ("CELERY_TASK_TIME_LIMIT", "60.5", "not an integer"),
        ("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", "soon", "not a number"),
        ("CELERY_TASK_ACKS_LATE", "maybe", "not a boolean"),
        ("CELERY_TASK_PUBLISH_RETRY_POLICY", "[1]", "not a JSON object"),
        ("CELERY_ACCEPT_CONTENT", "json", "not a JSON list"),
        ("CELERY_WORKER_CONCURRENCY", "many", "not an integer"),
        ("CONVEYOR_DELIVERY_LIMIT", "ten", "not an integer"),
        ("CONVEYOR_SIGNING", "perhaps", "not a boolean"),
        ("CELERY_TASK_QUEUES", "[]", "task_queues is derived"),
    ],
)
def test_an_override_that_does_not_fit_its_setting_is_refused_naming_it(
    variable: str, raw: str, why: str, configure: Callable[..., Celery]
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        configure(**{variable: raw})
    message = str(refused.value)
    assert message.startswith(variable) and why in message and "\n" not in message
