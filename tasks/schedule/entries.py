"""The schedule, as data: every periodic job Conveyor ships, with its reason.

Each entry sets ``expires`` (seconds). It does two things:
- a queued run older than that is discarded by the worker instead of run late (Celery's
  message expiry), so a backlog after an outage never fires stale runs;
- after beat was down, a missed slot older than that is skipped rather than caught up
  (the missed-run policy in tasks/schedule/scheduler.py).

Crontab entries are read in the app's timezone (``CONVEYOR_TIMEZONE``, UTC by default).
Runtime entries (``celery -A tasks schedule add``) are built from the same EntrySpec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery.schedules import crontab

#: Message headers that carry an entry's identity and overlap policy to the worker.
ENTRY_HEADER = "conveyor_schedule"
OVERLAP_HEADER = "conveyor_overlap"
#: The slot (ISO time) beat fired a run for: two runs of one slot would share it.
SLOT_HEADER = "conveyor_scheduled_for"


#: The shortest period: beat fires an entry at most once per tick, and delayed delivery and
#: the slot headers count in whole seconds, so a shorter one could not be kept.
MIN_EVERY_SECONDS = 1.0


class InvalidEntry(ValueError):
    """A schedule entry that cannot be stored; the message says what to fix."""


def parse_cron(expression: str) -> crontab:
    """A crontab from five fields (minute hour day-of-month month day-of-week)."""
    fields = expression.split()
    if len(fields) != 5:
        raise InvalidEntry(
            f"invalid cron expression {expression!r}: expected 5 fields "
            "(minute hour day-of-month month day-of-week), "
            f"got {len(fields)}"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
        )
    except (ValueError, TypeError) as exc:
        raise InvalidEntry(f"invalid cron expression {expression!r}: {exc}") from exc


@dataclass(frozen=True)
class EntrySpec:
    """One periodic job: what runs, when, how stale a run may get, and why it exists."""

    name: str
    task: str
    reason: str
    #: Seconds a run stays worth doing (see the module docstring).
    expires: float
    every: float | None = None
    cron: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: None: the task's route (schedule.* -> scheduled).
    queue: str | None = None
    #: False: a run still going when the next slot comes makes that slot skip.
    allow_overlap: bool = False

    def __post_init__(self) -> None:
        self._check_identity()
        self._check_timing()
        if not isinstance(self.kwargs, dict):
            raise InvalidEntry(f"entry {self.name!r}: kwargs must be a JSON object")

    def _check_identity(self) -> None:
        if not self.name or any(ch.isspace() for ch in self.name):
            raise InvalidEntry(f"entry name must be non-empty without spaces, got {self.name!r}")
        if not self.task:
            raise InvalidEntry("entry task name must be non-empty")

    def _check_timing(self) -> None:
        if (self.every is None) == (self.cron is None):
            raise InvalidEntry(f"entry {self.name!r}: give exactly one of every or cron")
        if self.every is not None and not self.every >= MIN_EVERY_SECONDS:
            raise InvalidEntry(
                f"entry {self.name!r}: every must be at least {MIN_EVERY_SECONDS:g} second, "
                f"got {self.every:g}"
            )
        if not self.expires > 0:
            raise InvalidEntry(f"entry {self.name!r}: expires must be > 0 seconds")
        if self.cron is not None:
            parse_cron(self.cron)

    def schedule(self) -> timedelta | crontab:
        if self.cron is not None:
            return parse_cron(self.cron)
        assert self.every is not None
        return timedelta(seconds=self.every)

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "expires": self.expires,
            "headers": {
                ENTRY_HEADER: self.name,
                OVERLAP_HEADER: "allow" if self.allow_overlap else "skip",
            },
        }
        if self.queue is not None:
            options["queue"] = self.queue
        return options

    def beat_entry(self) -> dict[str, Any]:
        """The entry in Celery's beat_schedule form."""
        return {
            "task": self.task,
            "schedule": self.schedule(),
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "options": self.options(),
        }

    def describe(self) -> str:
        return f"every {self.every:g}s" if self.every is not None else f"cron {self.cron}"


#: Conveyor's own periodic jobs. Change them here; a beat restart installs the change.
ENTRIES: tuple[EntrySpec, ...] = (
    EntrySpec(
        name="cleanup-expired-data",
        task="schedule.cleanup_expired_data",
        every=3600,
        expires=1800,
        reason="Give result keys that lost their TTL one again and trim our own history keys.",
    ),
    EntrySpec(
        name="daily-report",
        task="schedule.daily_report",
        cron="5 0 * * *",
        expires=6 * 3600,
        reason="Summarise yesterday's tasks by name and state for operators.",
    ),
    EntrySpec(
        name="queue-health",
        task="schedule.queue_health",
        every=60,
        expires=50,
        reason="Record queue depth and dead-letter counts so growth and poison are visible.",
    ),
)
