"""A snapshot of the dead-letter queue, kept fresh in the background, that pages are cut from.

Reading the queue means a basic.get per message (tasks.deadletter.store): seconds for 10,000
messages, far too slow for a request. One thread reads it when its depth changes (a passive
declare every `interval` seconds, which costs the broker nothing), at least every `max_age`
seconds, and right after an action. It keeps each message's summary, its headers with long
values cut, and a short body preview, all redacted: about a kilobyte a message, whatever the
bodies weigh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from core.redaction import redact

logger = logging.getLogger(__name__)

#: Longest header value kept (characters); longer ones are cut and marked.
HEADER_CHARS = 300
#: The reasons of entries that can never succeed (dead-letter reasons, CONTRACTS.md), for a
#: store that does not yet say `replayable` itself.
NEVER_REPLAYABLE = frozenset({"content_disallowed", "undecodable", "malformed", "unknown_task"})


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > HEADER_CHARS:
        return value[:HEADER_CHARS] + "…"
    if isinstance(value, dict):
        return {key: _cut(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_cut(item) for item in value]
    return value


@dataclass(frozen=True)
class Letter:
    """What the console keeps of one dead-lettered message."""

    summary: dict[str, Any]
    headers: dict[str, Any] = field(repr=False)
    preview: str = field(repr=False)

    @property
    def id(self) -> str:
        return str(self.summary["id"])

    @property
    def replayable(self) -> bool:
        given = self.summary.get("replayable")
        if given is not None:
            return bool(given)
        return self.summary.get("reason") not in NEVER_REPLAYABLE

    def matches(self, *, queue: str | None, task: str | None, reason: str | None) -> bool:
        wanted = {"queue": queue, "task": task, "reason": reason}
        return all(value is None or self.summary.get(key) == value for key, value in wanted.items())


def letter_from(entry: Any, preview_bytes: int) -> Letter:
    """Keep a store Entry's summary, its headers and the start of its body, redacted."""
    details = entry.details()
    body = entry.body[:preview_bytes].decode("utf-8", errors="replace")
    if len(entry.body) > preview_bytes:
        body += f"… ({len(entry.body)} bytes)"
    return Letter(
        summary=redact(entry.summary()),
        headers=redact(_cut(details["headers"])),
        preview=redact(body),
    )


@dataclass
class Snapshot:
    letters: list[Letter]
    #: Unix time of the read; 0 before the first one.
    taken_at: float
    error: str | None = None


class DeadLetterSnapshot:
    """The latest read of the dead-letter queue and the thread that refreshes it."""

    def __init__(
        self,
        read: Callable[[], Iterable[Any]],
        depth: Callable[[], int | None],
        *,
        preview_bytes: int,
        interval: float,
        max_age: float = 60.0,
    ) -> None:
        self._read, self._depth = read, depth
        self.preview_bytes, self.interval, self.max_age = preview_bytes, interval, max_age
        self.current = Snapshot([], 0.0)
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> Snapshot:
        """Read the whole queue now (the caller holds the store's lock, see sources)."""
        letters = [letter_from(entry, self.preview_bytes) for entry in self._read()]
        self.current = Snapshot(letters, time.time())
        return self.current

    def request_refresh(self) -> None:
        self._wanted.set()

    def _due(self, last_depth: int | None) -> tuple[bool, int | None]:
        depth = self._depth()
        stale = time.time() - self.current.taken_at >= self.max_age
        return self._wanted.is_set() or stale or depth != last_depth, depth

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
                logger.warning("console: reading the dead-letter queue failed: %s", exc)
                last = self.current
                self.current = Snapshot(last.letters, last.taken_at, redact(str(exc)))
            self._wanted.wait(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dead-letters", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wanted.set()
