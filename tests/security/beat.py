"""Beat (compose's command) sending a scheduled task that a worker runs, for role and TLS tests."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from tests.infra import WorkerProcess, wait_for
from tests.scheduling.conftest import BeatProcess, celery_cli

#: A real Conveyor job that the command line accepts and that a worker serving `scheduled` runs.
JOB = "schedule.queue_health"


def beat_sends_a_task_the_worker_runs(
    worker: WorkerProcess, broker_url: str, redis_url: str, workdir: Path, env: dict[str, str]
) -> str:
    """Start beat on `broker_url`, schedule JOB every second, wait until `worker` ran it.

    Returns beat's log. `env` is added to beat's and the command line's environment.
    """
    prefix = f"beat-{uuid.uuid4().hex[:8]}:"
    beat = BeatProcess(
        broker_url=broker_url,
        redis_url=redis_url,
        key_prefix=prefix,
        workdir=workdir,
        name=f"beat-{os.getpid()}",
        env=env,
    ).start()
    try:
        cli_env = {
            **env,
            "CELERY_BROKER_URL": broker_url,
            "CELERY_RESULT_BACKEND": f"{redis_url}/0",
            "CONVEYOR_SCHEDULE_REDIS_URL": f"{redis_url}/0",
            "CELERY_REDBEAT_KEY_PREFIX": prefix,
        }
        added = celery_cli(
            "schedule", "add", "beat-check", JOB, "--every", "1", "--json", env=cli_env
        )
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["task"] == JOB
        wait_for(
            lambda: any(JOB in line and "succeeded" in line for line in worker.log().splitlines()),
            60,
            interval=0.5,
            what=f"beat's {JOB} to run on the worker (beat log: {beat.log_path})",
        )
    finally:
        beat.stop()
    return beat.log()
