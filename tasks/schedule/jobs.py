"""The periodic jobs Conveyor ships. Entries in tasks/schedule/entries.py fire them."""

from __future__ import annotations

from typing import Any

from celery.utils.log import get_task_logger

from tasks.celery_app import app
from tasks.schedule import cleanup, queue_health, reports

logger = get_task_logger(__name__)


@app.task(name="schedule.cleanup_expired_data")
def cleanup_expired_data() -> dict[str, int]:
    """Run every registered cleaner once; returns keys handled per cleaner."""
    done = cleanup.run_cleaners(app)
    logger.info("cleanup done %s", done)
    return done


@app.task(name="schedule.daily_report")
def daily_report(day: str | None = None) -> dict[str, Any]:
    """Store and log the daily summary of tasks for `day` (ISO date; default yesterday)."""
    from datetime import date

    report = reports.daily_report(app, date.fromisoformat(day) if day else None)
    logger.info("daily report day=%s total=%s", report["day"], report["total"])
    return report


@app.task(name="schedule.queue_health")
def check_queue_health() -> dict[str, Any]:
    """Record each queue's depth and the dead-letter count."""
    return queue_health.record(app, queue_health.measure(app))
