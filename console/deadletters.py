"""A snapshot of the dead-letter queue, kept fresh in the background, that pages are cut from.

Reading the queue means a basic.get per message (tasks.deadletter.store): seconds for 10,000
messages, far too slow for a request. One thread reads it when its depth changes (a passive
declare every `interval` seconds, which costs the broker nothing), at least every `max_age`
seconds, and right after an action. It keeps each message as the store reads it, with long
header values cut and only the start of the body: about a kilobyte a message, whatever the
bodies weigh. Pages redact what they show (console/views.py).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from core.redaction import redact
from tasks.deadletter.store import Entry

logger = logging.getLogger(__name__)

#: Longest header value kept (characters); longer ones are cut and marked.
HEADER_CHARS = 300


def _cut(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str) and len(value) > HEADER_CHARS:
        return value[:HEADER_CHARS] + "…"
    if isinstance(value, dict):
        return {key: _cut(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_cut(item) for item in value]
    return value


def trimmed(entry: Entry, preview_bytes: int) -> Entry:
    """The entry with its headers' long values cut and only the start of its body kept (its
    `size` stays the whole body's)."""
    return replace(entry, headers=_cut(entry.headers), body=entry.body[:preview_bytes])


def headers(entry: Entry) -> dict[str, Any]:
    """The entry's headers as JSON values, redacted, for display."""
    return dict(redact(entry.details()["headers"]))


def preview(entry: Entry) -> str:
    """The start of the body as text, redacted, saying when it was cut."""
    text = entry.body.decode("utf-8", errors="replace")
    if entry.size > len(entry.body):
        text += f"… ({entry.size} bytes)"
    return str(redact(text))


#: A read of the queue may take at most this share of the time: reading 10,000 messages takes
#: seconds of the broker's work, so a busy dead-letter queue is not re-read back to back.
READ_SHARE = 0.2


@dataclass
class Snapshot:
    letters: list[Entry]
    #: Unix time of the read; 0 before the first one.
    taken_at: float
    error: str | None = None
    #: Seconds the read took.
    read_seconds: float = 0.0

    @functools.cached_property
    def choices(self) -> dict[str, list[str]]:
        """The values each filter (queue, task, reason) can take, most frequent first."""
        return {key: list(self.counts(key)) for key in ("queue", "task", "reason")}

    def counts(self, key: str) -> dict[str, int]:
        found = Counter(str(getattr(entry, key) or "-") for entry in self.letters)
        return dict(found.most_common())


class DeadLetterSnapshot:
    """The latest read of the dead-letter queue and the thread that refreshes it."""

    def __init__(
        self,
        read: Callable[[], Iterable[Entry]],
        depth: Callable[[], int | None],
        *,
        preview_bytes: int,
        interval: float,
        max_age: float = 600.0,
    ) -> None:
        self._read, self._depth = read, depth
        self.preview_bytes, self.interval, self.max_age = preview_bytes, interval, max_age
        self.current = Snapshot([], 0.0)
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> Snapshot:
        """Read the whole queue now (the caller holds the store's lock, see sources)."""
        started = time.monotonic()
        letters = [trimmed(entry, self.preview_bytes) for entry in self._read()]
        self.current = Snapshot(letters, time.time(), read_seconds=time.monotonic() - started)
        return self.current

    def request_refresh(self) -> None:
        self._wanted.set()

    def _due(self, last_depth: int | None) -> tuple[bool, int | None]:
        """Whether to read now: asked to (an action), or the depth changed or the read is old,
        and the last read was long enough ago (READ_SHARE)."""
        if self._wanted.is_set():
            return True, self._depth()
        depth = self._depth()
        age = time.time() - self.current.taken_at
        if age < self.current.read_seconds / READ_SHARE:
            return False, last_depth
        return depth != last_depth or age >= self.max_age, depth

    def _loop(self) -> None:
        depth: int | None = -1
        while not self._stop.is_set():
            try:
                due, now_depth = self._due(depth)
                if due:
                    self._wanted.clear()
                    self.refresh()
                    depth = now_depth
            except Exception as exc:  # the broker is away: keep the last read and say so
                error = redact(str(exc))
                logger.warning("console: reading the dead-letter queue failed: %s", error)
                last = self.current
                self.current = Snapshot(last.letters, last.taken_at, error, last.read_seconds)
            self._wanted.wait(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dead-letters", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wanted.set()
