"""Flower against the real stack, in headless Chromium: log in, see the worker and the tasks."""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.infra import ManagedRabbitNode, WorkerProcess, require, wait_for
from tests.monitoring.conftest import (
    ARTIFACTS,
    FLOWER_PASSWORD,
    FLOWER_USER,
    FlowerInstance,
    start_flower,
)

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
AUTHORIZATION = "Basic " + base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()


def get(url: str, authorized: bool = True) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if authorized:
        request.add_header("Authorization", AUTHORIZATION)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.fixture
def browser() -> Iterator[Any]:
    require(
        Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(),
        "chromium and chromium-driver not installed (apt-get install chromium chromium-driver)",
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="conveyor-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def log_in(driver: Any) -> None:
    """Send the operator's basic-auth credentials with every request of this browser."""
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": AUTHORIZATION}}
    )


def shows(driver: Any, url: str, *texts: str, name: str = "", timeout: float = 30) -> str:
    """Load `url` and wait until the rendered page contains every text; return the text."""
    driver.get(url)

    def rendered() -> str | None:
        body = str(driver.find_element("tag name", "body").text)
        # Narrow columns wrap long names (worker names, task ids) over two lines.
        unwrapped = body.replace("\n", "")
        return body if all(text in body or text in unwrapped for text in texts) else None

    try:
        return str(wait_for(rendered, timeout, interval=0.5, what=f"{url} to show {texts}"))
    finally:
        screenshot(driver, name or url.rsplit("/", 1)[-1])


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"flower-{name}.png"
    driver.save_screenshot(str(path))
    return path


def test_flower_refuses_a_visitor_without_credentials(flower: FlowerInstance, browser: Any) -> None:
    for path in ("/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks"):
        status, _ = get(flower.url + path, authorized=False)
        assert status == 401, path
    status, _ = get(flower.url + "/", authorized=True)
    assert status == 200
    # Known and documented (docs/monitoring.md): Flower serves /metrics and /healthcheck without
    # auth, which is why compose publishes its port on loopback only.
    assert get(flower.url + "/metrics", authorized=False)[0] == 200

    # A browser without credentials sees no worker data either
    browser.get(flower.url + "/workers")
    screenshot(browser, "refused")
    assert "monitored-" not in browser.page_source
    assert "Cluster overview" not in browser.page_source


def test_an_operator_logs_in_and_sees_the_worker_the_tasks_and_the_broker(
    flower: FlowerInstance,
    browser: Any,
    monitored_worker: WorkerProcess,
    producer: Celery,
) -> None:
    # Given tasks that succeeded and one that failed, run by the real worker
    ok = producer.send_task("tests.add", args=(20, 22))
    bad = producer.send_task("tests.fail", args=("shown in flower",))
    assert ok.get(timeout=30) == 42
    with pytest.raises(ValueError):
        bad.get(timeout=30)

    # When the operator opens Flower with their credentials
    log_in(browser)

    # Then the dashboard lists the worker as online, the tasks page both tasks with their
    # states, and the broker page the queues the worker consumes, with their figures read
    # through the RabbitMQ management API
    shows(browser, flower.url + "/workers", monitored_worker.node, "Online")
    tasks = shows(browser, flower.url + "/tasks", ok.id, bad.id, "SUCCESS", "FAILURE")
    assert "tests.add" in tasks and "tests.fail" in tasks
    shows(
        browser,
        flower.url + f"/task/{bad.id}",
        "FAILURE",
        "ValueError",
        "shown in flower",
        name="task",
    )
    broker = shows(browser, flower.url + "/broker", "default", "priority")
    assert "unacked" in broker.lower() and "consumers" in broker.lower()


def test_flower_keeps_its_task_history_across_a_restart(
    flower: FlowerInstance,
    managed_rabbit: ManagedRabbitNode,
    monitored_backend: str,
    producer: Celery,
) -> None:
    result = producer.send_task("tests.add", args=(1, 1))
    assert result.get(timeout=30) == 2
    # The result is in Redis before Flower has processed the task-succeeded event: wait for
    # Flower's own state, or the restart below would save (and test) STARTED.
    wait_for(
        lambda: (
            json.loads(get(flower.url + "/api/tasks")[1]).get(result.id, {}).get("state")
            == "SUCCESS"
        ),
        15,
        what="Flower to see the task succeed",
    )

    # When Flower stops (it saves its state) and starts again on the same database
    flower.service.stop()
    port = int(flower.url.rsplit(":", 1)[1])
    flower.service = start_flower(flower.db.parent, managed_rabbit, monitored_backend, port)

    # Then the task is still known, with its state
    status, body = get(flower.url + "/api/tasks")
    assert status == 200
    tasks = json.loads(body)
    assert tasks[result.id]["state"] == "SUCCESS"


def test_read_only_mode_refuses_control_actions(
    tmp_path: Path,
    managed_rabbit: ManagedRabbitNode,
    monitored_backend: str,
    monitored_worker: WorkerProcess,
) -> None:
    from port_for import get_port

    port = get_port(None)
    service = start_flower(
        tmp_path, managed_rabbit, monitored_backend, port, FLOWER_READ_ONLY="true"
    )
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/worker/pool/grow/{monitored_worker.node}?n=1",
            method="POST",
            headers={"Authorization": AUTHORIZATION},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (403, 405)
    finally:
        service.stop()
