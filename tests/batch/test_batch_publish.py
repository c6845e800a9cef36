"""The producer side with no worker running: input read lazily, a batch pending until a chunk
starts, and publishing that fails part-way ending the batch, against a real (private) RabbitMQ."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.publisher import ConfirmedPublisher
from tasks.batch import api, runner
from tasks.batch.store import store_for
from tests.infra import ROOT, RabbitNode, require

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def no_worker(rabbit: RabbitNode, broker_url: str, batch_app: Any) -> Iterator[RabbitNode]:
    """The private broker, with nothing consuming the batch queue; its chunks are purged after,
    so that no later test's worker runs them."""
    require(broker_url == rabbit.url, "needs the private RabbitMQ node (CELERY_BROKER_URL is set)")
    yield rabbit
    if "batch" in rabbit.queues():
        rabbit.ctl("purge_queue", "batch")


def test_input_is_read_one_chunk_at_a_time_and_the_batch_is_pending_until_a_chunk_starts(
    no_worker: RabbitNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a generator that notes, for every item it yields, how far it is ahead of the
    # chunks already handed to the (real) publisher
    size, chunks = 100, 30
    handed: list[int] = []
    real_send = ConfirmedPublisher.send

    def counted_send(self: ConfirmedPublisher, *args: Any, **kwargs: Any) -> None:
        real_send(self, *args, **kwargs)
        handed.append(1)

    monkeypatch.setattr(ConfirmedPublisher, "send", counted_send)
    ahead: list[int] = []

    def items() -> Iterator[int]:
        for n in range(size * chunks):
            ahead.append(n - len(handed) * size)
            yield n

    # When it is submitted
    batch_id = api.submit("noop", items(), chunk_size=size)

    # Then it was never read beyond the chunk being built
    assert len(ahead) == size * chunks and len(handed) == chunks
    assert max(ahead) == size - 1
    # And with no worker running, the batch is pending: fully published, nothing started
    status = api.status(batch_id)
    assert status.state == "pending"
    assert (status.published, status.total, status.pending) == (True, size * chunks, size * chunks)
    assert status.started_at is None and status.succeeded == 0


def test_a_first_chunk_over_the_message_limit_is_refused_before_any_batch_exists(
    no_worker: RabbitNode, batch_app: Any
) -> None:
    store = store_for(batch_app)
    before = set(store.redis.scan_iter(match="conveyor:batch:*"))
    big = ["x" * 150_000] * 10  # about 1.5 MB a chunk of 10; the limit is 1,000,000 bytes

    with pytest.raises(api.ArgumentsTooLarge) as refused:
        api.submit("noop", iter(big), chunk_size=10)

    message = str(refused.value)
    assert re.search(r"chunk 0 \(10 items\) encodes to 150\d{4} bytes", message), message
    assert "limit of 1000000 bytes" in message and "conveyor_max_argument_bytes" in message
    assert set(store.redis.scan_iter(match="conveyor:batch:*")) == before


def test_a_later_chunk_over_the_message_limit_ends_the_batch_publish_failed(
    no_worker: RabbitNode, batch_app: Any
) -> None:
    # Given items whose fourth chunk of 10 is too big for one message
    items = [f"small {n}" for n in range(30)] + ["x" * 150_000] * 10

    with pytest.raises(api.PublishFailed) as failed:
        api.submit("noop", iter(items), chunk_size=10)

    # Then the batch ends publish_failed, saying why, with what was published as its total
    status = api.status(failed.value.batch_id)
    assert status.state == "publish_failed" and status.finished_at
    assert status.error is not None
    assert status.error.startswith("after 3 chunk(s) (30 items) were published: ArgumentsTooLarge")
    assert "chunk 3 (10 items) encodes to" in status.error
    assert "conveyor_max_argument_bytes" in status.error
    assert (status.total, status.published) == (30, False)
    assert isinstance(failed.value.__cause__, api.ArgumentsTooLarge)
    # And a worker that takes one of its published chunks skips it, like a cancelled batch's
    store = store_for(batch_app)
    outcome = runner.run_chunk(store, status.id, 1, 0, 0, items[:10])
    assert (outcome.skipped, outcome.ready) == (10, False)
    assert api.status(status.id).skipped == 10
    assert api.cancel(status.id) is False  # already finished


def test_a_connection_the_broker_closes_mid_publish_ends_the_batch_publish_failed(
    no_worker: RabbitNode,
) -> None:
    # Given an input during whose reading the broker closes every connection (as when it is
    # restarted, or an operator forces them closed)
    def items() -> Iterator[int]:
        for n in range(20):
            if n == 5:
                no_worker.ctl("close_all_connections", "closed by the test")
            yield n

    # When it is submitted in chunks of 1
    with pytest.raises(api.PublishFailed) as failed:
        api.submit("noop", items(), chunk_size=1)

    # Then the lost connection ends the batch, with the reason
    status = api.status(failed.value.batch_id)
    assert status.state == "publish_failed" and not status.published
    assert status.error is not None and status.error.startswith("after ")
    assert 5 <= status.total < 20
    assert failed.value.reason == status.error


def test_submit_prints_the_batch_id_before_it_has_published_the_input(
    no_worker: RabbitNode, tmp_path: Path, broker_url: str, result_backend: str
) -> None:
    # Given an input that takes a while to publish (20,000 chunks of one row)
    path = tmp_path / "many.csv"
    path.write_text("key,value\n" + "".join(f"k,{n}\n" for n in range(20_000)))
    celery = str(Path(sys.executable).with_name("celery"))
    env = {**os.environ, "CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": result_backend}
    argv = [celery, "-A", "tasks", "batch", "submit", "noop", str(path), "--chunk-size", "1"]
    with subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        # When its first line of output arrives
        assert process.stdout is not None
        batch_id = process.stdout.readline().strip()

        # Then it is the batch's id while publishing is still under way, so it can be cancelled
        status = api.status(batch_id)
        assert not status.published and status.state == "pending", status
        assert api.cancel(batch_id) is True
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert api.status(batch_id).total < 20_000  # the publisher stopped at the cancel


def test_validating_a_write_files_batch_creates_no_directory_on_the_producer(
    no_worker: RabbitNode, tmp_path: Path
) -> None:
    target = tmp_path / "out"
    batch_id = api.submit("write_files", [{"n": 1}], options={"directory": str(target)})
    assert api.status(batch_id).total == 1
    assert not target.exists()  # only a worker, which writes the files, creates it
    api.cancel(batch_id)
