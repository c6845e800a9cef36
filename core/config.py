"""How celeryconfig.py reads the environment: secrets, typed variables, overrides, URL lists, TLS.

celeryconfig.py lists the settings; this module holds the machinery, so that every variable is
read by the same rules and a bad one is refused with one line naming it
(``ConfigurationError``). Nothing here changes global state: reading configuration never
writes ``os.environ``.
"""

from __future__ import annotations

import json
import os
import random
import ssl
import sys
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: The broker used when CELERY_BROKER_URL is unset: a local RabbitMQ's guest user on vhost "/".
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
#: Exit status of a command that stops on a bad setting (the usage-error status of click).
EXIT_STATUS = 2


class ConfigurationError(ValueError):
    """A setting from the environment is missing, unreadable or of the wrong type.

    Its message is one line that names the variable and what is wrong with it.
    """


def secret(name: str, default: str, environ: Mapping[str, str] = os.environ) -> str:
    """NAME from the environment, or the contents of the file that NAME_FILE names.

    The file form is the Docker/Kubernetes secrets convention: the value never sits in the
    process environment, where `docker inspect` and crash reports would show it.
    """
    path = environ.get(f"{name}_FILE")
    if path:
        if name in environ:
            raise ConfigurationError(f"set {name} or {name}_FILE, not both")
        value = _read_secret_file(name, path)
    else:
        value = environ.get(name, default)
    if not value.strip():
        # An empty URL must not silently become something else (Celery would fall back to
        # its own defaults, and some projects fall back to eager mode).
        raise ConfigurationError(f"{name} is set but empty; give a URL or unset it for the default")
    return value


