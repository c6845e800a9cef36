"""Apps that are closed, and processes that fork, leave no broker connection or thread behind.

Each test counts the connections of a vhost of its own on the private node with rabbitmqctl,
and measures stock Celery (the same configuration, Celery's own task class) as the baseline.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from celery import Celery

from core.events import sent_events
from tests.infra import RabbitNode

pytestmark = pytest.mark.integration

APPS = 50
STOCK_TASK = "celery.app.task:Task"
CONVEYOR_TASK = "tasks.base:Task"


@pytest.fixture
def new_vhost(rabbit: RabbitNode, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], str]]:
    """Makes vhosts of the private node that no other test connects to; returns their URL."""
    # Celery lets CELERY_BROKER_URL and CELERY_RESULT_BACKEND (set for the session's app)
    # override an app's own settings.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)
    made: list[str] = []

    def make() -> str:
        name = f"hygiene-{uuid.uuid4().hex[:8]}"
        rabbit.ctl("add_vhost", name)
        rabbit.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        made.append(name)
        return rabbit.url.rsplit("/", 1)[0] + name

    yield make
    for name in made:
        rabbit.ctl("delete_vhost", name)


def connections(rabbit: RabbitNode, url: str, at_most: int | None = None) -> int:
    """Open connections of `url`'s vhost, as the broker counts them; with `at_most`, polled
    for a few seconds until there are no more than that (a busy broker drops a closed
    connection a moment after the client's close, or its socket's)."""
    gc.collect()  # Celery's close leaves its pool's connections to the garbage collector
    vhost = url.rsplit("/", 1)[1]
    deadline = time.monotonic() + 5
    while True:
        time.sleep(0.3)
        rows = json.loads(rabbit.ctl("list_connections", "vhost", "--formatter", "json"))
        count = sum(1 for row in rows if row["vhost"] == vhost)
        if at_most is None or count <= at_most or time.monotonic() > deadline:
            return count


def app_for(url: str, task_cls: str) -> Celery:
    app = Celery("hygiene", task_cls=task_cls, set_as_current=False)
    app.config_from_object("celeryconfig")
    # Only broker connections are counted here: no result backend.
    app.conf.update(broker_url=url, result_backend=None)
    app.task(name="hygiene.noop")(noop)
    return app


def noop() -> None:
    """Never runs: the tests only publish."""


def use_and_close(url: str, task_cls: str) -> None:
    app = app_for(url, task_cls)
    app.tasks["hygiene.noop"].delay()
    app.close()


def test_closed_apps_leave_no_more_connections_or_threads_than_stock_celery(
    rabbit: RabbitNode, new_vhost: Callable[[], str]
) -> None:
    stock_url, conveyor_url = new_vhost(), new_vhost()
    threads_before = set(threading.enumerate())

    # Given an app in use: one pooled connection for tasks, and Conveyor's one for sent events
    app = app_for(conveyor_url, CONVEYOR_TASK)
    for _ in range(5):
        app.tasks["hygiene.noop"].delay()
    assert connections(rabbit, conveyor_url) == 2
    app.close()

    # When 50 apps each send a task and are closed, as stock Celery's and as Conveyor's
    for _ in range(APPS):
        use_and_close(stock_url, STOCK_TASK)
        use_and_close(conveyor_url, CONVEYOR_TASK)

    # Then Conveyor leaves no more connections open than stock Celery, and no thread
    stock = connections(rabbit, stock_url)
    assert connections(rabbit, conveyor_url, at_most=stock) <= stock
    assert set(threading.enumerate()) <= threads_before


def test_a_forked_child_uses_and_closes_connections_of_its_own(
    rabbit: RabbitNode, new_vhost: Callable[[], str]
) -> None:
    threads_before = set(threading.enumerate())
    stock = fork_after_use(rabbit, new_vhost(), STOCK_TASK)
    conveyor = fork_after_use(rabbit, new_vhost(), CONVEYOR_TASK, stock)

    # Then the parent had its pooled and its sent-events connection; the child's close left no
    # more of its own open than a stock Celery app's close leaves (Celery's close leaves its
    # pool's connection to process exit; a stock child leaves none only because it published
    # on its parent's socket, which Conveyor's child does not: core/forks.py); the parent's
    # stayed up through the child's close and exit; and closing the parent leaves no more
    # than stock Celery
    assert conveyor["parent"] == 2
    assert conveyor["child"] <= stock["closed"]
    assert conveyor["after_child"] == conveyor["parent"]
    assert conveyor["closed"] <= stock["closed"]
    # and the child published on a connection of its own (core/forks.py), not on the socket
    # of its parent's pool, which the parent still publishes on afterwards (gunicorn --preload)
    assert conveyor["child_port"] != conveyor["parent_port"]
    assert conveyor["parent_port_after"] == conveyor["parent_port"]
    assert set(threading.enumerate()) <= threads_before


def pooled_port(app: Celery) -> int:
    """The local port of the connection the app's producer pool publishes on."""
    with app.producer_or_acquire() as producer:
        return int(producer.connection.connection.transport.sock.getsockname()[1])


def fork_after_use(
    rabbit: RabbitNode, url: str, task_cls: str, stock: dict[str, int] | None = None
) -> dict[str, int]:
    """The vhost's connection counts through a fork; `stock`'s, when given, bound the waits."""
    # Given a parent process whose app has sent a task
    app = app_for(url, task_cls)
    app.tasks["hygiene.noop"].delay()
    parent = connections(rabbit, url)
    parent_port = pooled_port(app)
    # When a child forked from it sends a task, closes the app and exits as a web worker does
    bound = None if stock is None else parent + stock["closed"]
    in_child, child_port = fork_and_wait(rabbit, url, app, bound)
    after_child = connections(rabbit, url, at_most=parent)
    # and the parent sends again, then closes its app
    app.tasks["hygiene.noop"].delay()
    if task_cls == CONVEYOR_TASK:
        sent_events(app).flush()  # logs a drop instead if its connection was lost
        assert connections(rabbit, url) == after_child
    parent_port_after = pooled_port(app)
    app.close()
    closed = connections(rabbit, url, at_most=None if stock is None else stock["closed"])
    return {
        "parent": parent,
        "child": in_child - parent,
        "after_child": after_child,
        "closed": closed,
        "parent_port": parent_port,
        "child_port": child_port,
        "parent_port_after": parent_port_after,
    }


def fork_and_wait(
    rabbit: RabbitNode, url: str, app: Celery, at_most: int | None
) -> tuple[int, int]:
    """Fork; the child sends a task with `app`, closes it and waits; the parent counts the
    vhost's connections, then lets the child run its exit handlers and exit. Returns the count
    and the local port of the connection the child published on."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            app.tasks["hygiene.noop"].delay()
            port = pooled_port(app)
            app.close()
            gc.collect()
            os.write(ready_w, str(port).encode())
            os.read(go_r, 1)
            import atexit

            atexit._run_exitfuncs()
            code = 0
        finally:
            os._exit(code)
    try:
        port = os.read(ready_r, 16)
        assert port, "the child failed before closing its app"
        return connections(rabbit, url, at_most), int(port)
    finally:
        os.write(go_w, b"1")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
