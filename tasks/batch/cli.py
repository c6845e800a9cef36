"""`celery -A tasks batch ...`: submit, status, failures, cancel and retry batches.

Registered in pyproject.toml under ``celery.commands``; like Celery's own commands it reaches
the configured app through ``ctx.obj.app``. Every sub-command takes ``--json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from tasks.batch import api
from tasks.batch.store import BatchNotFound, Status


def _emit(as_json: bool, payload: Any, text: str) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=True) if as_json else text)


def _describe(status: Status) -> str:
    lines = [
        f"batch {status.id}  handler={status.handler}  attempt={status.attempt}",
        f"state: {status.state}",
        f"items: {status.total}{'' if status.published else '+ (still publishing)'}  "
        f"succeeded={status.succeeded} failed={status.failed} "
        f"skipped={status.skipped} pending={status.pending}",
        f"started: {status.started_at or '-'}  finished: {status.finished_at or '-'}  "
        f"items/s: {status.items_per_second or '-'}",
    ]
    if status.error:
        lines.append(f"error: {status.error}")
    if status.result is not None:
        lines.append("result: " + json.dumps(status.result, indent=2, sort_keys=True))
    return "\n".join(lines)


def _options(pairs: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint="--option")
        options[name] = value
    return options


def _wait(app: Any, batch_id: str, show_progress: bool) -> Status:
    """Wait for the end; progress goes to stderr: a live bar on a terminal, else a line a second."""
    if not show_progress:
        return api.wait(batch_id, app=app)
    err = sys.stderr
    if not err.isatty():

        def report(current: Status) -> None:
            done = current.succeeded + current.failed + current.skipped
            click.echo(
                f"batch {batch_id}: {done}/{current.total} {current.state} "
                f"({current.items_per_second or 0} items/s)",
                err=True,
            )

        return api.wait(batch_id, app=app, interval=1.0, on_status=report)
    first = api.status(batch_id, app=app)
    with click.progressbar(
        length=max(first.total, 1), label=f"batch {batch_id}", show_pos=True, file=err
    ) as bar:
        done = 0

        def advance(current: Status) -> None:
            nonlocal done
            now = current.succeeded + current.failed + current.skipped
            bar.length = max(current.total, 1)
            bar.update(now - done)
            done = now

        return api.wait(batch_id, app=app, on_status=advance)


def _batch_id_command(func: Any) -> Any:
    func = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)
    func = click.argument("batch_id")(func)
    return click.pass_context(func)


@click.group(name="batch")
def batch() -> None:
    """Submit and follow batches (docs/batch.md)."""


@batch.command()
@click.argument("handler")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, help="Items per chunk.")
@click.option("--format", "format_name", type=click.Choice(["csv", "jsonl"]), default=None)
@click.option(
    "-o",
    "--option",
    "option_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="Handler option, e.g. -o key_field=region (repeatable).",
)
@click.option("--callback", default=None, help="Task to send with the batch id when done.")
@click.option("--wait", "wait_", is_flag=True, help="Show progress until the batch finishes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def submit(
    ctx: click.Context,
    handler: str,
    file: Path,
    chunk_size: int | None,
    format_name: str | None,
    option_pairs: tuple[str, ...],
    callback: str | None,
    wait_: bool,
    as_json: bool,
) -> None:
    """Submit every row of FILE (CSV or JSONL) to HANDLER.

    Exits 2 when the arguments are wrong (nothing submitted), 1 when publishing failed part-way
    (the batch is left in state publish_failed) or, with --wait, when the batch did not complete.
    """
    app = ctx.obj.app
    try:
        batch_id = api.submit_file(
            handler,
            file,
            format_name=format_name,
            chunk_size=chunk_size,
            options=_options(option_pairs),
            callback=callback,
            app=app,
        )
    except (LookupError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    except api.PublishFailed as exc:
        # The batch exists, in state publish_failed: show it, then the reason on stderr.
        failed = api.status(exc.batch_id, app=app)
        _emit(as_json, failed.as_dict(), _describe(failed))
        raise click.ClickException(str(exc)) from exc
    if not wait_:
        _emit(as_json, {"id": batch_id}, batch_id)
        return
    final = _wait(app, batch_id, show_progress=not as_json)
    _emit(as_json, final.as_dict(), _describe(final))
    if final.state != "completed":
        ctx.exit(1)


@batch.command()
@_batch_id_command
def status(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Show a batch's state, counts, speed and (when done) its result."""
    current = _lookup(lambda: api.status(batch_id, app=ctx.obj.app))
    _emit(as_json, current.as_dict(), _describe(current))


@batch.command()
@_batch_id_command
def failures(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """List the failed items with their index, input line and reason."""
    found = _lookup(lambda: api.failures(batch_id, app=ctx.obj.app))
    text = "\n".join(
        f"item {f['index']}" + (f" (line {f['line']})" if f.get("line") else "") + f": {f['error']}"
        for f in found
    )
    _emit(as_json, found, text or "no failed items")


@batch.command()
@_batch_id_command
def cancel(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Cancel a batch: chunks not yet started are skipped."""
    done = _lookup(lambda: api.cancel(batch_id, app=ctx.obj.app))
    text = "cancelled" if done else "already finished: nothing to cancel"
    _emit(as_json, {"id": batch_id, "cancelled": done}, text)


@batch.command()
@_batch_id_command
def retry(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Re-run the failed items as the batch's next attempt."""
    try:
        count = _lookup(lambda: api.retry(batch_id, app=ctx.obj.app))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _emit(as_json, {"id": batch_id, "retried": count}, f"{count} item(s) queued again")


def _lookup(call: Any) -> Any:
    try:
        return call()
    except BatchNotFound as exc:
        raise click.ClickException(f"no batch {exc.args[0]} (never submitted, or expired)") from exc
