"""Why a message is in the dead-letter queue: the headers a worker writes and the store reads.

A rejected message cannot gain headers, so a worker that dead-letters a message itself
publishes a confirmed copy carrying these headers to the dead-letter exchange, then acks the
original (workers/dead_letter.py). Messages the broker dead-letters on its own (delivery
limit, expiry, a plain reject) carry only RabbitMQ's ``x-death``; tasks/deadletter/store.py
derives their reason from it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from celery.exceptions import Reject

from core.redaction import redact_text

REASON_HEADER = "x-conveyor-reason"
EXCEPTION_HEADER = "x-conveyor-exception"
MESSAGE_HEADER = "x-conveyor-message"
WORKER_HEADER = "x-conveyor-worker"
FAILED_AT_HEADER = "x-conveyor-failed-at"
QUEUE_HEADER = "x-conveyor-queue"
#: Every header above: a replayed message drops them, so a later death tells its own story.
REASON_HEADERS = (
    REASON_HEADER,
    EXCEPTION_HEADER,
    MESSAGE_HEADER,
    WORKER_HEADER,
    FAILED_AT_HEADER,
    QUEUE_HEADER,
)
#: Reasons a worker writes. The first four are the message's own fault: replaying it as it
#: is can never succeed.
NEVER_REPLAYABLE = frozenset({"content_disallowed", "undecodable", "malformed", "unknown_task"})
RETRIES_EXHAUSTED = "retries_exhausted"
#: Characters of the exception's message kept: enough to recognise it, never a payload.
MESSAGE_CHARS = 200


class RetriesExhausted(Reject):
    """Raised by a task whose last retry failed; the worker dead-letters it with its reason.

    `reason` is the exception of the last attempt. A subclass of Reject, so that a worker
    without Conveyor's hooks still rejects the message to the dead-letter queue.
    """


def short_message(text: str) -> str:
    """One line, redacted like the logs, at most MESSAGE_CHARS long."""
    line = " ".join(redact_text(text).split())
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 1] + "…"


def reason_headers(
    reason: str, exception: str, message: str, *, worker: str, queue: str
) -> dict[str, str]:
    """The headers of a dead-letter copy; `message` is redacted and shortened here."""
    return {
        REASON_HEADER: reason,
        EXCEPTION_HEADER: exception,
        MESSAGE_HEADER: short_message(message),
        WORKER_HEADER: worker,
        FAILED_AT_HEADER: datetime.now(UTC).isoformat(timespec="seconds"),
        QUEUE_HEADER: queue,
    }
