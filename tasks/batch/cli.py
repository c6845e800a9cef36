"""`celery -A tasks batch ...`: submit, status, failures, cancel and retry batches.

Registered in pyproject.toml under ``celery.commands``; like Celery's own commands it reaches
the configured app through ``ctx.obj.app``. Every sub-command takes ``--json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
from celery import Celery

from tasks.batch import api
from tasks.batch.store import BatchNotFound, Status

#: Failed items `batch failures` prints when not told otherwise.
FAILURES_PAGE = 50


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


def _wait(app: Celery, batch_id: str, show_progress: bool) -> Status:
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
    """Submit every row of FILE (CSV or JSONL) to HANDLER; the batch id is shown as soon as
    the batch exists, before its chunks are published.

    Exits 2 when the arguments are wrong (nothing submitted), 1 when publishing failed part-way
    (the batch is left in state publish_failed) or, with --wait, when the batch did not complete.
    """
    app = ctx.obj.app
    announce = _announcer(as_json, wait_)
    try:
        batch_id = api.submit_file(
            handler,
            file,
            format_name=format_name,
            chunk_size=chunk_size,
            options=_options(option_pairs),
            callback=callback,
            app=app,
            on_created=announce,
        )
    except (LookupError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    except api.PublishFailed as exc:
        _publish_failed(app, exc, as_json)
    if not wait_:
        if as_json:
            _emit(as_json, {"id": batch_id}, batch_id)
        return
    final = _wait(app, batch_id, show_progress=not as_json)
    _emit(as_json, final.as_dict(), _describe(final))
    if final.state != "completed":
        ctx.exit(1)


def _publish_failed(app: Celery, exc: api.PublishFailed, as_json: bool) -> NoReturn:
    """The batch exists, in state publish_failed: show it, then the reason on stderr."""
    failed = api.status(exc.batch_id, app=app)
    _emit(as_json, failed.as_dict(), _describe(failed))
    raise click.ClickException(str(exc)) from exc


def _announcer(as_json: bool, wait_: bool) -> api.OnCreated:
    """Shows the batch id as soon as the batch exists, before its chunks are published (a
    large file takes a while): the plain id on stdout when that is all `submit` prints, else
    a line on stderr, so that stdout stays one document."""

    def announce(batch_id: str) -> None:
        if as_json or wait_:
            click.echo(f"batch {batch_id}: publishing...", err=True)
        else:
            click.echo(batch_id)
        sys.stdout.flush()

    return announce


@batch.command()
@_batch_id_command
def status(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Show a batch's state, counts, speed and (when done) its result."""
    current = _lookup(lambda: api.status(batch_id, app=ctx.obj.app))
    _emit(as_json, current.as_dict(), _describe(current))


def _failure_line(failure: dict[str, Any]) -> str:
    line = f" (line {failure['line']})" if failure.get("line") else ""
    invalid = " [input error]" if failure.get("input_error") else ""
    return f"item {failure['index']}{line}: {failure['error']}{invalid}"


@batch.command()
@_batch_id_command
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=FAILURES_PAGE,
    show_default=True,
    help="Failed items to show (0: all).",
)
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Failed items to skip.")
def failures(ctx: click.Context, batch_id: str, as_json: bool, limit: int, offset: int) -> None:
    """List the failed items, by item index, with their input line and reason, a page at a
    time (--limit, --offset), and how many there are in all (with --json: on stderr)."""
    app = ctx.obj.app
    total = _lookup(lambda: api.failure_count(batch_id, app=app))
    found = api.failures(batch_id, app=app, limit=limit or None, offset=offset)
    lines = [*map(_failure_line, found), _page_summary(total, offset, len(found))]
    _emit(as_json, found, "\n".join(lines))
    if as_json:  # stdout stays the list (one JSON document)
        click.echo(lines[-1], err=True)


def _page_summary(total: int, offset: int, shown: int) -> str:
    if not total:
        return "no failed items"
    more = f"; --offset {offset + shown} for more" if offset + shown < total else ""
    window = f"{offset + 1}-{offset + shown}" if shown else "none"
    return f"failed items {window} of {total}{more}"


@batch.command()
@_batch_id_command
def cancel(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Cancel a batch: chunks not yet started are skipped."""
    done = _lookup(lambda: api.cancel(batch_id, app=ctx.obj.app))
    text = "cancelled" if done else "already finished: nothing to cancel"
    _emit(as_json, {"id": batch_id, "cancelled": done}, text)


@batch.command()
@_batch_id_command
@click.option(
    "--include-input-errors",
    is_flag=True,
    help="Also re-run items the handler refused as invalid (never rows that could not be read).",
)
def retry(ctx: click.Context, batch_id: str, as_json: bool, include_input_errors: bool) -> None:
    """Re-run the failed items that can succeed as the batch's next attempt. Input errors
    (unreadable rows, items the handler found invalid) stay failed unless
    --include-input-errors."""
    try:
        count = _lookup(
            lambda: api.retry(batch_id, app=ctx.obj.app, include_input_errors=include_input_errors)
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _emit(as_json, {"id": batch_id, "retried": count}, f"{count} item(s) queued again")


def _lookup(call: Any) -> Any:
    try:
        return call()
    except BatchNotFound as exc:
        raise click.ClickException(f"no batch {exc.args[0]} (never submitted, or expired)") from exc
