"""Graceful shutdown: say what the worker is doing while it drains.

The soft-shutdown window itself is configured in celeryconfig.py
(worker_soft_shutdown_timeout); this module makes it visible in the logs, so an operator can
tell a draining worker from a stuck one.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

logger = logging.getLogger(__name__)


def _on_shutting_down(sig: str = "", how: str = "", exitcode: int = 0, **_: Any) -> None:
    logger.warning("shutdown requested signal=%s mode=%s exitcode=%s", sig, how, exitcode)


def _on_shutdown(sender: Any = None, **_: Any) -> None:
    logger.info("worker stopped node=%s", getattr(sender, "hostname", "-"))


def connect() -> None:
    signals.worker_shutting_down.connect(_on_shutting_down, weak=False)
    signals.worker_shutdown.connect(_on_shutdown, weak=False)
