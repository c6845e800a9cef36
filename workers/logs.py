"""Worker logging: every line written inside a task carries the task's id, name and queue.

Every line, its traceback included, has URL passwords and ``secret=value`` pairs masked
(core.redaction): an exception that quotes a connection URL does not put its password in the
log shipper.

One variable chooses the format: ``CONVEYOR_LOG_FORMAT=json`` (one JSON object per line, the
default in the container image, for log shippers) or ``keyvalue`` (readable ``key=value``
lines, the default elsewhere). Both carry the same fields: task_id, task_name, queue, retries
and batch_id (when the task has one, as a ``batch_id`` header or keyword argument).
"""

from __future__ import annotations

import logging
import logging.config
import os
from typing import Any

from celery import current_app, signals
from celery._state import get_current_task
from pythonjsonlogger.json import JsonFormatter

from core.redaction import redact_text

#: The task fields, in the order a key=value line shows them.
TASK_FIELDS = ("task_id", "task_name", "queue", "retries", "batch_id")

FORMAT = (
    "%(asctime)s level=%(levelname)s process=%(processName)s logger=%(name)s "
    "task_id=%(task_id)s task_name=%(task_name)s queue=%(queue)s retries=%(retries)s "
    "%(batch_part)s%(message)s"
)
JSON_FIELDS = "%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s"


def task_fields() -> dict[str, Any]:
    """The fields of the task running in this thread; empty outside a task."""
    task = get_current_task()
    request = getattr(task, "request", None) if task else None
    if task is None or request is None or not getattr(request, "id", None):
        return {}
    delivery = getattr(request, "delivery_info", None) or {}
    kwargs = getattr(request, "kwargs", None) or {}
    batch_id = getattr(request, "batch_id", None) or (
        kwargs.get("batch_id") if isinstance(kwargs, dict) else None
    )
    fields: dict[str, Any] = {
        "task_id": request.id,
        "task_name": task.name,
        "queue": delivery.get("routing_key"),
        "retries": getattr(request, "retries", 0) or 0,
    }
    if batch_id:
        fields["batch_id"] = str(batch_id)
    return fields


class TaskContextFilter(logging.Filter):
    """Puts the running task's fields on every record written inside it."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in task_fields().items():
            setattr(record, key, value)
        return True


class KeyValueFormatter(logging.Formatter):
    """key=value lines; "-" for the task fields outside a task."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        for key in TASK_FIELDS:
            if getattr(record, key, None) is None:
                setattr(record, key, "-")
        batch_id = record.__dict__.get("batch_id")
        record.batch_part = f"batch_id={batch_id} " if batch_id not in (None, "-") else ""
        return redact_text(super().format(record))


class RedactedJsonFormatter(JsonFormatter):
    """JsonFormatter whose lines have URL passwords and ``secret=value`` pairs masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def json_formatter() -> JsonFormatter:
    """One JSON object per line; task fields appear only on lines written inside a task."""
    return RedactedJsonFormatter(
        JSON_FIELDS,
        rename_fields={
            "asctime": "time",
            "levelname": "level",
            "processName": "process",
            "name": "logger",
        },
    )


def configure(loglevel: str | int | None = None, log_format: str | None = None) -> None:
    """One logging setup for worker, beat and their pool processes."""
    level = loglevel or os.environ.get("CONVEYOR_LOG_LEVEL", "INFO")
    log_format = (log_format or os.environ.get("CONVEYOR_LOG_FORMAT") or "keyvalue").lower()
    if log_format not in ("json", "keyvalue"):
        raise ValueError(f"CONVEYOR_LOG_FORMAT must be json or keyvalue, not {log_format!r}")
    factory = json_formatter if log_format == "json" else KeyValueFormatter
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"task": {"()": TaskContextFilter}},
            "formatters": {"main": {"()": factory}},
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "formatter": "main",
                    "filters": ["task"],
                }
            },
            "root": {"handlers": ["stderr"], "level": level},
        }
    )


def _on_setup_logging(loglevel: Any = None, **_: Any) -> None:
    # Connecting to setup_logging tells Celery not to configure logging itself. The format is
    # the app's setting: celeryconfig has already refused a bad CONVEYOR_LOG_FORMAT in one line.
    conf = current_app.conf
    configure(loglevel or conf.get("conveyor_log_level"), conf.get("conveyor_log_format"))


def connect() -> None:
    signals.setup_logging.connect(_on_setup_logging, weak=False)
