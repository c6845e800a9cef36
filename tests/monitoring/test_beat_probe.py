"""Beat's liveness probe (compose's healthcheck): `celery inspect ping` to celerybeat@<host>."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra import ROOT, ManagedRabbitNode, compose_command, wait_for
from tests.monitoring.conftest import ServiceProcess, project_command

pytestmark = pytest.mark.integration


def ping_beat(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The command of compose's beat healthcheck, with $HOSTNAME expanded as the shell would."""
    import yaml

    test = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["beat"]["healthcheck"]
    command = test["test"][1].replace("$$HOSTNAME", socket.gethostname()).split()
    assert command[:3] == ["celery", "-A", "tasks"]
    celery = str(Path(sys.executable).with_name("celery"))
    return subprocess.run(
        [celery, *command[1:]],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_beat_answers_its_liveness_probe_and_a_frozen_beat_does_not(
    tmp_path: Path, managed_rabbit: ManagedRabbitNode, monitored_backend: str
) -> None:
    env = {
        "CELERY_BROKER_URL": managed_rabbit.url,
        "CELERY_RESULT_BACKEND": monitored_backend,
    }
    assert compose_command("beat")[:4] == ["celery", "-A", "tasks", "beat"]
    beat = ServiceProcess(project_command("beat"), env, tmp_path / "beat.log").start()
    try:
        # Given a running beat, the probe succeeds
        done = wait_for(
            lambda: (lambda d: d if d.returncode == 0 else None)(ping_beat(env)),
            60,
            interval=1,
            what=f"beat to answer ping (log: {beat.log_path})",
        )
        assert "pong" in done.stdout

        # When beat is frozen, the probe fails
        assert beat.process is not None
        os.killpg(beat.process.pid, signal.SIGSTOP)
        frozen = ping_beat(env)
        assert frozen.returncode != 0
        os.killpg(beat.process.pid, signal.SIGCONT)
    finally:
        beat.stop()
