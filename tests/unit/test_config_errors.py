"""A bad setting is one line naming the variable, exit status 2, for every command and web app.

Each command is the real `celery -A tasks <command>` process: Celery imports the app inside its
own command-line code (and our command plugins import it earlier still), where any other error
would print a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra import ROOT

CELERY = str(Path(sys.executable).with_name("celery"))
#: Every command an operator runs, each with arguments as the docs give them.
COMMANDS = {
    "worker": ["worker", "--loglevel=INFO"],
    "beat": ["beat"],
    "flower": ["flower", "--address=127.0.0.1"],
    "exporter": ["exporter"],
    "batch": ["batch", "status", "some-batch-id"],
    "schedule": ["schedule", "list"],
    "dlq": ["dlq", "list"],
    "overview": ["overview"],
}


def clean_env(**variables: str) -> dict[str, str]:
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CELERY_", "CONVEYOR_", "FLOWER_"))
    }
    return {**inherited, **variables}


def bad_settings(tmp_path: Path) -> list[tuple[dict[str, str], str]]:
    """(environment, what the one line must say): the issue's three cases and a bad choice."""
    return [
        ({"CELERY_BROKER_URL": ""}, "CELERY_BROKER_URL is set but empty"),
        ({"CELERY_BROKER_URL_FILE": str(tmp_path / "absent")}, "CELERY_BROKER_URL_FILE="),
        ({"CELERY_TASK_TIME_LIMIT": "abc"}, "CELERY_TASK_TIME_LIMIT='abc' is refused"),
        ({"CONVEYOR_LOG_FORMAT": "xml"}, "CONVEYOR_LOG_FORMAT='xml' is refused"),
    ]


def test_every_command_reports_a_bad_setting_as_one_line_with_status_2(tmp_path: Path) -> None:
    cases = bad_settings(tmp_path)
    running = []
    for index, (command, arguments) in enumerate(COMMANDS.items()):
        variables, expected = cases[index % len(cases)]
        process = subprocess.Popen(
            [CELERY, "-A", "tasks", *arguments],
            cwd=ROOT,
            env=clean_env(**variables),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        running.append((command, expected, process))
    # Flower's own secret files follow the same rules.
    flower = subprocess.Popen(
        [CELERY, "-A", "tasks", "flower", "--address=127.0.0.1"],
        cwd=ROOT,
        env=clean_env(
            CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:1//",
            FLOWER_BASIC_AUTH_FILE=str(tmp_path / "absent"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    running.append(("flower secret", "FLOWER_BASIC_AUTH_FILE=", flower))
    for command, expected, process in running:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 2, (command, err)
        assert err.count("\n") == 1 and expected in err, (command, err)
        assert "Traceback" not in err + out, command


@pytest.mark.parametrize("case", range(4))
def test_a_web_app_importing_tasks_gets_a_configuration_error(case: int, tmp_path: Path) -> None:
    variables, expected = bad_settings(tmp_path)[case]
    code = (
        "from core.config import ConfigurationError\n"
        "try:\n    import tasks\n"
        "except ConfigurationError as error:\n"
        "    print(isinstance(error, ValueError), error, sep='|')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_env(**variables),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    is_value_error, message = done.stdout.rstrip("\n").split("|")
    assert is_value_error == "True"
    assert expected in message and "\n" not in message


def test_the_built_in_broker_default_is_announced_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import tasks"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("\n") == 1
    assert "CELERY_BROKER_URL is unset: using the built-in default" in done.stderr
    given = subprocess.run(
        [sys.executable, "-c", "import tasks"],
        cwd=ROOT,
        env=clean_env(CELERY_BROKER_URL="amqp://app:pw@rabbit:5672/conveyor"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert given.returncode == 0 and given.stderr == ""
