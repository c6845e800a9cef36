"""`celery -A tasks overview [--json]`: what the system is doing, in one screen.

Workers (from a broadcast ping and their stats), every task queue with its depth and consumers,
and the dead-letter queue. Other parts of Conveyor add sections (running batches, schedule
entries) through ``conveyor_overview_sections``: ``"module:function"`` paths, each called with
the app and returning ``(title, rows)`` where rows is a list of flat dicts.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click
from celery import Celery
from celery.bin.base import CeleryCommand
from kombu.utils.imports import symbol_by_name

from monitoring import queue_stats


def collect(app: Celery, *, timeout: float, api_url: str | None) -> dict[str, Any]:
    """Everything the command shows, as plain data."""
    # The broadcast spends its timeout waiting for replies: the broker, the management API
    # and the sections are read meanwhile, on a thread with connections of its own.
    with ThreadPoolExecutor(max_workers=1) as pool:
        rest = pool.submit(_queues_and_sections, app, api_url)
        return {"workers": workers(app, timeout), **rest.result()}


def _queues_and_sections(app: Celery, api_url: str | None) -> dict[str, Any]:
    sections = {}
    for path in app.conf.get("conveyor_overview_sections") or ():
        title, rows = symbol_by_name(path)(app)
        sections[title] = rows
    return {**queues(app, api_url), "sections": sections}


def workers(app: Celery, timeout: float) -> list[dict[str, Any]]:
    """Every worker that answers one `conveyor_summary` broadcast (workers/summary.py).

    One broadcast, not Celery's stats, active and active_queues: each broadcast waits its
    whole timeout, so three took three (6 s of the 7 s the command took).
    """
    replies = app.control.broadcast("conveyor_summary", reply=True, timeout=timeout) or []
    answers = {name: answer for reply in replies for name, answer in reply.items()}
    rows = []
    for name, answer in sorted(answers.items()):
        # A worker of an older release answers {"error": "No such key ..."}: listed, unknown.
        known = answer if "error" not in answer else {}
        rows.append(
            {
                "name": name,
                "concurrency": known.get("concurrency"),
                "active": known.get("active"),
                "processed": known.get("processed"),
                "queues": known.get("queues", []),
            }
        )
    return rows


def queues(app: Celery, api_url: str | None) -> dict[str, Any]:
    """Task queues, delayed messages and the dead-letter queue, from the broker."""
    snap = queue_stats.snapshot(app, api_url)
    dlq = app.conf.conveyor_dead_letter_queue
    dead = snap.queues.get(dlq)
    return {
        "queues": [stats.as_dict() for name, stats in snap.queues.items() if name != dlq],
        "queue_source": snap.source,
        "delayed_messages": snap.delayed,
        "dead_letters": {"queue": dlq, "messages": dead.ready if dead else None},
        "broker_nodes": broker_nodes(app, api_url),
    }


def broker_nodes(app: Celery, api_url: str | None) -> list[dict[str, Any]] | None:
    """Each broker node's file handles and sockets against its limits (management API only)."""
    nodes = queue_stats.broker_nodes(app, api_url)
    if nodes is None:
        return None
    return [
        {**node.as_dict(), "fd_percent": round(100 * node.fd_used / max(node.fd_total, 1))}
        for node in nodes
    ]


def render_broker_nodes(nodes: list[dict[str, Any]] | None) -> list[str]:
    if nodes is None:
        return []
    columns = ["node", "fd_used", "fd_total", "fd_percent", "sockets_used", "sockets_total"]
    return ["", "Broker nodes (file handles and sockets)", *_table(nodes, columns)]


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    if not rows:
        return ["  (none)"]
    cells = [[str("-" if row.get(c) is None else row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return lines


def render(data: dict[str, Any]) -> str:
    lines = ["Workers"]
    workers = [{**w, "queues": ",".join(w["queues"])} for w in data["workers"]]
    lines += _table(workers, ["name", "concurrency", "active", "processed", "queues"])
    lines += ["", f"Queues (from {data['queue_source']})"]
    lines += _table(data["queues"], ["name", "ready", "unacked", "consumers"])
    if data["delayed_messages"] is not None:
        lines.append(f"  delayed (countdown/ETA held by the broker): {data['delayed_messages']}")
    dead = data["dead_letters"]
    lines += ["", f"Dead letters ({dead['queue']}): {dead['messages']}"]
    lines += render_broker_nodes(data.get("broker_nodes"))
    for title, rows in data["sections"].items():
        lines += ["", title]
        lines += _table(rows, list(rows[0]) if rows else [])
    return "\n".join(lines)


@click.command(cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option(
    "--timeout",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds to wait for workers' replies (as `celery inspect`).",
)
@click.option(
    "--rabbitmq-api",
    envvar="CONVEYOR_RABBITMQ_API",
    default=None,
    help="RabbitMQ management API URL (adds unacked and delayed counts, broker file handles).",
)
@click.pass_context
def overview(ctx: click.Context, as_json: bool, timeout: float, rabbitmq_api: str | None) -> None:
    """Workers, queues with depth and consumers, dead letters, batches and schedules."""
    app: Celery = ctx.obj.app
    data = collect(app, timeout=timeout, api_url=rabbitmq_api)
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else render(data))
