"""tasks.outbox in the request: invalid tasks fail before any row is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from kombu import serialization
from kombu.utils.json import loads

from tasks import outbox
from tasks.base import ArgumentsTooLarge
from tasks.webhooks import deliver
from tests.infra import ROOT


class RecordingConnection:
    """A DB-API connection that records the statements it is given."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, dict[str, Any]]] = []

    def cursor(self) -> RecordingConnection:
        return self

    def __enter__(self) -> RecordingConnection:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def execute(self, sql: str, params: dict[str, Any]) -> None:
        self.statements.append((sql, params))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["http://x.example/", "e", {"blob": "x" * 2_000_000}], ArgumentsTooLarge),
        (["http://x.example/", "e", {"when": object()}], outbox.NotSerializable),
    ],
)
def test_invalid_arguments_fail_in_the_request_and_write_nothing(
    args: list[Any], error: type[Exception]
) -> None:
    connection = RecordingConnection()
    with pytest.raises(error):
        outbox.delay(connection, deliver, *args)
    assert isinstance(error(), ValueError)
    assert connection.statements == []


def test_an_unknown_queue_fails_in_the_request() -> None:
    connection = RecordingConnection()
    with pytest.raises(KeyError):
        outbox.apply_async(connection, deliver, ["http://x.example/", "e", {}], queue="typo")
    assert connection.statements == []


def test_a_row_holds_the_routed_queue_json_arguments_and_an_absolute_eta() -> None:
    connection = RecordingConnection()
    before = datetime.now(UTC)
    task_id = outbox.apply_async(
        connection,
        deliver,
        ["http://x.example/", "e"],
        {"payload": {"n": Decimal("1.5")}},
        countdown=30,
    )
    [(sql, params)] = connection.statements
    assert sql.startswith("INSERT INTO conveyor_outbox")
    assert params["task_id"] == task_id
    assert params["task_name"] == "webhooks.deliver"
    assert params["queue"] == "default"
    # The text Celery's json serializer would put in the message, types and all.
    assert params["args"] == serialization.dumps(["http://x.example/", "e"], "json")[2]
    assert loads(params["kwargs"]) == {"payload": {"n": Decimal("1.5")}}
    assert before + timedelta(seconds=30) <= params["eta"] <= datetime.now(UTC) + timedelta(30)


def test_an_eta_without_a_zone_is_utc() -> None:
    assert outbox.due_at(None, "2030-01-01T00:00:00", datetime.now(UTC)) == datetime(
        2030, 1, 1, tzinfo=UTC
    )


@pytest.mark.parametrize("url", ["", "postgresql://conveyor@db:5432/app"])
def test_the_exporter_and_the_overview_read_the_outbox_only_when_it_is_configured(
    url: str,
) -> None:
    code = (
        "import json, celeryconfig as c; "
        "print(json.dumps([c.conveyor_metrics_collectors, c.conveyor_overview_sections]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_OUTBOX_URL")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "CONVEYOR_OUTBOX_URL": url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    collectors, sections = json.loads(done.stdout)
    assert ("monitoring.outbox:collector" in collectors) is bool(url)
    assert ("monitoring.outbox:overview_section" in sections) is bool(url)