def optional_secret(name: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Like secret, for a value that may be absent: None when NAME and NAME_FILE are unset.

    An empty NAME counts as unset (compose passes optional variables as empty strings).
    """
    path = environ.get(f"{name}_FILE")
    if not path:
        return environ.get(name) or None
    if environ.get(name):
        raise ConfigurationError(f"set {name} or {name}_FILE, not both")
    return _read_secret_file(name, path) or None


def _read_secret_file(name: str, path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigurationError(f"{name}_FILE={path} cannot be read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{name}_FILE={path} is not UTF-8 text") from exc


# --- Typed values ---------------------------------------------------------------------------


def _to_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("true", "on", "1", "yes"):
        return True
    if lowered in ("false", "off", "0", "no"):
        return False
    raise ValueError("not a boolean (true/false, on/off, 1/0)")


def _to_int(raw: str) -> int:
    value = _json_or_text(raw)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("not an integer")
    return value


def _to_float(raw: str) -> float:
    value = _json_or_text(raw)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("not a number")
    return float(value)


def _to_list(raw: str) -> list[Any]:
    value = _json_or_text(raw)
    if not isinstance(value, list):
        raise ValueError('not a JSON list (e.g. ["a", "b"])')
    return value


def _to_tuple(raw: str) -> tuple[Any, ...]:
    return tuple(_to_list(raw))


def _to_dict(raw: str) -> dict[str, Any]:
    value = _json_or_text(raw)
    if not isinstance(value, dict):
        raise ValueError('not a JSON object (e.g. {"key": 1})')
    return value


def _to_str(raw: str) -> str:
    return raw


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


#: How an override is parsed, by the type of the setting's value. bool before int: a bool is
#: an int to isinstance.
PARSERS: tuple[tuple[type, Callable[[str], Any]], ...] = (
    (bool, _to_bool),
    (int, _to_int),
    (float, _to_float),
    (str, _to_str),
    (list, _to_list),
    (tuple, _to_tuple),
    (dict, _to_dict),
)
#: Parsers by the names that may appear in an annotation such as ``int | None``.
_PARSERS_BY_NAME = {kind.__name__: parse for kind, parse in PARSERS}


def parse(variable: str, raw: str, like: Any, annotation: str | None = None) -> Any:
    """`raw` parsed to the type of `like` (the setting's default), or ConfigurationError.

    A setting whose default is None takes its type from its annotation (``int | None``);
    without one, the value is JSON when it parses, otherwise the string.
    """
    parser = _parser_for(like, annotation)
    try:
        return parser(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{variable}={raw!r} is refused: {exc}") from None


def _parser_for(like: Any, annotation: str | None) -> Callable[[str], Any]:
    if like is None:
        names = [part.strip().split("[")[0] for part in (annotation or "").split("|")]
        kinds = [name for name in names if name in _PARSERS_BY_NAME]
        if len(kinds) == 1:
            return _nullable(_PARSERS_BY_NAME[kinds[0]])
        return _json_or_text
    for kind, parser in PARSERS:
        if isinstance(like, kind):
            return parser
    raise TypeError(f"no parser for a setting of type {type(like).__name__}")


def _nullable(parser: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_or_null(raw: str) -> Any:
        return None if raw.strip() in ("", "null") else parser(raw)

    return parse_or_null


def one_of(
    name: str, default: str, choices: tuple[str, ...], environ: Mapping[str, str] = os.environ
) -> str:
    """Variable `name`, one of `choices` in any case (given back as spelled there); `default`
    when unset or empty."""
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    for choice in choices:
        if raw.strip().lower() == choice.lower():
            return choice
    raise ConfigurationError(f"{name}={raw!r} is refused: not one of {', '.join(choices)}")


def env(name: str, default: Any, environ: Mapping[str, str] = os.environ) -> Any:
    """Variable `name` parsed to the type of `default`; `default` when unset or empty."""
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    return parse(name, raw, default)


# --- Overrides: CELERY_<NAME> -----------------------------------------------------------------

#: Settings with variables of their own, read by `secret` (Celery also reads these two).
OWN_VARIABLES = frozenset({"broker_url", "result_backend"})


def apply_overrides(
    settings: MutableMapping[str, Any],
    *,
    derived: Mapping[str, str],
    environ: Mapping[str, str] = os.environ,
) -> None:
    """Let CELERY_<NAME> override any setting in `settings` (a module's globals).

    A setting is a lowercase public name whose value is None, a string, number, bool, list,
    tuple or dict; each value is parsed to the setting's type. Call this before deriving
    anything from the settings. A variable naming a setting in `derived` (name -> what to set
    instead) is refused: that setting is computed from others, and an override would not reach
    what was computed.
    """
    annotations: dict[str, str] = {
        name: str(kind) for name, kind in settings.get("__annotations__", {}).items()
    }
    for name, why in derived.items():
        variable = f"CELERY_{name.upper()}"
        if variable in environ:
            raise ConfigurationError(f"{variable} is refused: {name} is derived; {why}")
    for name, value in list(settings.items()):
        variable = f"CELERY_{name.upper()}"
        if not _is_setting(name, value) or name in OWN_VARIABLES or variable not in environ:
            continue
        settings[name] = parse(variable, environ[variable], value, annotations.get(name))


def _is_setting(name: str, value: Any) -> bool:
    if name.startswith("_") or not name.islower():
        return False
    return value is None or isinstance(value, str | int | float | bool | list | tuple | dict)


# --- Broker URL lists and TLS -------------------------------------------------------------------


def broker_urls(url: str, *, shuffle: bool, rng: random.Random | None = None) -> list[str]:
    """The nodes of a ";"-separated broker URL list, in this process's own random order when
    `shuffle` (so that clients spread over a cluster's nodes), else in the order given."""
    urls = [part.strip() for part in url.split(";") if part.strip()]
    if shuffle and len(urls) > 1:
        (rng or random).shuffle(urls)
    return urls


def broker_tls(
    url: str, *, ca: str | None, cert: str | None, key: str | None
) -> dict[str, Any] | bool:
    """py-amqp's ssl options for an amqps:// URL (False for amqp://).

    The broker's certificate is always verified, against `ca` (the system's bundle when None),
    and its name checked against the URL's host.
    """
    parts = urlsplit(url)
    if parts.scheme != "amqps":
        return False
    return {
        "cert_reqs": ssl.CERT_REQUIRED,
        # With a cluster's URL list this is the first node's name for every connection of the
        # process, so each node's certificate must carry every node's name (docs/scaling.md).
        "server_hostname": parts.hostname,
        # py-amqp loads no trust store by itself: default to the system's bundle.
        "ca_certs": ca or ssl.get_default_verify_paths().openssl_cafile,
        "certfile": cert or None,
        "keyfile": key or None,
    }


def broker_url_unset(environ: Mapping[str, str] = os.environ) -> bool:
    """True when neither CELERY_BROKER_URL nor its _FILE is set: DEFAULT_BROKER_URL is used."""
    return not environ.get("CELERY_BROKER_URL") and not environ.get("CELERY_BROKER_URL_FILE")


# --- Reporting a bad setting ------------------------------------------------------------------


def run_by_celery_command() -> bool:
    """True in a process started as `celery ...` (or `python -m celery ...`).

    Such a process loads the app inside Celery's command-line code, which would print a
    traceback of any error; a web app importing `tasks` gets the exception instead.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == "celery.__main__":
        return True
    return Path(sys.argv[0] if sys.argv else "").name == "celery"


def exit_on_command_line(error: ConfigurationError) -> None:
    """Under the `celery` command, print the error as one line and exit with status 2.

    Returns otherwise, so that the caller re-raises it for a web app to see.
    """
    if run_by_celery_command():
        print(f"configuration error: {error}", file=sys.stderr)  # noqa: T201
        raise SystemExit(EXIT_STATUS)
