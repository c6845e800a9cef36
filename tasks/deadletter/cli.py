"""``celery -A tasks dlq``: list, show, replay and purge dead-lettered tasks."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from tasks.deadletter import store

#: Reasons an entry can have (Conveyor's own, then RabbitMQ's), for --reason.
REASONS = (
    "content_disallowed",
    "undecodable",
    "malformed",
    "unknown_task",
    "retries_exhausted",
    "delivery_limit",
    "expired",
    "rejected",
)


def _queue(ctx: click.Context) -> str:
    return str(ctx.obj.app.conf.conveyor_dead_letter_queue)


def _connection(ctx: click.Context) -> Any:
    return ctx.obj.app.connection_for_write()


def _line(e: store.Entry) -> str:
    """One entry as a readable line: what, from where, why, by whom and when."""
    why = f"  exception={e.exception}" if e.exception else ""
    schedule = f"  schedule={e.schedule}" if e.schedule else ""
    never = "" if e.replayable else "  (never replayable)"
    line = (
        f"{e.id}  task={e.task or '-'}  queue={e.queue or '-'}  reason={e.reason or '-'}"
        f"{why}{schedule}  worker={e.worker or '-'}  deaths={e.deaths}  at={e.died_at or '-'}"
        f"{never}"
    )
    return f"{line}\n    {e.message}" if e.message else line


def _echo_entries(entries: list[store.Entry], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([e.summary() for e in entries], indent=2))
        return
    if not entries:
        click.echo("dead-letter queue is empty")
        return
    for e in entries:
        click.echo(_line(e))
    click.echo(f"{len(entries)} message(s)")


reason_option = click.option(
    "--reason", type=click.Choice(REASONS), help="Only messages dead-lettered for this reason."
)


@click.group(name="dlq")
def dlq() -> None:
    """Inspect and act on the dead-letter queue (conveyor.dead_letter)."""


@dlq.command(name="list")
@click.option("--queue", "origin", help="Only messages dead-lettered from this queue.")
@click.option("--task", help="Only messages of this task name.")
@reason_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def list_command(
    ctx: click.Context, origin: str | None, task: str | None, reason: str | None, as_json: bool
) -> None:
    """List dead-lettered messages: why (reason, exception, message), where, by whom, when."""
    with _connection(ctx) as connection:
        entries = store.list_entries(
            connection, _queue(ctx), origin=origin, task=task, reason=reason
        )
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


def _replay_selection(
    entry_id: str | None, task: str | None, replay_all: bool
) -> Callable[[store.Entry], bool]:
    if sum(bool(x) for x in (entry_id, task, replay_all)) != 1:
        raise click.UsageError("give exactly one of --id, --task or --all")
    if entry_id:
        return lambda entry: entry.id == entry_id
    return store.matching(task=task)


def _report_replay(
    replayed: list[store.Entry], skipped: list[store.Entry], dry_run: bool, as_json: bool
) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "dry_run": dry_run,
                    "replayed": [e.summary() for e in replayed],
                    "skipped": [e.summary() for e in skipped],
                }
            )
        )
        return
    verb = "would replay" if dry_run else "replayed"
    for e in skipped:
        click.echo(f"skipped {e.id} task={e.task or '-'}: {e.reason} can never succeed")
    for e in replayed:
        click.echo(f"{verb} {e.id} task={e.task or '-'} -> {e.queue}")
    click.echo(f"{verb} {len(replayed)} message(s)")
    if skipped:
        click.echo(f"skipped {len(skipped)} message(s) that can never succeed (--force to replay)")


@dlq.command(name="replay")
@click.option("--id", "entry_id", help="Replay the message with this task id.")
@click.option("--task", help="Replay every message of this task name.")
@click.option("--all", "replay_all", is_flag=True, help="Replay every message.")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; change nothing.")
@click.option(
    "--force",
    is_flag=True,
    help="Also replay messages that can never succeed (refused content, undecodable, "
    "malformed, unknown task).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def replay(
    ctx: click.Context,
    entry_id: str | None,
    task: str | None,
    replay_all: bool,
    dry_run: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Republish to the original queue with the original id and arguments.

    A message leaves the dead-letter queue only after the broker confirmed its copy. Messages
    that can never succeed as they are stay, and are listed, unless --force.
    """
    select = _replay_selection(entry_id, task, replay_all)
    replayed, skipped = _replay(ctx, select, dry_run=dry_run, force=force)
    _report_replay(replayed, skipped, dry_run, as_json)
    if entry_id and not (replayed or skipped):
        raise click.ClickException(f"no dead-lettered message with id {entry_id}")


def _replay(
    ctx: click.Context, select: Callable[[store.Entry], bool], *, dry_run: bool, force: bool
) -> tuple[list[store.Entry], list[store.Entry]]:
    """What was replayed, and what was skipped because it can never succeed."""
    conf = ctx.obj.app.conf
    skipped: list[store.Entry] = []
    with _connection(ctx) as connection:
        replayed = store.replay(
            connection,
            _queue(ctx),
            exchange=conf.conveyor_task_exchange,
            select=select,
            dry_run=dry_run,
            confirm_timeout=float(conf.conveyor_publish_timeout),
            force=force,
            on_skip=skipped.append,
        )
    return replayed, skipped


def _purge_selection(
    reason: str | None, schedule: str | None, task: str | None, origin: str | None
) -> Callable[[store.Entry], bool] | None:
    """None (everything) when nothing is selected."""
    if not any((reason, schedule, task, origin)):
        return None
    fields = store.matching(origin=origin, task=task, reason=reason)
    return lambda entry: fields(entry) and (schedule is None or entry.schedule == schedule)


@dlq.command(name="purge")
@reason_option
@click.option("--schedule", help="Only runs of this schedule entry.")
@click.option("--task", help="Only messages of this task name.")
@click.option("--queue", "origin", help="Only messages dead-lettered from this queue.")
@click.option("--yes", "-f", "force", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge(
    ctx: click.Context,
    reason: str | None,
    schedule: str | None,
    task: str | None,
    origin: str | None,
    force: bool,
) -> None:
    """Delete dead-lettered messages (asks first): every one, or only those selected.

    For example, scheduled runs that expired while no worker was up:
    ``dlq purge --reason expired --schedule NAME``.
    """
    queue = _queue(ctx)
    select = _purge_selection(reason, schedule, task, origin)
    what = "every message" if select is None else "the selected messages"
    if not force:
        click.confirm(f"Delete {what} in {queue}? This cannot be undone", abort=True)
    with _connection(ctx) as connection:
        removed = store.purge(connection, queue, select=select)
    click.echo(f"purged {removed} message(s) from {queue}")
