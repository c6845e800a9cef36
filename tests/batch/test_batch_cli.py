"""`celery -A tasks batch ...` end to end, as an operator runs it."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.batch.conftest import expected_aggregate, make_rows, write_csv
from tests.infra import ROOT, WorkerProcess

pytestmark = pytest.mark.integration


def celery_batch(
    broker_url: str, result_backend: str, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    celery = str(Path(sys.executable).with_name("celery"))
    env = {**os.environ, "CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": result_backend}
    return subprocess.run(
        [celery, "-A", "tasks", "batch", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit_and_check(
    rows_count: int, tmp_path: Path, broker_url: str, result_backend: str, chunk_size: int
) -> None:
    # Given a CSV of records
    rows = make_rows(rows_count, seed=rows_count)
    path = write_csv(tmp_path / "records.csv", rows)

    # When it is submitted from the command line and waited for
    done = celery_batch(
        broker_url, result_backend, "submit", "aggregate", str(path),
        "--chunk-size", str(chunk_size), "--wait",
    )  # fmt: skip

    # Then the command shows progress and ends with the exact aggregate
    assert done.returncode == 0, done.stderr
    assert f"{rows_count}/{rows_count} completed" in done.stderr, done.stderr
    assert "state: completed" in done.stdout
    batch_id = done.stdout.split()[1]

    # And `status --json` reports the same
    status = celery_batch(broker_url, result_backend, "status", batch_id, "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["state"] == "completed"
    assert report["succeeded"] == rows_count and report["failed"] == 0
    assert report["result"] == expected_aggregate(rows)


def test_submit_wait_shows_progress_and_status_json_reports_the_exact_aggregate(
    batch_worker: WorkerProcess, tmp_path: Path, broker_url: str, result_backend: str
) -> None:
    submit_and_check(3_000, tmp_path, broker_url, result_backend, chunk_size=250)


@pytest.mark.slow
def test_a_100000_row_csv_submitted_from_the_command_line_ends_exact(
    batch_worker: WorkerProcess, tmp_path: Path, broker_url: str, result_backend: str
) -> None:
    submit_and_check(100_000, tmp_path, broker_url, result_backend, chunk_size=1_000)


def test_failures_cancel_and_retry_answer_in_json(
    batch_worker: WorkerProcess, tmp_path: Path, broker_url: str, result_backend: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("key,value\na,1\na,x\n")
    submitted = celery_batch(
        broker_url, result_backend, "submit", "aggregate", str(path), "--wait", "--json"
    )
    assert submitted.returncode == 1  # the batch ended with failures
    batch_id = json.loads(submitted.stdout)["id"]

    failures = json.loads(
        celery_batch(broker_url, result_backend, "failures", batch_id, "--json").stdout
    )
    assert [(f["line"], f["item"]) for f in failures] == [(3, {"key": "a", "value": "x"})]

    cancelled = celery_batch(broker_url, result_backend, "cancel", batch_id, "--json")
    assert json.loads(cancelled.stdout) == {"id": batch_id, "cancelled": False}

    retried = celery_batch(broker_url, result_backend, "retry", batch_id, "--json")
    assert json.loads(retried.stdout) == {"id": batch_id, "retried": 1}

    unknown = celery_batch(broker_url, result_backend, "status", "no-such-batch", "--json")
    assert unknown.returncode == 1 and "no batch no-such-batch" in unknown.stderr

    missing = celery_batch(broker_url, result_backend, "submit", "nope", str(path))
    assert missing.returncode == 2 and "unknown batch handler 'nope'" in missing.stderr


def test_submit_wait_draws_a_progress_bar_on_a_terminal(
    batch_worker: WorkerProcess, tmp_path: Path, broker_url: str, result_backend: str
) -> None:
    # Given a terminal on stderr (a pseudo-terminal the test reads)
    path = write_csv(tmp_path / "records.csv", make_rows(2_000, seed=2))
    controller, terminal = pty.openpty()
    celery = str(Path(sys.executable).with_name("celery"))
    env = {**os.environ, "CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": result_backend}
    argv = [celery, "-A", "tasks", "batch", "submit", "aggregate", str(path), "--wait"]
    argv += ["--chunk-size", "100"]
    with subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=terminal, text=True
    ) as process:
        os.close(terminal)
        stdout, _ = process.communicate(timeout=120)
    drawn = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the terminal's last writer is gone and everything was read
            break
        if not chunk:
            break
        drawn += chunk
    os.close(controller)

    # Then the bar was drawn in place and reached the total; the result went to stdout
    assert process.returncode == 0
    assert b"2000/2000" in drawn and b"[" in drawn and b"#" in drawn, drawn[-400:]
    assert "state: completed" in stdout
