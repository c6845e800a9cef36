"""``celery -A tasks dlq``: list, show, replay and purge dead-lettered tasks."""

from __future__ import annotations

import json
from typing import Any

import click

from tasks.deadletter import store


def _queue(ctx: click.Context) -> str:
    return str(ctx.obj.app.conf.conveyor_dead_letter_queue)


def _connection(ctx: click.Context) -> Any:
    return ctx.obj.app.connection_for_write()


def _echo_entries(entries: list[store.Entry], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([e.summary() for e in entries], indent=2))
        return
    if not entries:
        click.echo("dead-letter queue is empty")
        return
    for e in entries:
        click.echo(
            f"{e.id}  task={e.task or '-'}  queue={e.queue or '-'}  reason={e.reason or '-'}"
            f"  deaths={e.deaths}  at={e.died_at or '-'}"
        )
    click.echo(f"{len(entries)} message(s)")


@click.group(name="dlq")
def dlq() -> None:
    """Inspect and act on the dead-letter queue (conveyor.dead_letter)."""


@dlq.command(name="list")
@click.option("--queue", "origin", help="Only messages dead-lettered from this queue.")
@click.option("--task", help="Only messages of this task name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def list_command(ctx: click.Context, origin: str | None, task: str | None, as_json: bool) -> None:
    """List dead-lettered messages with the reason and the queue they came from."""
    with _connection(ctx) as connection:
        entries = store.list_entries(connection, _queue(ctx), origin=origin, task=task)
    _echo_entries(entries, as_json)


@dlq.command(name="show")
@click.argument("entry_id")
@click.pass_context
def show(ctx: click.Context, entry_id: str) -> None:
    """Show one message: headers, properties, the reason and the decoded arguments (JSON)."""
    with _connection(ctx) as connection:
        entry = store.find(connection, _queue(ctx), entry_id)
    if entry is None:
        raise click.ClickException(f"no dead-lettered message with id {entry_id}")
    click.echo(json.dumps(entry.details(), indent=2, default=str))


@dlq.command(name="replay")
@click.option("--id", "entry_id", help="Replay the message with this task id.")
@click.option("--task", help="Replay every message of this task name.")
@click.option("--all", "replay_all", is_flag=True, help="Replay every message.")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def replay(
    ctx: click.Context,
    entry_id: str | None,
    task: str | None,
    replay_all: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Republish to the original queue with the original id and arguments.

    A message leaves the dead-letter queue only after the broker confirmed its copy.
    """
    if sum(bool(x) for x in (entry_id, task, replay_all)) != 1:
        raise click.UsageError("give exactly one of --id, --task or --all")

    def select(entry: store.Entry) -> bool:
        if entry_id:
            return entry.id == entry_id
        if task:
            return entry.task == task
        return True

    app = ctx.obj.app
    with _connection(ctx) as connection:
        entries = store.replay(
            connection,
            _queue(ctx),
            exchange=app.conf.conveyor_task_exchange,
            select=select,
            dry_run=dry_run,
            confirm_timeout=float(app.conf.conveyor_publish_timeout),
        )
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "replayed": [e.summary() for e in entries]}))
        return
    verb = "would replay" if dry_run else "replayed"
    for e in entries:
        click.echo(f"{verb} {e.id} task={e.task or '-'} -> {e.queue}")
    click.echo(f"{verb} {len(entries)} message(s)")
    if entry_id and not entries:
        raise click.ClickException(f"no dead-lettered message with id {entry_id}")


@dlq.command(name="purge")
@click.option("--yes", "-f", "force", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge(ctx: click.Context, force: bool) -> None:
    """Delete every dead-lettered message (asks first)."""
    queue = _queue(ctx)
    if not force:
        click.confirm(f"Delete every message in {queue}? This cannot be undone", abort=True)
    with _connection(ctx) as connection:
        removed = store.purge(connection, queue)
    click.echo(f"purged {removed} message(s) from {queue}")
