"""Schedule entries for the metrics exporter and `celery -A tasks overview`.

Workers record the last successful run of every entry (a task that carries beat's entry
header, see entries.py) in one Redis hash; the exporter reads it with the entries' intervals,
which is what the "schedule missed" alert (deploy/prometheus/alerts.yml) compares.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

from celery import Celery, signals
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.redis import client as redis_client
from tasks.schedule import store
from tasks.schedule.entries import ENTRY_HEADER
from tasks.schedule.overlap import header

#: Hash: entry name -> Unix time of its last successful run.
LAST_SUCCESS_KEY = "conveyor:schedule:last_success"


def _on_success(sender: Any = None, **_: Any) -> None:
    entry = header(sender.request, ENTRY_HEADER) if sender is not None else None
    if entry:
        redis_client(sender.app.conf.redbeat_redis_url).hset(
            LAST_SUCCESS_KEY, str(entry), time.time()
        )


signals.task_success.connect(_on_success, weak=False)


def interval_seconds(app: Celery, name: str) -> float:
    """Seconds between two runs of the entry (for a crontab, the next two occurrences)."""
    entry = store._load(app, name)
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
        last = redis_client(self.app.conf.redbeat_redis_url).hgetall(LAST_SUCCESS_KEY)
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
                success.add_metric([view.name], float(last[view.name]))
        yield success
        yield interval
        yield enabled

    def describe(self) -> Iterable[Metric]:
        return []  # read at scrape time only


def collector(app: Celery) -> ScheduleCollector:
    return ScheduleCollector(app)


def overview_section(app: Celery) -> tuple[str, list[dict[str, Any]]]:
    """Every entry with its state, last success and next run, for `celery -A tasks overview`."""
    last = redis_client(app.conf.redbeat_redis_url).hgetall(LAST_SUCCESS_KEY)
    rows = [
        {
            "entry": view.name,
            "task": view.task,
            "schedule": view.schedule,
            "enabled": view.enabled,
            "last_success": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(last[view.name])))
            if view.name in last
            else None,
            "next_run": view.next_run_at,
        }
        for view in store.list_entries(app)
    ]
    return "schedules", rows
