"""Worker logging: every line carries the task id and name when it is written inside a task."""

from __future__ import annotations

import logging
import logging.config
import os
from typing import Any

from celery import signals
from celery._state import get_current_task

FORMAT = (
    "%(asctime)s level=%(levelname)s process=%(processName)s logger=%(name)s "
    "task_id=%(task_id)s task_name=%(task_name)s %(message)s"
)


class TaskContextFilter(logging.Filter):
    """Adds task_id and task_name ("-" outside a task) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        task = get_current_task()
        request = getattr(task, "request", None) if task else None
        record.task_id = getattr(request, "id", None) or "-"
        record.task_name = (task.name if task and request and request.id else None) or "-"
        return True


def configure(loglevel: str | int | None = None) -> None:
    """One logging setup for worker, beat and their pool processes."""
    level = loglevel or os.environ.get("CONVEYOR_LOG_LEVEL", "INFO")
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"task": {"()": TaskContextFilter}},
            "formatters": {"keyvalue": {"format": FORMAT}},
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "formatter": "keyvalue",
                    "filters": ["task"],
                }
            },
            "root": {"handlers": ["stderr"], "level": level},
        }
    )


def _on_setup_logging(loglevel: Any = None, **_: Any) -> None:
    # Connecting to setup_logging tells Celery not to configure logging itself.
    configure(loglevel)


def connect() -> None:
    signals.setup_logging.connect(_on_setup_logging, weak=False)
