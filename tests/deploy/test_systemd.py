"""deploy/systemd: every unit passes `systemd-analyze verify` and runs the Procfile's commands.

`verify` refuses a unit whose ExecStart binary is missing, and the units name the production
path (/opt/conveyor/.venv/bin/celery). So each run verifies copies of the units inside a
temporary root (`--root`) that holds systemd's own units and an executable stub at every
absolute path the units execute: the files in the repository stay as installed, and syntax,
unknown keys and dependencies are still checked. Warnings fail the test, not only errors.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import celeryconfig
from tests.infra import ROOT, compose_command, require

UNITS_DIR = ROOT / "deploy" / "systemd"
UNITS = sorted(UNITS_DIR.glob("*.service"))
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
#: The units that run a Procfile process, by Procfile name.
PROCFILE_UNITS = {
    "worker": "conveyor-worker.service",
    "worker_priority": "conveyor-worker-priority.service",
    "beat": "conveyor-beat.service",
    "flower": "conveyor-flower.service",
    "exporter": "conveyor-exporter.service",
}
EXEC_KEY = re.compile(r"^Exec\w+=[-@:+!]*(/\S+)", re.M)


def directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def verify_root(tmp_path: Path) -> Path:
    """A root with systemd's units, the units under test, and a stub for each executable."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    target = root / "etc" / "systemd" / "system"
    target.mkdir(parents=True)
    for unit in UNITS:
        text = unit.read_text()
        (target / unit.name).write_text(text)
        for executable in EXEC_KEY.findall(text):
            stub = root / executable.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    return root


def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze (Debian: systemd)")
    require(SYSTEM_UNITS.is_dir(), f"systemd's units in {SYSTEM_UNITS}")
    assert set(PROCFILE_UNITS.values()) <= {unit.name for unit in UNITS}
    root = verify_root(tmp_path)
    installed = [str(root / "etc/systemd/system" / unit.name) for unit in UNITS]
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *installed],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_every_unit_restarts_on_failure_with_the_shared_environment(unit: Path) -> None:
    found = directives(unit)
    assert found.get("Restart") == ["on-failure"]
    assert "/etc/conveyor/conveyor.env" in found.get("EnvironmentFile", [])
    assert found.get("User") == ["conveyor"]
    assert found.get("WorkingDirectory") == ["/opt/conveyor"]


def test_workers_get_longer_to_stop_than_their_soft_shutdown() -> None:
    for name in ("worker", "worker_priority"):
        found = directives(UNITS_DIR / PROCFILE_UNITS[name])
        (timeout,) = found["TimeoutStopSec"]
        assert float(timeout) > celeryconfig.worker_soft_shutdown_timeout, name


def test_the_units_run_the_procfile_commands() -> None:
    procfile = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    for name, unit in PROCFILE_UNITS.items():
        (command,) = directives(UNITS_DIR / unit)["ExecStart"]
        # `%%` is systemd's escape for the `%` of Celery's own `%h` placeholder.
        argv = shlex.split(command.replace("%%", "%"))
        assert argv[0] == "/opt/conveyor/.venv/bin/celery", unit
        assert ["celery", *argv[1:]] == procfile[name].split(), unit
    for name in ("worker", "worker_priority", "beat"):
        assert procfile[name].split() == compose_command(name), name
