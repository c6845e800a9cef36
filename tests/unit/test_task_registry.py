"""Task names are a wire contract: the registered set and the routes are pinned here."""

from __future__ import annotations

import subprocess
import sys

from tasks import app
from tests.infra import ROOT

#: Every task a producer may name. Renaming one strands the messages already queued.
EXPECTED_TASKS = {
    "webhooks.deliver",
    "batch.process_chunk",
    "batch.finalize",
    "batch.publish_file",
    "schedule.cleanup_expired_data",
    "schedule.daily_report",
    "schedule.queue_health",
}


def project_tasks() -> set[str]:
    """What a worker registers, read in a fresh process (pytest plugins add shared tasks here)."""
    code = (
        "from tasks import app\n"
        "app.loader.import_default_modules()\n"
        "print('\\n'.join(sorted(n for n in app.tasks if not n.startswith('celery.'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(done.stdout.split())


def test_the_registered_task_names_are_exactly_the_published_contract() -> None:
    assert project_tasks() == EXPECTED_TASKS


def route(name: str) -> str:
    return str(app.amqp.router.route({}, name)["queue"].name)


def test_tasks_are_routed_by_their_domain() -> None:
    assert route("webhooks.deliver") == "default"
    assert route("batch.anything") == "batch"
    assert route("schedule.anything") == "scheduled"
    assert route("urgent.anything") == "priority"


def test_every_route_names_a_declared_queue() -> None:
    declared = {queue.name for queue in app.conf.task_queues}
    for options in app.conf.task_routes.values():
        assert options["queue"] in declared
