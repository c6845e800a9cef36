"""The console against the real stack, in headless Chromium: a private broker and Redis, a real
worker and the real `celery -A tasks console` process (compose.yaml's command).

It saves a screenshot of every page under the test artifacts (CONVEYOR_TEST_ARTIFACTS);
docs/console/*.png are these screenshots.
"""

from __future__ import annotations

import base64
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from port_for import get_port

from tests.batch.conftest import FAST_RETRIES, INCLUDE
from tests.chaos.test_bad_input import publish_raw, task_body, task_headers
from tests.conftest import StartWorker
from tests.infra import WorkerProcess, wait_for
from tests.monitoring.conftest import ARTIFACTS, ServiceProcess, project_command
from tests.monitoring.test_flower import browser  # noqa: F401  the headless Chromium fixture
from tests.scheduling.conftest import schedule_app  # noqa: F401  the test's own schedule

pytestmark = [pytest.mark.integration, pytest.mark.browser]

OPERATOR = ("olga", "op-s3cret")
VIEWER = ("victor", "view-s3cret")
FLOWER = "http://flower.example:5555"


def authorization(account: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(":".join(account).encode()).decode()


@pytest.fixture(scope="module")
def console_worker(
    conveyor_app: Any, broker_url: str, start_worker: StartWorker
) -> Iterator[WorkerProcess]:
    """A real worker that also runs the test batch handlers (tests/batch's worker)."""
    import tests.batch_handlers  # noqa: F401  the producer validates handler names

    with start_worker(
        "console", broker_url=broker_url, include=INCLUDE, env=FAST_RETRIES
    ) as process:
        yield process


@pytest.fixture
def console(
    tmp_path: Path,
    broker_url: str,
    result_backend: str,
    schedule_app: Any,  # noqa: F811
) -> Iterator[str]:
    """The console as compose.yaml runs it, on loopback and a free port, with two accounts."""
    port = get_port(None)
    service = ServiceProcess(
        project_command("console", "--address=127.0.0.1", f"--port={port}"),
        {
            "CELERY_BROKER_URL": broker_url,
            "CELERY_RESULT_BACKEND": result_backend,
            "CONVEYOR_SCHEDULE_REDIS_URL": result_backend,
            # The test's own schedule, as tests/scheduling's schedule_app keeps it.
            "CELERY_REDBEAT_KEY_PREFIX": schedule_app.conf.redbeat_key_prefix,
            "CONVEYOR_CONSOLE_AUTH": ":".join(OPERATOR),
            "CONVEYOR_CONSOLE_VIEWERS": ":".join(VIEWER),
            "CONVEYOR_FLOWER_URL": FLOWER,
            "CELERY_CONVEYOR_CONSOLE_DEAD_LETTER_REFRESH": "1",
        },
        tmp_path / "console.log",
    ).start()
    url = f"http://127.0.0.1:{port}"
    service.wait_for_http(url + "/healthcheck")
    yield url
    service.stop()
    log = service.log()
    assert "Traceback" not in log, log[-4000:]
    assert OPERATOR[1] not in log and VIEWER[1] not in log


def log_in(driver: Any, account: tuple[str, str]) -> None:
    """Send this account's basic-auth credentials with every request of this browser."""
    driver.execute_cdp_cmd("Network.enable", {})
    headers = {"Authorization": authorization(account)}
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})


def page_text(driver: Any) -> str:
    """The page's text; empty while a new page is loading (after a click or a redirect)."""
    return str(driver.execute_script("return document.body ? document.body.innerText : '';"))


def screenshot(driver: Any, name: str) -> None:
    """The whole page (up to 1,600 px high), as console-<name>.png in the artifacts."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], min(max(int(height) + 100, 500), 1600))
    driver.save_screenshot(str(ARTIFACTS / f"console-{name}.png"))
    driver.set_window_size(size["width"], size["height"])


def shows(driver: Any, *texts: str, timeout: float = 30, what: str = "") -> str:
    """Wait until the page (refreshing itself) shows every text; return the text."""

    def rendered() -> str | None:
        body = page_text(driver)
        return body if all(text in body for text in texts) else None

    return str(wait_for(rendered, timeout, interval=0.3, what=what or f"the page to show {texts}"))


def click(driver: Any, label: str, within: str = "body") -> None:
    """Press the button with this label inside the element `within` (a CSS selector). Pages
    refresh themselves, so an element found a moment ago may be gone: find it again."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(5):
        try:
            scope = driver.find_element("css selector", within)
            buttons = [b for b in scope.find_elements("tag name", "button") if b.text == label]
            assert buttons, f"no {label!r} button in {page_text(driver)}"
            buttons[0].click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"the {label!r} button kept being replaced")


