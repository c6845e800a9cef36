"""What the templates need to show values: times, ages, badges, progress, Flower links."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from console import deadletters
from console.sources import eta_seconds
from core.clock import iso
from core.redaction import redact
from tasks.batch.store import Status

#: Badge colour of each state, in Flower's palette (green success, red failure, ...).
BADGES = {
    "completed": "success",
    "succeeded": "success",
    "enabled": "success",
    "running": "info",
    "pending": "muted",
    "publishing": "muted",
    "completed_with_failures": "warning",
    "paused": "warning",
    "cancelled": "muted",
    "publish_failed": "danger",
    "failed": "danger",
}


def badge(state: str | None) -> str:
    return BADGES.get(str(state), "danger" if state else "muted")


def duration(seconds: float | None) -> str:
    """3s, 4m 05s, 2h 10m, 3d 4h; '-' for None."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    for size, unit, small, next_unit in ((86_400, "d", 3600, "h"), (3600, "h", 60, "m")):
        if whole >= size:
            return f"{whole // size}{unit} {whole % size // small}{next_unit}"
    if whole >= 60:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{seconds:.1f}s" if seconds < 10 else f"{whole}s"


def when(iso: str | None) -> str:
    """An ISO-8601 time shortened to 'YYYY-MM-DD HH:MM:SS' (UTC as given)."""
    if not iso:
        return "-"
    return iso.replace("T", " ")[:19]


def done_items(status: Status) -> int:
    return status.succeeded + status.failed + status.skipped


def percent(status: Status) -> int:
    return min(100, int(100 * done_items(status) / status.total)) if status.total else 0


def batch_json(status: Status) -> dict[str, Any]:
    """`batch status --json`'s shape, with the estimate of the time left."""
    return {**redact(status.as_dict()), "eta_seconds": eta_seconds(status)}


def shown(value: Any, limit: int = 300) -> str:
    """A value as compact JSON (strings as they are), redacted and cut to `limit` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    text = str(redact(text))
    return text if len(text) <= limit else text[:limit] + "…"


def pretty(value: Any) -> str:
    """A result as indented JSON, redacted."""
    return str(redact(json.dumps(value, default=str, indent=2, sort_keys=True)))


def helpers(flower_url: str | None) -> dict[str, Any]:
    def flower_task(task_id: str) -> str | None:
        return f"{flower_url}/task/{quote(task_id, safe='')}" if flower_url else None

    return {
        "badge": badge,
        "duration": duration,
        "when": when,
        "percent": percent,
        "done_items": done_items,
        "eta_seconds": eta_seconds,
        "shown": shown,
        "pretty": pretty,
        "iso": iso,
        "redact": redact,
        "headers": deadletters.headers,
        "preview": deadletters.preview,
        "flower_url": flower_url,
        "flower_task": flower_task,
    }
