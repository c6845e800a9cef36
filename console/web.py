"""The console's HTTP side: Tornado handlers, one per page, each also serving its JSON under /api.

Tornado comes with Flower, so the console adds no dependency. Its templates escape every
`{{ value }}` by default, and its `xsrf_cookies` setting refuses any POST without the token
(403) before a handler runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import tornado.web
from tornado.ioloop import IOLoop

from console import deadletters, views
from console.auth import OPERATOR, Account, Authenticator
from console.sources import UNAVAILABLE, Sources
from core.clock import iso
from core.redaction import redact
from tasks.schedule.entries import InvalidEntry
from tasks.schedule.store import EntryNotFound

logger = logging.getLogger("console.actions")

HERE = Path(__file__).parent
PAGE_SIZE = 50
T = TypeVar("T")

#: No inline script or style, nothing from elsewhere, no framing (clickjacking).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class Context:
    sources: Sources
    auth: Authenticator
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4))


class Base(tornado.web.RequestHandler):
    """Authentication, security headers, and a blocking call run off the event loop."""

    ctx: Context
    account: Account

    def initialize(self, ctx: Context, api: bool = False) -> None:
        self.ctx, self.api = ctx, api

    def set_default_headers(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.set_header(name, value)

    def prepare(self) -> None:
        account = self.ctx.auth.identify(self.request.headers.get("Authorization"))
        if account is None:
            raise tornado.web.HTTPError(401)
        self.account = account
        # Every page sets the CSRF cookie, so any form posted from it carries a valid token.
        self.xsrf_token  # noqa: B018

    @property
    def operator(self) -> bool:
        return self.account.role == OPERATOR

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking store call in the console's threads; 503 when a service is away."""
        try:
            return await IOLoop.current().run_in_executor(
                self.ctx.executor, lambda: function(*args, **kwargs)
            )
        except UNAVAILABLE as exc:
            logger.warning("console: %s", redact(str(exc)))
            raise tornado.web.HTTPError(503, reason="Broker or Redis unavailable") from exc

    def get_template_namespace(self) -> dict[str, Any]:
        namespace = super().get_template_namespace()
        namespace.update(views.helpers(self.ctx.sources.flower_url))
        namespace.update(user=self.account.user, operator=self.operator, query=self.query)
        return namespace

    def query(self, **changes: Any) -> str:
        """This page's query string with some arguments changed (None drops one)."""
        args = {k: self.get_argument(k) for k in self.request.arguments}
        args.update({k: v for k, v in changes.items()})
        return urlencode({k: v for k, v in args.items() if v not in (None, "")})

    def page_args(self) -> tuple[int, int]:
        """(offset, limit) of the page asked for by ?page=N (from 1)."""
        try:
            page = max(int(self.get_argument("page", "1") or 1), 1)
        except ValueError:
            raise tornado.web.HTTPError(400, reason="page must be a whole number") from None
        return (page - 1) * PAGE_SIZE, PAGE_SIZE

    def show(self, template: str, payload: Any, **page: Any) -> None:
        """The JSON payload under /api, else the page."""
        if self.api:
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps(payload, default=str))
        else:
            self.render(template, **page)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = self._reason
        if status_code == 401:
            # Set here: sending an error clears the headers set before it.
            self.set_header("WWW-Authenticate", 'Basic realm="Conveyor console"')
        if self.api or not hasattr(self, "account"):
            self.finish({"error": reason, "status": status_code})
            return
        self.render("error.html", status=status_code, reason=reason)


class Overview(Base):
    async def get(self) -> None:
        sources = self.ctx.sources
        queues = await self.call(sources.queues)
        running = await self.call(sources.batches, offset=0, limit=5, state=None)
        entries = await self.call(sources.schedules)
        letters = sources.snapshot.current
        reasons = letters.counts("reason")
        payload = {
            "queues": queues,
            "batches": running.as_dict("batches", lambda s: s.as_dict()),
            "schedules": {
                "entries": len(entries),
                "paused": sum(not e["enabled"] for e in entries),
            },
            "dead_letters": {"total": len(letters.letters), "by_reason": reasons},
        }
        self.show(
            "overview.html",
            payload,
            queues=queues,
            batches=running,
            schedules=entries,
            letters=letters,
            reasons=reasons,
        )


