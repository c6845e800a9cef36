"""Schedule entries for the metrics exporter and `celery -A tasks overview`.

Workers record the last successful run of every entry (tasks/schedule/last_success.py); this
reads those times with the entries' intervals, which is what the "schedule missed" alert
(deploy/prometheus/alerts.yml) compares. Registered in celeryconfig through
``conveyor_metrics_collectors`` and ``conveyor_overview_sections``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

from celery import Celery
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tasks.schedule import last_success, store


def interval_seconds(app: Celery, name: str) -> float:
    """Seconds between two runs of the entry (for a crontab, the next two occurrences)."""
    entry = store.load_entry(app, name)
    schedule = entry.schedule
    run_every = getattr(schedule, "run_every", None)
    if isinstance(run_every, timedelta):
        return run_every.total_seconds()
    now = app.now()
    first = now + schedule.remaining_estimate(now)
    return float(schedule.remaining_estimate(first).total_seconds())


class ScheduleCollector(Collector):
    def __init__(self, app: Celery) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        entries = store.list_entries(self.app)
        last = last_success.read(self.app)
        success = GaugeMetricFamily(
            "conveyor_schedule_last_success_timestamp_seconds",
            "Unix time of each schedule entry's last successful run.",
            labels=["entry"],
        )
        interval = GaugeMetricFamily(
            "conveyor_schedule_interval_seconds",
            "Seconds between two runs of each enabled schedule entry.",
            labels=["entry"],
        )
        enabled = GaugeMetricFamily(
            "conveyor_schedule_enabled", "1 if the entry runs, 0 if paused.", labels=["entry"]
        )
        for view in entries:
            enabled.add_metric([view.name], 1 if view.enabled else 0)
            if not view.enabled:
                continue
            interval.add_metric([view.name], interval_seconds(self.app, view.name))
            if view.name in last:
                success.add_metric([view.name], last[view.name])
        yield success
        yield interval
        yield enabled

    def describe(self) -> Iterable[Metric]:
        return []  # read at scrape time only


def collector(app: Celery) -> ScheduleCollector:
    return ScheduleCollector(app)


def overview_section(app: Celery) -> tuple[str, list[dict[str, Any]]]:
    """Every entry with its state, last success and next run, for `celery -A tasks overview`."""
    last = last_success.read(app)
    rows = [
        {
            "entry": view.name,
            "task": view.task,
            "schedule": view.schedule,
            "enabled": view.enabled,
            "last_success": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last[view.name]))
            if view.name in last
            else None,
            "next_run": view.next_run_at,
        }
        for view in store.list_entries(app)
    ]
    return "schedules", rows
