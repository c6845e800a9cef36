"""Canned data behind the console's web layer, for tests that need no broker: the same method
names as console.sources.Sources, returning the stores' own types."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from console.deadletters import DeadLetterSnapshot
from console.sources import Page
from tasks.batch.store import Status
from tasks.deadletter.store import Entry, matching
from tasks.schedule.store import EntryView

HOSTILE = "<script>alert('owned')</script>"
SECRET_URL = "redis://:hunter2-secret@cache:6379/0"


def status(batch_id: str = "b1", state: str = "running", **changes: Any) -> Status:
    values: dict[str, Any] = {
        "id": batch_id,
        "handler": "aggregate",
        "state": state,
        "attempt": 1,
        "total": 100,
        "published": True,
        "succeeded": 40,
        "failed": 2,
        "skipped": 0,
        "pending": 58,
        "chunk_size": 10,
        "chunks": 10,
        "created_at": "2026-12-03T10:00:00.000+00:00",
        "started_at": "2026-12-03T10:00:01.000+00:00",
        "finished_at": None,
        "elapsed_seconds": 4.0,
        "items_per_second": 10.5,
        "result": None,
    }
    values.update(changes)
    return Status(**values)


def schedule_entry(name: str = "nightly", **changes: Any) -> EntryView:
    values: dict[str, Any] = {
        "name": name,
        "task": "reports.daily",
        "schedule": "every 60s",
        "enabled": True,
        "args": [],
        "kwargs": {},
        "queue": None,
        "expires": 50.0,
        "allow_overlap": False,
        "reason": f"made by {HOSTILE}",
        "source": "runtime",
        "last_run_at": None,
        "next_run_at": "2026-12-03T10:01:00+00:00",
    }
    values.update(changes)
    return EntryView(**values)


class Message:
    """What tasks.deadletter.store.entry_from reads of a kombu message."""

    def __init__(self, task_id: str, body: bytes, reason: str) -> None:
        self.headers = {
            "id": task_id,
            "task": "tests.echo",
            "x-death": [{"queue": "default", "reason": reason, "count": 1}],
            "x-conveyor-reason": reason,
            "origin": SECRET_URL,
        }
        self.properties: dict[str, Any] = {"correlation_id": task_id}
        self.body = body
        self.content_type = "application/json"


def dead_letter_entries() -> list[Entry]:
    from tasks.deadletter.store import entry_from

    hostile = f'[["{HOSTILE}", "{SECRET_URL}"], {{}}, {{}}]'.encode()
    return [
        entry_from(Message("t-hostile", hostile, "rejected")),
        entry_from(Message("t-other", b"[[1], {}, {}]", "expired")),
    ]


@dataclass
class FakeSources:
    flower_url: str | None = "http://flower.example:5555"
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.snapshot = DeadLetterSnapshot(
            dead_letter_entries, lambda: 2, preview_bytes=512, interval=60
        )
        self.snapshot.refresh()

    def queues(self) -> dict[str, Any]:
        row = {"name": "default", "ready": 3, "unacked": 1, "consumers": 2}
        row |= {"oldest_waiting_seconds": 4.2, "dead_letters": 2}
        return {
            "queues": [row],
            "queue_source": "management",
            "delayed_messages": 0,
            "dead_letters": {"queue": "conveyor.dead_letter", "messages": 2},
        }

    def batches(self, *, offset: int, limit: int, state: str | None) -> Page:
        hostile = status("b2", "completed", handler=HOSTILE, result={"x": HOSTILE})
        return Page([status(), hostile], 2, offset, limit)

    def batch(self, batch_id: str, *, offset: int, limit: int) -> tuple[Status, Page] | None:
        if batch_id == "missing":
            return None
        failure = {"index": 3, "line": 5, "error": f"bad {SECRET_URL}", "item": {"v": HOSTILE}}
        return status(batch_id, result={"note": HOSTILE}), Page([failure], 1, offset, limit)

    def cancel_batch(self, batch_id: str) -> bool:
        self.calls.append(("cancel", batch_id))
        return True

    def retry_batch(self, batch_id: str) -> int:
        self.calls.append(("retry", batch_id))
        return 2

    def schedules(self) -> list[dict[str, Any]]:
        return [{**schedule_entry().as_dict(), "last_success": None}]

    def schedule_action(self, action: str, name: str) -> str | None:
        self.calls.append((action, name))
        return None

    def dead_letters(self, *, queue: str | None, task: str | None, reason: str | None) -> Any:
        select = matching(origin=queue, task=task, reason=reason)
        return [x for x in self.snapshot.current.letters if select(x)]

    def dead_letter(self, entry_id: str) -> Any:
        return next((x for x in self.snapshot.current.letters if x.id == entry_id), None)

    def replay(self, ids: set[str], *, force: bool) -> list[str]:
        self.calls.append(("replay", sorted(ids), force))
        return sorted(ids)

    def purge(self, ids: set[str] | None) -> int:
        self.calls.append(("purge", None if ids is None else sorted(ids)))
        return len(ids or ())


STATUS_FIELDS = {f.name for f in fields(Status)}
ENTRY_VIEW_FIELDS = {f.name for f in fields(EntryView)}