class Queues(Base):
    async def get(self) -> None:
        data = await self.call(self.ctx.sources.queues)
        self.show("queues.html", data, data=data)


class Batches(Base):
    async def get(self) -> None:
        offset, limit = self.page_args()
        state = self.get_argument("state", None) or None
        page = await self.call(self.ctx.sources.batches, offset=offset, limit=limit, state=state)
        self.show("batches.html", page.as_dict("batches", views.batch_json), page=page, state=state)


class Batch(Base):
    async def get(self, batch_id: str) -> None:
        offset, limit = self.page_args()
        found = await self.call(self.ctx.sources.batch, batch_id, offset=offset, limit=limit)
        if found is None:
            raise tornado.web.HTTPError(404, reason="No such batch (never submitted, or expired)")
        status, failures = found
        payload = {**views.batch_json(status), "failures": failures.as_dict("items", redact)}
        self.show("batch.html", payload, status=status, failures=failures)


class Schedules(Base):
    async def get(self) -> None:
        entries = await self.call(self.ctx.sources.schedules)
        self.show("schedules.html", redact(entries), entries=entries)


class DeadLetters(Base):
    def filters(self) -> dict[str, str | None]:
        return {k: self.get_argument(k, None) or None for k in ("queue", "task", "reason")}

    async def get(self) -> None:
        offset, limit = self.page_args()
        sources = self.ctx.sources
        filters = self.filters()
        matching = sources.dead_letters(**filters)
        snapshot = sources.snapshot.current
        payload = {
            "entries": [redact(x.summary()) for x in matching[offset : offset + limit]],
            "total": len(matching),
            "offset": offset,
            "limit": limit,
            "snapshot_at": iso(snapshot.taken_at or None, timespec="seconds"),
        }
        self.show(
            "dead_letters.html",
            payload,
            letters=matching[offset : offset + limit],
            total=len(matching),
            offset=offset,
            limit=limit,
            filters=filters,
            snapshot=snapshot,
            choices=snapshot.choices,
        )


class DeadLetter(Base):
    async def get(self, entry_id: str) -> None:
        letter = self.ctx.sources.dead_letter(entry_id)
        if letter is None:
            raise tornado.web.HTTPError(404, reason="No such dead letter (replayed or purged?)")
        payload = {
            **redact(letter.summary()),
            "headers": deadletters.headers(letter),
            "body_preview": deadletters.preview(letter),
        }
        self.show("dead_letter.html", payload, letter=letter)


class Action(Base):
    """A POST that changes something: operators only, logged with who did it."""

    def check_operator(self, action: str, subject: str) -> None:
        if not self.operator:
            user = self.account.user
            logger.warning("console: %s (viewer) was refused %s %s", user, action, subject)
            raise tornado.web.HTTPError(403, reason="Viewers may not act")
        logger.info("console: %s %s %s", self.account.user, action, subject)

    def done(self, path: str, message: str) -> None:
        self.redirect(f"{path}?{urlencode({'done': message})}", status=303)


class BatchAction(Action):
    async def post(self, batch_id: str, action: str) -> None:
        self.check_operator(f"batch {action}", batch_id)
        sources = self.ctx.sources
        try:
            if action == "cancel":
                done = await self.call(sources.cancel_batch, batch_id)
                message = "cancelled" if done else "already finished: nothing to cancel"
            else:
                count = await self.call(sources.retry_batch, batch_id)
                message = f"{count} failed item(s) queued again"
        except ValueError as exc:
            raise tornado.web.HTTPError(400, reason=str(exc)) from exc
        self.done(f"/batches/{batch_id}", message)


