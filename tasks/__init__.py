"""Conveyor's Celery application: `celery -A tasks worker` finds `app` here."""

from .celery_app import app

__all__ = ["app"]
