from __future__ import annotations

import os
from pathlib import Path

from workers.health import check, main, probe_path


def test_a_missing_probe_file_is_unhealthy(tmp_path: Path) -> None:
    assert "missing" in (check("ready", "w@h", 30, directory=tmp_path) or "")


def test_a_fresh_liveness_file_is_healthy_and_a_stale_one_is_not(tmp_path: Path) -> None:
    path = probe_path("w@h", "live", tmp_path)
    path.touch()
    os.utime(path, (1000, 1000))
    assert check("live", "w@h", 30, now=1010, directory=tmp_path) is None
    assert "last touched 100s ago" in (check("live", "w@h", 30, now=1100, directory=tmp_path) or "")


def test_the_command_expands_the_host_name(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import socket

    monkeypatch.setenv("CONVEYOR_HEALTH_DIR", str(tmp_path))
    assert main(["ready", "--node", "priority@%h"]) == 1
    probe_path(f"priority@{socket.gethostname()}", "ready", tmp_path).touch()
    assert main(["ready", "--node", "priority@%h"]) == 0