def entry_row(driver: Any, name: str) -> tuple[str, str]:
    """A schedule entry's row text and next run, read at once (the page refreshes itself)."""
    text, next_run = driver.execute_script(
        "const row = document.getElementById(arguments[0]);"
        "return [row.innerText, row.querySelector('.next-run').innerText];",
        f"entry-{name}",
    )
    return str(text), str(next_run)


def post_as(url: str, path: str, account: tuple[str, str]) -> int:
    """POST with this account's credentials and a valid CSRF token, as a form would."""
    auth = {"Authorization": authorization(account)}
    with urllib.request.urlopen(urllib.request.Request(url + "/", headers=auth)) as response:
        cookie = response.headers["Set-Cookie"]
    token = re.search(r"_xsrf=([^;]+)", cookie)
    assert token is not None
    body = urllib.parse.urlencode({"_xsrf": token.group(1)}).encode()
    headers = {**auth, "Cookie": f"_xsrf={token.group(1)}"}
    request = urllib.request.Request(url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_an_operator_follows_and_acts_on_batches_schedules_and_dead_letters_a_viewer_only_reads(
    console: str,
    browser: Any,  # noqa: F811
    console_worker: WorkerProcess,
    conveyor_app: Any,
    broker_url: str,
    ledger: redis.Redis,
) -> None:
    from tasks.batch import api
    from tasks.schedule import store
    from tasks.schedule.entries import EntrySpec
    from tests import worker_tasks

    # Given a task whose error outlasts its retries (it will be dead-lettered, and can succeed
    # once the error is gone), a poison message no worker knows, a slow batch and a
    # runtime schedule entry
    ledger.set("broken:console", 1)
    exhausted = worker_tasks.transient.apply_async(("console",))
    poison_id = f"poison-{uuid.uuid4().hex[:8]}"
    rabbit = SimpleNamespace(url=broker_url)
    publish_raw(rabbit, task_body([]), headers=task_headers("nobody.knows", poison_id))  # type: ignore[arg-type]
    # Every 15th item has no key: the handler refuses it (a failure with its reason).
    items = [{"key": f"k{n % 3}", "value": n} if n % 15 else {"value": n} for n in range(120)]
    slow = {"delay": 0.1}
    watched = api.submit(
        "tests.slow_aggregate", items, chunk_size=4, options=slow, app=conveyor_app
    )
    store.add(
        conveyor_app,
        EntrySpec(
            name="console-demo",
            task="tests.add",
            reason="nightly <b>totals</b>",
            expires=60,
            every=3600,
            args=(1, 2),
        ),
    )

    # When the operator logs in, the overview shows the stack
    browser.set_window_size(1280, 800)
    log_in(browser, OPERATOR)
    browser.get(console + "/")
    shows(browser, "Overview", "Queues", "Latest batches", "olga · operator")
    assert FLOWER in browser.find_element("link text", "Flower ↗").get_attribute("href")

    # The first batch's page shows its progress bar advancing, on its own, to completed
    browser.get(f"{console}/batches/{watched}")
    shows(browser, "running", what="the batch to run")
    screenshot(browser, "batch-running")
    seen: set[int] = set()

    def completed() -> bool:
        # One script reads both: the page replaces its content as it refreshes itself.
        value, state = browser.execute_script(
            "return [document.querySelector('progress').value,"
            " document.getElementById('batch-state').textContent]"
        )
        seen.add(int(value))
        return "completed" in state

    wait_for(completed, 60, interval=0.3, what="the batch's page to show it completed")
    assert max(seen) == 100 and len(seen) >= 3, f"the bar did not advance step by step: {seen}"
    page = shows(browser, "Result", "k0", "k1", "k2", "completed_with_failures", "Retry failed")
    assert page.count("missing value in field 'key'") == 8, page
    screenshot(browser, "batch")

    # It cancels a second batch from its page while it runs
    doomed = api.submit(
        "tests.slow_aggregate", items * 4, chunk_size=4, options=slow, app=conveyor_app
    )
    browser.get(f"{console}/batches/{doomed}")
    click(browser, "Cancel")
    shows(browser, "cancelled")
    assert api.status(doomed, app=conveyor_app).state == "cancelled"
    browser.get(console + "/batches")
    shows(browser, watched[:12], doomed[:12], "completed", "cancelled")
    screenshot(browser, "batches")

    # It pauses the runtime entry (no next run), then resumes it (a new next run)
    browser.get(console + "/schedules")
    text, before = entry_row(browser, "console-demo")
    assert before != "-" and "nightly <b>totals</b>" in text
    click(browser, "Pause", "#entry-console-demo")
    shows(browser, "console-demo: pause done")
    text, paused = entry_row(browser, "console-demo")
    assert "paused" in text and paused == "-"
    click(browser, "Resume", "#entry-console-demo")
    shows(browser, "console-demo: resume done")
    text, after = entry_row(browser, "console-demo")
    assert "enabled" in text and after not in ("-", before), (before, after)
    assert store.get(conveyor_app, "console-demo").enabled
    screenshot(browser, "schedules")

    # The dead letters show the poison message with its reason, and the exhausted task
    wait_for(lambda: exhausted.state == "FAILURE", 60, 0.5, "the task to exhaust its retries")
    browser.get(console + "/dead-letters")
    text = shows(browser, "nobody.knows", "tests.transient", timeout=60)
    screenshot(browser, "dead-letters")
    poison_row = browser.find_element("xpath", "//tr[contains(., 'nobody.knows')]").text
    assert "unknown_task" in poison_row and "never succeeds" in poison_row, (poison_row, text)
    exhausted_row = browser.find_element("xpath", "//tr[contains(., 'tests.transient')]").text
    assert "retries_exhausted" in exhausted_row and "ConnectionError" in exhausted_row
    assert "never succeeds" not in exhausted_row
    browser.get(f"{console}/dead-letters/{poison_id}")
    shows(browser, "nobody.knows", "unknown_task", "not replayed unless forced", "Headers")
    assert browser.find_element("link text", poison_id).get_attribute("href") == (
        f"{FLOWER}/task/{poison_id}"
    )
    screenshot(browser, "dead-letter")

    # Replaying the exhausted task, once its cause is fixed, runs it under its own id
    ledger.delete("broken:console")
    browser.get(f"{console}/dead-letters/{exhausted.id}")
    click(browser, "Replay")
    shows(browser, "replayed 1 message(s)")
    # It ran three times before (once and two retries); the replay is the fourth
    wait_for(lambda: ledger.hget("runs", exhausted.id) == "4", 30, 0.5, "the replay to run")

    def stored_state() -> Any:
        # Read past the result cache, which keeps the FAILURE seen above.
        meta = conveyor_app.backend.get_task_meta(exhausted.id, cache=False)
        return meta["status"] == "SUCCESS" and meta["result"] == "ok"

    wait_for(stored_state, 10, 0.2, "the replayed task's success to be stored")

    def replayed_entry_gone() -> bool:
        browser.get(console + "/dead-letters")
        return "nobody.knows" in page_text(browser) and "tests.transient" not in page_text(browser)

    wait_for(replayed_entry_gone, 15, 0.5, "the replayed entry to leave the dead letters")

    browser.get(console + "/queues")
    shows(browser, "default", "batch", "consumers")
    screenshot(browser, "queues")
    browser.get(console + "/")
    shows(browser, "Dead letters by reason")
    screenshot(browser, "overview")
    browser.set_window_size(420, 900)
    browser.get(f"{console}/batches/{watched}")
    shows(browser, "completed")
    screenshot(browser, "narrow")
    browser.set_window_size(1280, 800)

    # A viewer sees the same pages without a single action, and a POST is refused
    log_in(browser, VIEWER)
    for path in ("/batches/" + doomed, "/schedules", "/dead-letters"):
        browser.get(console + path)
        shows(browser, "victor · viewer")
        posts, labels = browser.execute_script(
            "return [document.querySelectorAll('form[method=post]').length,"
            " [...document.querySelectorAll('button')].map(b => b.innerText)];"
        )
        assert posts == 0 and set(labels) <= {"Show", "Filter"}, (path, labels)
    screenshot(browser, "viewer")
    assert post_as(console, f"/batches/{watched}/retry", VIEWER) == 403
    assert post_as(console, "/schedules/console-demo/pause", VIEWER) == 403
    assert store.get(conveyor_app, "console-demo").enabled
