"""`celery -A tasks batch ...` end to end, as an operator runs it."""

from __future__ import annotations

import csv
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.batch import api
from tests.batch.conftest import expected_aggregate, make_rows, write_csv
from tests.infra import ROOT, WorkerProcess, wait_for

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

    # 'x' is not a number: an input error, which a retry re-runs only when asked to
    refused = celery_batch(broker_url, result_backend, "retry", batch_id, "--json")
    assert refused.returncode == 2 and "--include-input-errors" in refused.stderr
    retried = celery_batch(
        broker_url, result_backend, "retry", batch_id, "--json", "--include-input-errors"
    )
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


def test_submit_json_without_wait_answers_with_the_id_at_once(
    batch_worker: WorkerProcess, tmp_path: Path, broker_url: str, result_backend: str
) -> None:
    rows = make_rows(500, seed=17)
    path = write_csv(tmp_path / "records.csv", rows)

    submitted = celery_batch(broker_url, result_backend, "submit", "aggregate", str(path), "--json")

    assert submitted.returncode == 0, submitted.stderr
    answer = json.loads(submitted.stdout)
    assert list(answer) == ["id"]
    final = api.wait(answer["id"], timeout=60)
    assert final.state == "completed" and final.result == expected_aggregate(rows)


def test_cancel_json_on_a_running_batch_cancels_it(
    batch_worker: WorkerProcess, broker_url: str, result_backend: str
) -> None:
    # Given a slow batch under way
    rows = make_rows(2_000, seed=19)
    batch_id = api.submit("tests.slow_aggregate", rows, chunk_size=20, options={"delay": 0.01})
    wait_for(lambda: api.status(batch_id).succeeded >= 40, 60, what="the batch to start")

    # When it is cancelled from the command line
    cancelled = celery_batch(broker_url, result_backend, "cancel", batch_id, "--json")

    # Then the answer says so, and so does its status
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout) == {"id": batch_id, "cancelled": True}
    status = json.loads(
        celery_batch(broker_url, result_backend, "status", batch_id, "--json").stdout
    )
    assert status["state"] == "cancelled" and status["succeeded"] < 2_000
    wait_for(
        lambda: (s := api.status(batch_id)).succeeded + s.failed + s.skipped == s.total,
        30,
        what="the skipped chunks to drain",
    )


def test_a_submit_whose_publishing_fails_exits_1_and_status_shows_why(
    batch_worker: WorkerProcess, tmp_path: Path, broker_url: str, result_backend: str
) -> None:
    # Given a JSONL file whose third chunk of 100 lines is too big for one message
    path = tmp_path / "events.jsonl"
    small = [json.dumps({"key": "k", "value": n}) for n in range(200)]
    large = [json.dumps({"key": "k", "value": 1, "pad": "x" * 20_000})] * 100
    path.write_text("\n".join(small + large) + "\n")

    submitted = celery_batch(
        broker_url, result_backend, "submit", "aggregate", str(path),
        "--chunk-size", "100", "--json",
    )  # fmt: skip

    # Then it exits 1, names the batch and the reason, and the batch records both
    assert submitted.returncode == 1, submitted.stderr
    report = json.loads(submitted.stdout)
    assert report["state"] == "publish_failed"
    assert f"batch {report['id']} failed to publish" in submitted.stderr
    assert "chunk 2 (100 items) encodes to" in submitted.stderr
    status = celery_batch(broker_url, result_backend, "status", report["id"])
    assert "state: publish_failed" in status.stdout
    assert "error: after 2 chunk(s) (200 items) were published" in status.stdout
    assert "conveyor_max_argument_bytes" in status.stdout


#: The README's batch example, as written there.
README_EXAMPLE = (
    "celery -A tasks batch submit aggregate examples/sales.csv --chunk-size 1000 --wait"
)


def test_the_readme_example_aggregates_the_shipped_sample_by_region(
    batch_worker: WorkerProcess, broker_url: str, result_backend: str
) -> None:
    assert README_EXAMPLE in (ROOT / "README.md").read_text()
    with (ROOT / "examples" / "sales.csv").open(newline="") as sample:
        rows = [{"key": r["region"], "value": r["amount"]} for r in csv.DictReader(sample)]

    done = celery_batch(broker_url, result_backend, *README_EXAMPLE.split()[4:], "--json")

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["state"], report["succeeded"], report["failed"]) == ("completed", 1000, 0)
    assert report["result"] == expected_aggregate(rows)


def test_an_option_naming_a_missing_column_exits_2_before_anything_is_published(
    batch_worker: WorkerProcess, broker_url: str, result_backend: str
) -> None:
    before = api.count_batches()

    typo = celery_batch(
        broker_url, result_backend, "submit", "aggregate", "examples/sales.csv",
        "-o", "key_field=regoin",
    )  # fmt: skip

    assert typo.returncode == 2, typo.stderr
    assert "unknown field 'regoin' (option key_field)" in typo.stderr
    assert "columns are: region, amount" in typo.stderr
    assert api.count_batches() == before


def test_failures_are_shown_a_page_at_a_time_with_the_total(
    batch_worker: WorkerProcess, tmp_path: Path, broker_url: str, result_backend: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("key,value\n" + "a,x\n" * 120)
    submitted = celery_batch(broker_url, result_backend, "submit", "aggregate", str(path), "--wait")
    batch_id = submitted.stdout.split()[1]

    first = celery_batch(broker_url, result_backend, "failures", batch_id).stdout.splitlines()
    last = celery_batch(
        broker_url, result_backend, "failures", batch_id, "--limit", "10", "--offset", "115"
    ).stdout.splitlines()

    assert len(first) == 51 and first[0].startswith("item 0 (line 2): field 'value'")
    assert first[-1] == "failed items 1-50 of 120; --offset 50 for more"
    assert [line.split()[1] for line in last[:-1]] == ["115", "116", "117", "118", "119"]
    assert last[-1] == "failed items 116-120 of 120"
