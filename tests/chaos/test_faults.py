"""The fault matrix F1-F13 of RELIABILITY.md, each a scenario on the chaos ledger.

Default run: a small but real version of each (a few hundred tasks, faults repeated during
the load). `pytest -m slow tests/chaos` runs the full size (thousands of tasks per scenario).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded

from tests import worker_tasks
from tests.chaos.conftest import CHAOS_CONSUMER_TIMEOUT_MS, Chaos, restart
from tests.chaos.harness import (
    Producer,
    assert_invariants,
    check,
    dead_lettered_ids,
    publish_bound,
)
from tests.infra import RedisServer, child_pids, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

#: Tasks per scenario in the default run and in the full (slow) run.
TASKS = {"small": 120, "full": 2000}
#: Faults injected during the load, per scenario: (small, full).
FAULTS = {"F1": (4, 12), "F3": (2, 5), "F6": (2, 4), "F7": (1, 3), "F8": (3, 8), "F9": (1, 2)}
FAULTS["F10"] = (1, 3)


def sized(size: str, row: str) -> tuple[int, int]:
    small, full = FAULTS[row]
    return TASKS[size], small if size == "small" else full


def size_params() -> list[Any]:
    return [
        pytest.param("small", id="small"),
        pytest.param("full", id="full", marks=pytest.mark.slow),
    ]


def work(seconds: float) -> Any:
    return lambda i: (seconds,)


def repeat(times: int, every: float, action: Any, producer: Producer) -> int:
    """Inject `action` `times` times, `every` seconds apart, while the producer is publishing."""
    done = 0
    for _ in range(times):
        time.sleep(every)
        action()
        done += 1
    return done


def effects_once(ledger: redis.Redis, producer: Producer) -> None:
    """Every idempotent effect of the run happened exactly once."""
    effects = {k: int(v) for k, v in ledger.hgetall("effects").items()}
    assert len(effects) == producer.count, f"{producer.count - len(effects)} effects missing"
    repeated = {k: v for k, v in effects.items() if v != 1}
    assert not repeated, f"duplicate effects: {repeated}"


def idempotent_args(run: str, seconds: float = 0.05) -> Any:
    # A key of this run only: a later run of the same scenario must not find its effects
    # "already done" (the markers live beside the ledger, which a test may not flush).
    run = f"{run}-{uuid.uuid4().hex[:8]}"
    return lambda i: (f"{run}-{i}", seconds)


@pytest.mark.parametrize("size", size_params())
def test_f1_killed_pool_processes_lose_no_task_and_duplicate_at_most_once_per_kill(
    size: str,
    chaos: Chaos,
) -> None:
    # Given a worker running idempotent tasks
    tasks, faults = sized(size, "F1")
    worker = chaos.start_worker("f1", concurrency=2)
    started = time.monotonic()
    producer = Producer(
        worker_tasks.idempotent_effect, tasks, idempotent_args("f1"), spread=max(4.0, tasks * 0.015)
    ).start()

    # When pool processes are SIGKILLed again and again during the load
    def kill_a_child() -> None:
        assert worker.process is not None
        os.kill(random.choice(child_pids(worker.process.pid)), signal.SIGKILL)

    kills = repeat(faults, producer.spread / (faults + 1), kill_a_child, producer)
    producer.join()

    # Then nothing is lost, each kill repeats at most one task, and no effect repeats
    outcome = check(
        f"F1 pool child SIGKILL ({size})",
        producer,
        chaos.ledger,
        chaos.rabbit,
        faults=kills,
        duplicate_bound=kills,
        started=started,
    )
    assert_invariants(outcome, producer)
    effects_once(chaos.ledger, producer)


def test_f2_a_task_that_always_kills_its_process_is_dead_lettered_while_others_flow(
    chaos: Chaos,
) -> None:
    worker = chaos.start_worker("f2", concurrency=2)
    started = time.monotonic()
    # Given a poison task among ordinary ones
    poison = worker_tasks.poison.delay()
    producer = Producer(worker_tasks.chaos_work, 30, work(0.05), spread=3).start().join()

    # Then the ordinary ones all run, and the poison lands in the dead-letter queue
    outcome = check(
        "F2 poison task (os._exit)",
        producer,
        chaos.ledger,
        chaos.rabbit,
        faults=1,
        duplicate_bound=2,
        started=started,
    )
    assert_invariants(outcome, producer)
    wait_for(
        lambda: poison.id in dead_lettered_ids(chaos.rabbit), 90, 1, "the poison's dead letter"
    )
    from kombu import Connection

    from tasks.deadletter import store

    with Connection(chaos.rabbit.url) as connection:
        entry = store.find(connection, "conveyor.dead_letter", poison.id)
    assert entry is not None
    assert entry.reason == "delivery_limit"
    assert entry.queue == "default"
    assert entry.task == "tests.poison"
    # ... after the delivery limit (10), not forever: quorum queues dead-letter past the limit
    assert 10 <= int(chaos.ledger.get("poison:runs") or 0) <= 11
    assert worker.process is not None and worker.process.poll() is None


@pytest.mark.parametrize("size", size_params())
def test_f3_a_killed_worker_loses_no_task_once_restarted(
    size: str,
    chaos: Chaos,
) -> None:
    tasks, faults = sized(size, "F3")
    concurrency = 2
    worker = chaos.start_worker("f3", concurrency=concurrency)
    started = time.monotonic()
    producer = Producer(
        worker_tasks.idempotent_effect, tasks, idempotent_args("f3"), spread=max(4.0, tasks * 0.015)
    ).start()

    # When the whole worker is SIGKILLed, as a node crash would, and started again
    def kill_and_restart() -> None:
        worker.kill_group()
        restart(worker)

    kills = repeat(faults, producer.spread / (faults + 1), kill_and_restart, producer)
    producer.join()
    outcome = check(
        f"F3 worker SIGKILL + restart ({size})",
        producer,
        chaos.ledger,
        chaos.rabbit,
        faults=kills,
        duplicate_bound=kills * concurrency,
        started=started,
    )
    assert_invariants(outcome, producer)
    effects_once(chaos.ledger, producer)


def test_f4_a_warm_shutdown_finishes_running_tasks_and_duplicates_none(
    chaos: Chaos,
) -> None:
    worker = chaos.start_worker("f4", concurrency=2)
    started = time.monotonic()
    producer = Producer(worker_tasks.chaos_work, 40, work(0.5), spread=6).start()

    def warm_restart() -> None:
        worker.stop(timeout=60)
        restart(worker)

    stops = repeat(2, 2, warm_restart, producer)
    producer.join()
    outcome = check(
        "F4 warm shutdown (SIGTERM)",
        producer,
        chaos.ledger,
        chaos.rabbit,
        faults=stops,
        duplicate_bound=0,
        started=started,
    )
    assert_invariants(outcome, producer)
    assert "Warm" in worker.log()


def test_f5_a_cold_shutdown_lets_short_tasks_finish_and_requeues_long_ones(
    chaos: Chaos,
) -> None:
    concurrency = 2
    # Given a soft-shutdown window of 2 s, short tasks (0.2 s) and long ones (6 s)
    worker = chaos.start_worker(
        "f5", concurrency=concurrency, env={"CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT": "2"}
    )
    started = time.monotonic()
    producer = Producer(
        worker_tasks.chaos_work, 30, lambda i: (4.0 if i % 5 == 0 else 0.2,), spread=5
    ).start()

    # When SIGQUIT asks for a cold shutdown, twice during the load
    def cold_restart() -> None:
        assert worker.process is not None
        worker.signal(signal.SIGQUIT)
        worker.process.wait(60)
        restart(worker)

    stops = repeat(1, 2.5, cold_restart, producer)
    producer.join()

    # Then nothing is lost; only tasks cut off by the window run again
    outcome = check(
        "F5 soft/cold shutdown (SIGQUIT, 2 s window)",
        producer,
        chaos.ledger,
        chaos.rabbit,
        faults=stops,
        duplicate_bound=stops * concurrency,
        started=started,
    )
    assert_invariants(outcome, producer)


def _broker_fault_scenario(
    name: str,
    size: str,
    fault: Any,
    chaos: Chaos,
    *,
    every: float | None = None,
) -> Any:
    tasks, faults = sized(size, name.split()[0])
    concurrency = 2
    worker = chaos.start_worker(name.split()[0].lower(), concurrency=concurrency)
    started = time.monotonic()
    # Idempotent tasks: a re-published id and a redelivery both run again, and the effect
    # must still happen once.
    producer = Producer(
        worker_tasks.idempotent_effect,
        tasks,
        idempotent_args(name.split()[0].lower(), 0.02),
        spread=max(4.0, tasks * 0.015),
    ).start()
    count = repeat(faults, every or producer.spread / (faults + 1), fault, producer)
    producer.join()
    outcome = check(
        f"{name} ({size})",
        producer,
        chaos.ledger,
        chaos.rabbit,
        faults=count,
        duplicate_bound=count * concurrency,
        started=started,
        timeout=180,
    )
    assert_invariants(outcome, producer)
    effects_once(chaos.ledger, producer)
    # The same worker process reconnected by itself: no restart by the test
    assert worker.process is not None and worker.process.poll() is None
    return outcome, producer, worker


@pytest.mark.parametrize("size", size_params())
def test_f6_a_broker_graceful_restart_loses_no_confirmed_task(
    size: str,
    chaos: Chaos,
) -> None:
    def stop_start() -> None:
        chaos.rabbit.stop_app()
        time.sleep(2)
        chaos.rabbit.start_app()

    _broker_fault_scenario(
        "F6 broker stop_app/start_app",
        size,
        stop_start,
        chaos,
    )


@pytest.mark.parametrize("size", size_params())
def test_f7_a_crashed_broker_keeps_every_confirmed_task(
    size: str,
    chaos: Chaos,
) -> None:
    def crash_restart() -> None:
        chaos.rabbit.kill9()
        chaos.rabbit.restart()

    _broker_fault_scenario(
        "F7 broker kill -9 + restart",
        size,
        crash_restart,
        chaos,
    )


@pytest.mark.parametrize("size", size_params())
def test_f8_dropped_connections_reconnect_without_loss(
    size: str,
    chaos: Chaos,
) -> None:
    _broker_fault_scenario(
        "F8 close_all_connections",
        size,
        chaos.rabbit.close_all_connections,
        chaos,
    )


@pytest.mark.parametrize(
    ("size", "frozen"),
    [
        pytest.param("small", 12.0, id="small"),
        pytest.param("full", 30.0, id="full", marks=pytest.mark.slow),
    ],
)
def test_f9_a_frozen_broker_makes_producers_time_out_not_hang(
    size: str,
    frozen: float,
    chaos: Chaos,
) -> None:
    def freeze() -> None:
        pid = chaos.rabbit.freeze()
        try:
            time.sleep(frozen)
        finally:
            chaos.rabbit.thaw(pid)

    _, producer, _ = _broker_fault_scenario(
        "F9 broker SIGSTOP",
        size,
        freeze,
        chaos,
    )
    # No publish waited past the bound its settings imply (55 s with the defaults).
    assert producer.slowest_publish < publish_bound(chaos.app), producer.slowest_publish


@pytest.mark.parametrize("size", size_params())
def test_f10_a_memory_alarm_fails_publishers_clearly_and_loses_nothing(
    size: str,
    chaos: Chaos,
) -> None:
    def alarm() -> None:
        chaos.rabbit.set_memory_watermark(0)
        try:
            time.sleep(12)
        finally:
            chaos.rabbit.set_memory_watermark(0.4)

    _, producer, _ = _broker_fault_scenario(
        "F10 memory alarm",
        size,
        alarm,
        chaos,
    )
    assert producer.slowest_publish < publish_bound(chaos.app), producer.slowest_publish


def test_f11_with_redis_frozen_tasks_complete_and_results_are_stored_after_recovery(
    chaos: Chaos, tmp_path: Path
) -> None:
    # Given workers whose result backend is a Redis the test can freeze
    backend = RedisServer(tmp_path / "results").start()
    try:
        chaos.start_worker("f11", concurrency=2, backend=f"{backend.url}/0")
        started = time.monotonic()
        producer = Producer(worker_tasks.chaos_work, 60, work(0.05), spread=4).start()

        # When Redis stops answering for 8 s during the load
        time.sleep(1)
        backend.freeze()
        time.sleep(8)
        backend.thaw()
        producer.join()

        # Then every task ran, and every result is stored: none silently missing
        outcome = check(
            "F11 result Redis SIGSTOP 8 s",
            producer,
            chaos.ledger,
            chaos.rabbit,
            faults=1,
            duplicate_bound=2,
            started=started,
        )
        assert_invariants(outcome, producer)
        results = redis.Redis.from_url(f"{backend.url}/0", decode_responses=True)

        def stored() -> list[str]:
            metas = results.mget([f"celery-task-meta-{i}" for i in producer.ok])
            return [m for m in metas if m and json.loads(m)["status"] == "SUCCESS"]

        wait_for(lambda: len(stored()) == len(producer.ok), 60, 0.5, "every result stored")
        results.close()
    finally:
        backend.stop()


def test_f12_a_task_longer_than_the_consumer_timeout_is_stopped_by_its_time_limit(
    chaos: Chaos,
) -> None:
    # Given a worker whose time limits sit below the node's consumer_timeout, as in production
    # (27 min < 30 min), scaled down: 6 s soft, 8 s hard, against 20 s
    timeout_s = CHAOS_CONSUMER_TIMEOUT_MS / 1000
    # (the limits travel in the message, so the publisher's settings are the ones that apply).
    worker = chaos.start_worker("f12")
    assert worker.process is not None
    # When a task would run far longer than the consumer timeout
    result = worker_tasks.long_running.apply_async(
        (timeout_s * 5,), soft_time_limit=6, time_limit=8
    )

    # Then its time limit ends it (once: a timed-out task is not redelivered) ...
    with pytest.raises(SoftTimeLimitExceeded):
        result.get(timeout=timeout_s)
    assert chaos.ledger.hgetall("runs") == {result.id: "1"}
    # ... the broker never closes the channel, and the worker keeps working
    assert worker_tasks.add.delay(1, 2).get(timeout=20) == 3
    assert "PRECONDITION_FAILED" not in worker.log()
    assert worker.process.poll() is None
    wait_for(lambda: chaos.rabbit.message_counts()["default"] == 0, 10, 0.5, "the acks")


def test_f13_a_job_delayed_past_the_consumer_timeout_runs_on_time_without_a_worker_exit(
    chaos: Chaos,
) -> None:
    timeout_s = CHAOS_CONSUMER_TIMEOUT_MS / 1000
    worker = chaos.start_worker("f13")
    assert worker.process is not None
    # Given a job due after the node's consumer timeout
    delay = timeout_s + 4
    sent_at = time.time()
    result = worker_tasks.ran_at.apply_async(countdown=delay)

    # While it waits, the worker holds nothing (the broker keeps it)
    time.sleep(2)
    inspect = chaos.app.control.inspect(destination=[worker.node], timeout=5)
    assert inspect.reserved() == {worker.node: []}
    assert inspect.scheduled() == {worker.node: []}

    # Then it runs on time, and the worker never hit PRECONDITION_FAILED
    started = result.get(timeout=delay + 30)
    assert delay <= started - sent_at < delay + 3
    assert "PRECONDITION_FAILED" not in worker.log()
    assert worker.process.poll() is None
