"""The console's web layer without a broker: authentication, CSRF, roles, escaping, redaction,
security headers and the JSON shapes (the data comes from tests/console/fakes.py)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import urllib.parse
from typing import Any

import pytest
from tornado.httpclient import HTTPResponse
from tornado.testing import AsyncHTTPTestCase

from console.auth import (
    OPERATOR,
    VIEWER,
    Account,
    Authenticator,
    UnsafeConsoleConfiguration,
    accounts_from_environment,
    check_access,
)
from console.web import Context, application
from tests.console.fakes import (
    ENTRY_VIEW_FIELDS,
    STATUS_FIELDS,
    FakeSources,
    dead_letter_entries,
)
from tests.infra import ROOT

OPERATOR_ACCOUNT = Account("olga", "op-pass", OPERATOR)
VIEWER_ACCOUNT = Account("victor", "view-pass", VIEWER)
PAGES = [
    "/",
    "/queues",
    "/batches",
    "/batches/b1",
    "/schedules",
    "/dead-letters",
    "/dead-letters/t-hostile",
]
APIS = [
    "/api/queues",
    "/api/batches",
    "/api/batches/b1",
    "/api/schedules",
    "/api/dead-letters",
]


def basic(account: Account) -> str:
    return "Basic " + base64.b64encode(f"{account.user}:{account.password}".encode()).decode()


class ConsoleCase(AsyncHTTPTestCase):
    def get_app(self) -> Any:
        self.sources = FakeSources()
        auth = Authenticator([OPERATOR_ACCOUNT, VIEWER_ACCOUNT])
        return application(Context(self.sources, auth))  # type: ignore[arg-type]

    def get(self, path: str, account: Account | None = OPERATOR_ACCOUNT) -> HTTPResponse:
        headers = {"Authorization": basic(account)} if account else {}
        return self.fetch(path, headers=headers, follow_redirects=False)

    def post(
        self, path: str, account: Account, form: dict[str, Any], *, token: bool = True
    ) -> HTTPResponse:
        headers = {"Authorization": basic(account)}
        if token:
            # The token as a page hands it out: its cookie, and the same value in the form.
            cookie = self.get("/", account).headers["Set-Cookie"]
            value = re.search(r"_xsrf=([^;]+)", cookie)
            assert value is not None
            headers["Cookie"] = f"_xsrf={value.group(1)}"
            form = {**form, "_xsrf": value.group(1)}
        body = urllib.parse.urlencode(form, doseq=True)
        return self.fetch(path, method="POST", headers=headers, body=body, follow_redirects=False)


class TestAuthentication(ConsoleCase):
    def test_every_page_and_api_answers_401_without_credentials(self) -> None:
        for path in PAGES + APIS:
            response = self.get(path, account=None)
            assert response.code == 401, path
            assert "Basic" in response.headers["WWW-Authenticate"]
            assert "aggregate" not in response.body.decode()

    def test_a_wrong_password_is_401_and_the_right_one_200(self) -> None:
        wrong = Account(OPERATOR_ACCOUNT.user, "guess", OPERATOR)
        assert self.get("/batches", wrong).code == 401
        for path in PAGES + APIS:
            assert self.get(path).code == 200, path
            assert self.get(path, VIEWER_ACCOUNT).code == 200, path

    def test_the_health_check_needs_no_credentials_and_shows_no_data(self) -> None:
        response = self.get("/healthcheck", account=None)
        assert (response.code, response.body) == (200, b"OK")


class TestActions(ConsoleCase):
    def test_a_post_without_the_csrf_token_is_refused_with_403(self) -> None:
        for path in ("/batches/b1/cancel", "/schedules/nightly/pause", "/dead-letters/replay"):
            response = self.post(path, OPERATOR_ACCOUNT, {"id": "t-other"}, token=False)
            assert response.code == 403, path
        assert self.sources.calls == []

    def test_a_viewer_sees_no_buttons_and_is_refused_with_403(self) -> None:
        for path in ("/batches/b1", "/schedules", "/dead-letters"):
            page = self.get(path, VIEWER_ACCOUNT).body.decode()
            assert '<form method="post"' not in page, path
            assert "_xsrf" not in page, path
        for path in ("/batches/b1/cancel", "/schedules/nightly/pause", "/dead-letters/replay"):
            assert self.post(path, VIEWER_ACCOUNT, {"id": "t-other"}).code == 403, path
        assert self.sources.calls == []

    def test_an_operator_acts_with_the_token_and_the_action_is_logged_with_the_user(
        self,
    ) -> None:
        with self.assertLogs("console.actions", "INFO") as logged:
            response = self.post("/batches/b1/cancel", OPERATOR_ACCOUNT, {})
            self.post("/schedules/nightly/pause", OPERATOR_ACCOUNT, {})
            self.post("/dead-letters/replay", OPERATOR_ACCOUNT, {"id": ["t-other"]})
        assert response.code == 303
        assert response.headers["Location"].startswith("/batches/b1?done=")
        assert self.sources.calls == [
            ("cancel", "b1"),
            ("pause", "nightly"),
            ("replay", ["t-other"], False),
        ]
        text = "\n".join(logged.output)
        assert "olga batch cancel b1" in text and "olga schedule pause nightly" in text
        assert OPERATOR_ACCOUNT.password not in text

    def test_a_purge_asks_for_confirmation_first(self) -> None:
        asked = self.post("/dead-letters/purge", OPERATOR_ACCOUNT, {"id": ["t-other"]})
        assert asked.code == 200 and "cannot be undone" in asked.body.decode()
        assert self.sources.calls == []
        done = self.post(
            "/dead-letters/purge", OPERATOR_ACCOUNT, {"id": ["t-other"], "confirm": "yes"}
        )
        assert done.code == 303
        assert self.sources.calls == [("purge", ["t-other"])]


class TestShown(ConsoleCase):
    def test_a_hostile_payload_shows_as_text_and_secrets_are_redacted(self) -> None:
        for path in ("/batches", "/batches/b1", "/schedules", "/dead-letters/t-hostile"):
            page = self.get(path).body.decode()
            assert "<script>alert" not in page, path
            assert "hunter2" not in page, path
        detail = self.get("/dead-letters/t-hostile").body.decode()
        assert "&lt;script&gt;alert(" in detail
        assert "redis://:********@cache:6379/0" in detail
        assert "hunter2" not in self.get("/api/dead-letters/t-hostile").body.decode()

    def test_pages_set_the_security_headers_and_a_strict_cookie(self) -> None:
        response = self.get("/")
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert response.headers["X-Frame-Options"] == "DENY"
        cookie = response.headers["Set-Cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert self.get("/", account=None).headers["X-Frame-Options"] == "DENY"

    def test_the_json_api_uses_the_cli_shapes(self) -> None:
        def data(path: str) -> Any:
            return json.loads(self.get(path).body)

        batches = data("/api/batches")
        assert batches["total"] == 2 and len(batches["batches"]) == 2
        assert set(batches["batches"][0]) == STATUS_FIELDS | {"eta_seconds"}
        assert batches["batches"][0]["eta_seconds"] == pytest.approx(58 / 10.5)
        one = data("/api/batches/b1")
        assert set(one) == STATUS_FIELDS | {"eta_seconds", "failures"}
        assert one["failures"]["total"] == 1
        assert one["failures"]["items"][0]["line"] == 5
        assert self.get("/api/batches/missing").code == 404
        entries = data("/api/schedules")
        assert set(entries[0]) == ENTRY_VIEW_FIELDS | {"last_success"}
        letters = data("/api/dead-letters")
        assert letters["total"] == 2
        assert [e["id"] for e in letters["entries"]] == ["t-hostile", "t-other"]
        assert set(letters["entries"][0]) == set(dead_letter_entries()[0].summary())
        assert data("/api/dead-letters?reason=expired")["total"] == 1
        queues = data("/api/queues")
        assert {"name", "ready", "unacked", "consumers", "oldest_waiting_seconds"} <= set(
            queues["queues"][0]
        )

    def test_a_task_id_links_to_flower_and_the_header_too(self) -> None:
        page = self.get("/dead-letters/t-hostile").body.decode()
        assert 'href="http://flower.example:5555/task/t-hostile"' in page
        assert 'href="http://flower.example:5555"' in page


def test_the_console_refuses_a_public_address_without_accounts() -> None:
    with pytest.raises(UnsafeConsoleConfiguration, match="without authentication"):
        check_access("0.0.0.0", [])
    with pytest.raises(UnsafeConsoleConfiguration):
        check_access("", [])
    check_access("127.0.0.1", [])
    check_access("::1", [])
    check_access("0.0.0.0", [OPERATOR_ACCOUNT])


def test_the_command_exits_with_the_reason_on_a_public_address_without_auth() -> None:
    env = {"PATH": str(ROOT / ".venv" / "bin"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "console", "--address", "0.0.0.0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "refusing to start" in done.stderr and "CONVEYOR_CONSOLE_AUTH" in done.stderr


def test_accounts_come_from_the_variables_or_their_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    secret = tmp_path / "auth"
    secret.write_text("ann:pw1,bob:pw2\n")
    monkeypatch.setenv("CONVEYOR_CONSOLE_AUTH_FILE", str(secret))
    monkeypatch.setenv("CONVEYOR_CONSOLE_VIEWERS", "vic:pw3")
    accounts = accounts_from_environment()
    assert [(a.user, a.role) for a in accounts] == [
        ("ann", OPERATOR),
        ("bob", OPERATOR),
        ("vic", VIEWER),
    ]
    monkeypatch.setenv("CONVEYOR_CONSOLE_VIEWERS", "no-password")
    with pytest.raises(UnsafeConsoleConfiguration, match="CONVEYOR_CONSOLE_VIEWERS"):
        accounts_from_environment()
