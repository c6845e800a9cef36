"""Tasks that only the monitoring tests use; their worker loads them with --include."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery.utils.log import get_task_logger

from tasks.celery_app import app

logger = get_task_logger(__name__)


@app.task(name="tests.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(name="tests.retry_once", bind=True, max_retries=1)
def retry_once(self: Any) -> int:
    """Asks for one retry (1 s later), then returns the number of retries it took."""
    if self.request.retries == 0:
        raise self.retry(countdown=1)
    return int(self.request.retries)


@app.task(name="tests.log_line", bind=True)
def log_line(self: Any, text: str, batch_id: str | None = None) -> str:
    """Writes `text` to the task logger and returns the task id."""
    logger.info("note %s", text)
    return str(self.request.id)


@app.task(name="tests.hold")
def hold(key: str, timeout: float = 60) -> bool:
    """Runs until the test sets `release:<key>` in the ledger (or `timeout` passes)."""
    ledger = redis.Redis.from_url(os.environ["CONVEYOR_TEST_LEDGER_URL"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ledger.exists(f"release:{key}"):
            return True
        time.sleep(0.1)
    return False


@app.task(name="tests.retry_later", bind=True, max_retries=1)
def retry_later(self: Any, countdown: int) -> int:
    """Asks for one retry `countdown` seconds later, then returns the number of retries."""
    if self.request.retries == 0:
        raise self.retry(countdown=countdown)
    return int(self.request.retries)


@app.task(name="tests.always_retry", bind=True, max_retries=1)
def always_retry(self: Any) -> None:
    """Retries 1 s later until its retries run out; then it is rejected (dead-lettered)."""
    raise self.retry(countdown=1)


class Unreachable(Exception):
    """An error whose repr is not `Type(...)` and holds a URL, as urllib's HTTPError's does."""

    def __repr__(self) -> str:
        return f"<Unreachable {self.args[0]}>"


@app.task(name="tests.fail_unreachable")
def fail_unreachable(url: str) -> None:
    raise Unreachable(url)
