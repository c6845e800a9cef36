"""``celery -A tasks schedule list|add|remove|pause|resume|run-now|cancel``.

Registered in pyproject.toml under ``[project.entry-points."celery.commands"]``. Every command
takes ``--json`` for machine-readable output. Errors are one line on stderr: exit status 2 for
what cannot work (a bad entry, arguments the task does not take), 1 for what is not there (an
unknown entry name or task id).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click
from celery.states import READY_STATES

from tasks.schedule import store
from tasks.schedule.entries import EntrySpec, InvalidEntry

F = TypeVar("F", bound=Callable[..., Any])

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _app(ctx: click.Context) -> Any:
    return ctx.obj.app


class Refused(click.ClickException):
    """What cannot work, refused before anything is stored: one line, exit status 2."""

    exit_code = 2


class NotFound(click.ClickException):
    """No such entry or delayed job: one line, exit status 1."""

    exit_code = 1


def _fail(message: str) -> None:
    raise Refused(message)


def _json_arg(raw: str | None, what: str, kind: type) -> Any:
    if raw is None:
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Refused(f"{what}: not valid JSON: {exc}") from exc
    if not isinstance(value, kind):
        raise Refused(f"{what}: must be a JSON {kind.__name__}")
    return value


def _show(view: store.EntryView, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(view.as_dict()))
        return
    state = "enabled" if view.enabled else "PAUSED"
    click.echo(
        f"{view.name}  {view.task}  {view.schedule}  {state}  next={view.next_run_at or '-'}  "
        f"expires={view.expires:g}s  overlap={'allow' if view.allow_overlap else 'skip'}  "
        f"[{view.source}] {view.reason}"
    )


@click.group(name="schedule")
def schedule() -> None:
    """Periodic entries in Redis: a running beat picks up changes on its next tick."""


@schedule.command(name="list")
@json_option
@click.pass_context
def list_command(ctx: click.Context, as_json: bool) -> None:
    """List every entry with its next run."""
    views = store.list_entries(_app(ctx))
    if as_json:
        click.echo(json.dumps([view.as_dict() for view in views]))
        return
    for view in views:
        _show(view, False)


@schedule.command()
@click.argument("name")
@click.argument("task")
@click.option("--every", type=float, help="Run every SECONDS.")
@click.option("--cron", help='Crontab "minute hour day-of-month month day-of-week".')
@click.option("--args", "args_json", help="Positional arguments, a JSON list.")
@click.option("--kwargs", "kwargs_json", help="Keyword arguments, a JSON object.")
@click.option("--queue", help="Queue to send to (default: the task's route).")
@click.option("--expires", type=float, help="Seconds a run stays worth doing (default: period).")
@click.option("--allow-overlap", is_flag=True, help="Let runs of this entry overlap.")
@click.option("--reason", default="", help="One line: why this entry exists.")
@click.option("--replace", is_flag=True, help="Replace an entry of the same name.")
@json_option
@click.pass_context
def add(
    ctx: click.Context,
    name: str,
    task: str,
    every: float | None,
    cron: str | None,
    args_json: str | None,
    kwargs_json: str | None,
    queue: str | None,
    expires: float | None,
    allow_overlap: bool,
    reason: str,
    replace: bool,
    as_json: bool,
) -> None:
    """Add entry NAME that runs TASK (--every SECONDS or --cron EXPR)."""
    if (every is None) == (cron is None):
        _fail("give exactly one of --every SECONDS or --cron EXPR")
    if expires is None:
        # One period by default: a run later than its next slot is not worth doing.
        expires = every if every is not None else 3600.0
    try:
        spec = EntrySpec(
            name=name,
            task=task,
            reason=reason,
            expires=expires,
            every=every,
            cron=cron,
            args=tuple(_json_arg(args_json, "--args", list)),
            kwargs=_json_arg(kwargs_json, "--kwargs", dict),
            queue=queue,
            allow_overlap=allow_overlap,
        )
        view = store.add(_app(ctx), spec, replace=replace)
    except InvalidEntry as exc:
        _fail(str(exc))
    _show(view, as_json)


def _by_name(action: Callable[[Any, str], Any]) -> Callable[[click.Context, str, bool], None]:
    def command(ctx: click.Context, name: str, as_json: bool) -> None:
        try:
            result = action(_app(ctx), name)
        except store.EntryNotFound as exc:
            raise NotFound(str(exc)) from None
        except InvalidEntry as exc:
            _fail(str(exc))
        if isinstance(result, store.EntryView):
            _show(result, as_json)
        elif as_json:
            click.echo(json.dumps({"name": name, "task_id": result} if result else {"name": name}))
        else:
            click.echo(f"{name}: {result}" if result else f"{name}: removed")

    return command


for _name, _action, _help in (
    ("remove", store.remove, "Delete runtime entry NAME."),
    ("pause", store.pause, "Stop firing NAME until resumed (kept across restarts)."),
    ("resume", store.resume, "Fire NAME again, one period from now."),
    ("run-now", store.run_now, "Publish one run of NAME now; prints the task id."),
):
    schedule.command(name=_name, help=_help)(
        click.argument("name")(json_option(click.pass_context(_by_name(_action))))
    )


@schedule.command()
@click.argument("task_id")
@click.option("--force", is_flag=True, help="Record the cancellation even for an unknown id.")
@json_option
@click.pass_context
def cancel(ctx: click.Context, task_id: str, force: bool, as_json: bool) -> None:
    """Cancel delayed job TASK_ID before it runs (survives worker restarts)."""
    from workers.cancellation import cancel as cancel_job
    from workers.cancellation import is_delayed

    app = _app(ctx)
    if not force and not is_delayed(app, task_id):
        state = app.AsyncResult(task_id).state
        if state in READY_STATES:
            raise NotFound(f"task {task_id} has already finished ({state}); nothing to cancel")
        raise NotFound(
            f"no delayed job with id {task_id!r} was found (not found: a wrong id, or due more "
            "than an hour ago); --force records the cancellation anyway"
        )
    cancel_job(app, task_id)
    click.echo(json.dumps({"task_id": task_id, "cancelled": True}) if as_json else task_id)
