"""Worker-side runtime: signal handlers and bootsteps. Never imports `tasks`."""

from __future__ import annotations

from celery import Celery


def install(app: Celery) -> None:
    """Attach Conveyor's worker hooks to `app`; called once by tasks.celery_app."""
    # Imported here so that `python -m workers.health` does not import itself twice.
    from core import redaction
    from workers import (
        bad_input,
        cancellation,
        dead_letter,
        health,
        logs,
        shutdown,
        summary,  # noqa: F401  registers the conveyor_summary inspect command
        tracing,
    )

    logs.connect()
    shutdown.connect()
    tracing.connect()
    cancellation.connect()
    redaction.install()
    app.steps["consumer"].add(dead_letter.DeclareDeadLetterQueue)
    app.steps["consumer"].add(health.ReadinessProbe)
    app.steps["worker"].add(health.LivenessProbe)
    bad_input.connect()
    app.steps["consumer"].add(bad_input.DeadLetterBadInput)
