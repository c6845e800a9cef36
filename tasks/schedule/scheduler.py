"""Beat's scheduler: celery-redbeat, plus Conveyor's standby, missed-run and slot rules.

celery-redbeat keeps the schedule in Redis and lets only the holder of a Redis lock fire.
Conveyor changes three things about it:
- **Standby without blocking.** redbeat's stock beat blocks at start-up until it gets the lock,
  before its remote-control node starts, so a standby beat never answers ``celery inspect
  ping`` and its healthcheck fails. Here every beat starts, answers ping and ticks; a standby
  tick only tries the same lock (non-blocking) and sleeps. A beat that loses the lock (Redis
  away longer than the lock timeout) falls back to standby instead of exiting.
- **Missed runs.** A slot that was missed (beat down, or handing over) runs once on recovery
  if it is at most ``expires`` seconds old; an older one is skipped and the entry waits for
  its next slot. Never a burst: an entry is due at most once per tick.
- **Slot header.** Each run carries the slot it was fired for (``conveyor_scheduled_for``).

The handover bound: a beat killed without releasing the lock is replaced after at most
``redbeat_lock_timeout`` + ``beat_max_loop_interval`` seconds (20 + 5 by default).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import redis
from celery.schedules import crontab
from celery.signals import beat_init
from celery.utils.log import get_logger
from redbeat.schedulers import (
    LUA_EXTEND_TO_SCRIPT,
    RedBeatScheduler,
    RedBeatSchedulerEntry,
    acquire_distributed_beat_lock,
    get_redis,
)
from redis.exceptions import LockError

from core.clock import iso
from tasks.schedule.entries import ENTRIES, SLOT_HEADER

logger = get_logger("celery.beat")

#: The hash field beside redbeat's definition/meta that holds Conveyor's own entry data.
CONVEYOR_FIELD = "conveyor"

# redbeat acquires its lock in a beat_init receiver that blocks until it succeeds; this
# scheduler acquires it from tick() instead (see the module docstring).
beat_init.disconnect(acquire_distributed_beat_lock)


def missed_slot_is_stale(
    schedule: Any, last_run_at: datetime, now: datetime, expires: float | None
) -> bool:
    """True when the entry is overdue and no slot within the last `expires` seconds is due.

    Interval entries count from their first missed due time; crontab entries from their most
    recent missed slot (today's 06:00 run is still worth doing after a night's outage).
    """
    if expires is None:
        return False
    remaining = schedule.remaining_estimate(last_run_at).total_seconds()
    if remaining > 0:
        return False
    if isinstance(schedule, crontab):
        since = now - timedelta(seconds=expires)
        return bool(schedule.remaining_estimate(since).total_seconds() > 0)
    return bool(-remaining > expires)


class ConveyorScheduler(RedBeatScheduler):  # type: ignore[misc]
    """redbeat with a non-blocking standby, the missed-run policy and slot headers."""

    def setup_schedule(self) -> None:
        if self.app.conf.conveyor_beat_builtin_entries:
            self.app.conf.beat_schedule = {spec.name: spec.beat_entry() for spec in ENTRIES}
        else:
            self.app.conf.beat_schedule = {}
        super().setup_schedule()
        client = get_redis(self.app)
        for spec in ENTRIES if self.app.conf.conveyor_beat_builtin_entries else ():
            key = RedBeatSchedulerEntry.generate_key(self.app, spec.name)
            client.hset(key, CONVEYOR_FIELD, json.dumps(entry_metadata(spec, source="code")))

    def update_from_dict(self, dict_: dict[str, Any]) -> None:
        """Install code entries, keeping their last run and paused state across restarts."""
        for name, definition in dict_.items():
            entry = self._maybe_entry(name, definition)
            try:
                stored = self.Entry.from_key(self.Entry.generate_key(self.app, name), app=self.app)
            except KeyError:
                pass
            else:
                entry.last_run_at = stored.last_run_at
                entry.enabled = stored.enabled
            entry.save()

    # --- the lock --------------------------------------------------------------------------
    def _try_acquire(self) -> bool:
        client = get_redis(self.app)
        lock = client.lock(self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval)
        # redbeat's script extends the lock TO the timeout rather than BY it.
        lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)
        if not lock.acquire(blocking=False):
            return False
        self.lock = lock
        logger.info("beat: acquired lock %s; this beat is now the active one", self.lock_key)
        return True

    def tick(self, min: Any = min, **kwargs: Any) -> float:
        try:
            if self.lock is None and not self._try_acquire():
                logger.debug("beat: standby; lock %s held by another beat", self.lock_key)
                return float(self.max_interval)
            return float(super().tick(min=min, **kwargs))
        except (LockError, redis.exceptions.RedisError) as exc:
            logger.warning("beat: lost the lock or Redis (%r); standing by", exc)
            self.lock = None
            return float(self.max_interval)

    # --- missed runs and slots ----------------------------------------------------------------
    def maybe_due(self, entry: Any, **kwargs: Any) -> Any:
        if entry.enabled and entry.last_run_at is not None:
            now = self.app.now()
            expires = entry.options.get("expires")
            if missed_slot_is_stale(entry.schedule, entry.last_run_at, now, expires):
                logger.warning(
                    "Scheduler: skipping missed run of %s (due more than %ss ago)",
                    entry.name,
                    expires,
                )
                entry.reschedule(last_run_at=now)
                return entry.schedule.remaining_estimate(now).total_seconds()
        return super().maybe_due(entry, **kwargs)

    def apply_async(
        self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        # The slot's time, not the send time: two beats firing one slot would send the same
        # value, which is what the tests' ledger checks. An overdue run gets its missed slot.
        now = self.app.now()
        slot = now + entry.schedule.remaining_estimate(entry.last_run_at)
        options = dict(entry.options)
        options["headers"] = {**options.get("headers", {}), SLOT_HEADER: iso(slot)}
        entry.options = options
        return super().apply_async(entry, producer=producer, advance=advance, **kwargs)


def entry_metadata(spec: Any, *, source: str) -> dict[str, Any]:
    """What Conveyor keeps beside redbeat's definition: reason, policy, origin."""
    return {
        "reason": spec.reason,
        "expires": spec.expires,
        "allow_overlap": spec.allow_overlap,
        "every": spec.every,
        "cron": spec.cron,
        "source": source,
    }
