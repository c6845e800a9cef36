"""The daily report: yesterday's tasks counted by name and final state, with queue health.

It reads the result backend (``result_extended`` stores each result's task name and finish
time), so it covers what results still exist: ``result_expires`` is 1 day, which is why the
report runs just after midnight. The report is kept 30 days as
``conveyor:report:daily:<date>``.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import date, datetime, timedelta
from typing import Any

from celery import Celery

from tasks.schedule.queue_health import latest, schedule_redis

#: Result keys read per report at most: the report stays cheap on a huge backend.
MAX_RESULTS = 200_000
KEEP_SECONDS = 30 * 86_400


def report_key(day: date) -> str:
    return f"conveyor:report:daily:{day.isoformat()}"


def summarise(results: list[dict[str, Any]], day: date, tz: Any) -> dict[str, Any]:
    """Count results finished on `day` (in timezone tz) by task name and state."""
    counts: Counter[tuple[str, str]] = Counter()
    for result in results:
        done = result.get("date_done")
        if not done:
            continue
        finished = datetime.fromisoformat(done)
        if finished.tzinfo is None:
            finished = finished.replace(tzinfo=tz)
        if finished.astimezone(tz).date() != day:
            continue
        counts[(str(result.get("name") or "unknown"), str(result.get("status")))] += 1
    by_task: dict[str, dict[str, int]] = {}
    for (name, state), count in sorted(counts.items()):
        by_task.setdefault(name, {})[state] = count
    return {"day": day.isoformat(), "total": sum(counts.values()), "by_task": by_task}


def read_results(app: Celery, limit: int = MAX_RESULTS) -> list[dict[str, Any]]:
    backend: Any = app.backend
    client = backend.client
    results = []
    for key in client.scan_iter(match="celery-task-meta-*", count=1000):
        raw = client.get(key)
        if raw:
            try:
                results.append(json.loads(raw))
            except ValueError:
                continue
        if len(results) >= limit:
            break
    return results


def daily_report(app: Celery, day: date | None = None) -> dict[str, Any]:
    """Build and store the report for `day` (yesterday in the app's timezone by default)."""
    tz = app.timezone
    day = day or (app.now().astimezone(tz).date() - timedelta(days=1))
    report = summarise(read_results(app), day, tz)
    report["queue_health"] = latest(app)
    schedule_redis(app).set(report_key(day), json.dumps(report), ex=KEEP_SECONDS)
    return report
