"""The scheduling feature's signal handlers and before-start hook, wired by `connect`.

tasks/celery_app.py calls it once (it is named in tasks.celery_app.EXTENSIONS); importing any
module of the feature connects nothing.
"""

from __future__ import annotations

from celery import Celery

from tasks.schedule import last_success, overlap, scheduler


def connect(app: Celery) -> None:
    """Overlap guard, last-success records, and beat's non-blocking lock."""
    overlap.connect()
    last_success.connect()
    scheduler.connect()