class ScheduleAction(Action):
    async def post(self, name: str, action: str) -> None:
        self.check_operator(f"schedule {action}", name)
        try:
            task_id = await self.call(self.ctx.sources.schedule_action, action, name)
        except EntryNotFound as exc:
            raise tornado.web.HTTPError(404, reason=str(exc)) from exc
        except InvalidEntry as exc:
            raise tornado.web.HTTPError(400, reason=str(exc)) from exc
        suffix = f": task {task_id}" if task_id else ""
        self.done("/schedules", f"{name}: {action} done{suffix}")


class Replay(Action):
    async def post(self) -> None:
        ids = set(self.get_arguments("id"))
        force = self.get_argument("force", "") == "yes"
        self.check_operator("dead-letter replay" + (" (forced)" if force else ""), " ".join(ids))
        replayed = await self.call(self.ctx.sources.replay, ids, force=force)
        skipped = len(ids) - len(replayed)
        note = f"; {skipped} not replayed (never succeeds, or already gone)" if skipped else ""
        self.done("/dead-letters", f"replayed {len(replayed)} message(s){note}")


class Purge(Action):
    async def post(self) -> None:
        sources = self.ctx.sources
        ids: set[str] | None = set(self.get_arguments("id"))
        filters = {k: self.get_argument(k, None) or None for k in ("queue", "task", "reason")}
        if self.get_argument("all", "") == "yes":
            matching = sources.dead_letters(**filters)
            ids = None if not any(filters.values()) else {x.id for x in matching}
        if self.get_argument("confirm", "") != "yes":
            self.check_operator("dead-letter purge (asked to confirm)", "")
            count = len(sources.snapshot.current.letters) if ids is None else len(ids)
            self.render("purge.html", ids=ids, count=count, filters=filters)
            return
        self.check_operator("dead-letter purge", "every message" if ids is None else " ".join(ids))
        removed = await self.call(sources.purge, ids)
        self.done("/dead-letters", f"purged {removed} message(s)")


class Health(tornado.web.RequestHandler):
    """For probes: no data, no authentication."""

    def get(self) -> None:
        self.finish("OK")


def routes(ctx: Context) -> list[Any]:
    both = [
        (r"/", r"/api/overview", Overview),
        (r"/queues", r"/api/queues", Queues),
        (r"/batches", r"/api/batches", Batches),
        (r"/batches/([0-9A-Za-z_.-]+)", r"/api/batches/([0-9A-Za-z_.-]+)", Batch),
        (r"/schedules", r"/api/schedules", Schedules),
        (r"/dead-letters", r"/api/dead-letters", DeadLetters),
        (r"/dead-letters/([^/]+)", r"/api/dead-letters/([^/]+)", DeadLetter),
    ]
    found: list[Any] = [(r"/healthcheck", Health)]
    for page, api, handler in both:
        found += [(page, handler, {"ctx": ctx}), (api, handler, {"ctx": ctx, "api": True})]
    actions = [
        (r"/batches/([0-9A-Za-z_.-]+)/(cancel|retry)", BatchAction),
        (r"/schedules/([^/]+)/(pause|resume|run-now|remove)", ScheduleAction),
        (r"/dead-letters/replay", Replay),
        (r"/dead-letters/purge", Purge),
    ]
    # The action routes come first: /dead-letters/replay is not an entry id.
    return [(path, handler, {"ctx": ctx}) for path, handler in actions] + found


def application(ctx: Context) -> tornado.web.Application:
    return tornado.web.Application(
        routes(ctx),
        template_path=str(HERE / "templates"),
        static_path=str(HERE / "static"),
        xsrf_cookies=True,
        # The token travels in each form, so no script needs to read the cookie.
        xsrf_cookie_kwargs={"httponly": True, "samesite": "Strict"},
        autoescape="xhtml_escape",
        compress_response=True,
    )
