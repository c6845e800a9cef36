"""The fault matrix F1-F13 of RELIABILITY.md, each a scenario on the chaos ledger.

Default run: a small but real version of each (a few hundred tasks, faults repeated during
the load). `pytest -m slow tests/chaos` runs the full size (thousands of tasks per scenario).
"""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import pytest
import redis

from tests import worker_tasks
from tests.chaos.conftest import WorkerFactory, restart
from tests.chaos.harness import Producer, assert_invariants, check, dead_lettered_ids
from tests.infra import ChaosRabbitNode, child_pids, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

#: (tasks, faults) per scenario for the default run and the full (slow) run.
SIZES = {"small": (200, 3), "full": (3000, 8)}


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


def idempotent_args(run: str) -> Any:
    return lambda i: (f"{run}-{i}", 0.05)


@pytest.mark.parametrize("size", size_params())
def test_f1_killed_pool_processes_lose_no_task_and_duplicate_at_most_once_per_kill(
    size: str,
    chaos_app: Any,
    chaos_ledger: redis.Redis,
    chaos_rabbit: ChaosRabbitNode,
    start_worker: WorkerFactory,
) -> None:
    # Given a worker running idempotent tasks
    tasks, faults = SIZES[size]
    worker = start_worker("f1", concurrency=2)
    started = time.monotonic()
    producer = Producer(
        worker_tasks.idempotent_effect, tasks, idempotent_args("f1"), spread=tasks * 0.02
    ).start()

    # When pool processes are SIGKILLed again and again during the load
    def kill_a_child() -> None:
        assert worker.process is not None
        os.kill(random.choice(child_pids(worker.process.pid)), signal.SIGKILL)

    kills = repeat(faults * 2, producer.spread / (faults * 2 + 1), kill_a_child, producer)
    producer.join()

    # Then nothing is lost, each kill repeats at most one task, and no effect repeats
    outcome = check(
        f"F1 pool child SIGKILL ({size})",
        producer,
        chaos_ledger,
        chaos_rabbit,
        faults=kills,
        duplicate_bound=kills,
        started=started,
    )
    assert_invariants(outcome, producer)
    effects_once(chaos_ledger, producer)


def test_f2_a_task_that_always_kills_its_process_is_dead_lettered_while_others_flow(
    chaos_app: Any,
    chaos_ledger: redis.Redis,
    chaos_rabbit: ChaosRabbitNode,
    start_worker: WorkerFactory,
) -> None:
    worker = start_worker("f2", concurrency=2)
    started = time.monotonic()
    # Given a poison task among ordinary ones
    poison = worker_tasks.poison.delay()
    producer = Producer(worker_tasks.chaos_work, 60, work(0.05), spread=4).start().join()

    # Then the ordinary ones all run, and the poison lands in the dead-letter queue
    outcome = check(
        "F2 poison task (os._exit)",
        producer,
        chaos_ledger,
        chaos_rabbit,
        faults=1,
        duplicate_bound=2,
        started=started,
    )
    assert_invariants(outcome, producer)
    wait_for(
        lambda: poison.id in dead_lettered_ids(chaos_rabbit), 90, 1, "the poison's dead letter"
    )
    from kombu import Connection

    from tasks.deadletter import store

    with Connection(chaos_rabbit.url) as connection:
        entry = store.find(connection, "conveyor.dead_letter", poison.id)
    assert entry is not None
    assert entry.reason == "delivery_limit"
    assert entry.queue == "default"
    assert entry.task == "tests.poison"
    # ... after the delivery limit (10), not forever: quorum queues dead-letter past the limit
    assert 10 <= int(chaos_ledger.get("poison:runs") or 0) <= 11
    assert worker.process is not None and worker.process.poll() is None


@pytest.mark.parametrize("size", size_params())
def test_f3_a_killed_worker_loses_no_task_once_restarted(
    size: str,
    chaos_app: Any,
    chaos_ledger: redis.Redis,
    chaos_rabbit: ChaosRabbitNode,
    start_worker: WorkerFactory,
) -> None:
    tasks, faults = SIZES[size]
    concurrency = 2
    worker = start_worker("f3", concurrency=concurrency)
    started = time.monotonic()
    producer = Producer(
        worker_tasks.idempotent_effect, tasks, idempotent_args("f3"), spread=tasks * 0.02
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
        chaos_ledger,
        chaos_rabbit,
        faults=kills,
        duplicate_bound=kills * concurrency,
        started=started,
    )
    assert_invariants(outcome, producer)
    effects_once(chaos_ledger, producer)


def test_f4_a_warm_shutdown_finishes_running_tasks_and_duplicates_none(
    chaos_app: Any,
    chaos_ledger: redis.Redis,
    chaos_rabbit: ChaosRabbitNode,
    start_worker: WorkerFactory,
) -> None:
    worker = start_worker("f4", concurrency=2)
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
        chaos_ledger,
        chaos_rabbit,
        faults=stops,
        duplicate_bound=0,
        started=started,
    )
    assert_invariants(outcome, producer)
    assert "Warm" in worker.log()


def test_f5_a_cold_shutdown_lets_short_tasks_finish_and_requeues_long_ones(
    chaos_app: Any,
    chaos_ledger: redis.Redis,
    chaos_rabbit: ChaosRabbitNode,
    start_worker: WorkerFactory,
) -> None:
    concurrency = 2
    # Given a soft-shutdown window of 2 s, short tasks (0.2 s) and long ones (6 s)
    worker = start_worker(
        "f5", concurrency=concurrency, env={"CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT": "2"}
    )
    started = time.monotonic()
    producer = Producer(
        worker_tasks.chaos_work, 30, lambda i: (6.0 if i % 5 == 0 else 0.2,), spread=5
    ).start()

    # When SIGQUIT asks for a cold shutdown, twice during the load
    def cold_restart() -> None:
        assert worker.process is not None
        worker.signal(signal.SIGQUIT)
        worker.process.wait(60)
        restart(worker)

    stops = repeat(2, 2.5, cold_restart, producer)
    producer.join()

    # Then nothing is lost; only tasks cut off by the window run again
    outcome = check(
        "F5 soft/cold shutdown (SIGQUIT, 2 s window)",
        producer,
        chaos_ledger,
        chaos_rabbit,
        faults=stops,
        duplicate_bound=stops * concurrency,
        started=started,
    )
    assert_invariants(outcome, producer)


def _broker_fault_scenario(
    name: str,
    size: str,
    fault: Any,
    *,
    chaos_ledger: redis.Redis,
    chaos_rabbit: ChaosRabbitNode,
    start_worker: WorkerFactory,
    every: float | None = None,
) -> Any:
    tasks, faults = SIZES[size]
    concurrency = 2
    worker = start_worker(name.split()[0].lower(), concurrency=concurrency)
    started = time.monotonic()
    producer = Producer(worker_tasks.chaos_work, tasks, work(0.02), spread=tasks * 0.03).start()
    count = repeat(faults, every or producer.spread / (faults + 1), fault, producer)
    producer.join()
    outcome = check(
        f"{name} ({size})",
        producer,
        chaos_ledger,
        chaos_rabbit,
        faults=count,
        duplicate_bound=count * concurrency,
        started=started,
        timeout=180,
    )
    assert_invariants(outcome, producer)
    # The same worker process reconnected by itself: no restart by the test
    assert worker.process is not None and worker.process.poll() is None
    return outcome, producer, worker


@pytest.mark.parametrize("size", size_params())
def test_f6_a_broker_graceful_restart_loses_no_confirmed_task(
    size: str,
    chaos_app: Any,
    chaos_ledger: redis.Redis,
    chaos_rabbit: ChaosRabbitNode,
    start_worker: WorkerFactory,
) -> None:
    def stop_start() -> None:
        chaos_rabbit.stop_app()
        time.sleep(2)
        chaos_rabbit.start_app()

    _broker_fault_scenario(
        "F6 broker stop_app/start_app",
        size,
        stop_start,
        chaos_ledger=chaos_ledger,
        chaos_rabbit=chaos_rabbit,
        start_worker=start_worker,
    )


@pytest.mark.parametrize("size", size_params())
def test_f7_a_crashed_broker_keeps_every_confirmed_task(
    size: str,
    chaos_app: Any,
    chaos_ledger: redis.Redis,
    chaos_rabbit: ChaosRabbitNode,
    start_worker: WorkerFactory,
) -> None:
    def crash_restart() -> None:
        chaos_rabbit.kill9()
        chaos_rabbit.restart()

    _broker_fault_scenario(
        "F7 broker kill -9 + restart",
        size,
        crash_restart,
        chaos_ledger=chaos_ledger,
        chaos_rabbit=chaos_rabbit,
        start_worker=start_worker,
    )


@pytest.mark.parametrize("size", size_params())
def test_f8_dropped_connections_reconnect_without_loss(
    size: str,
    chaos_app: Any,
    chaos_ledger: redis.Redis,
    chaos_rabbit: ChaosRabbitNode,
    start_worker: WorkerFactory,
) -> None:
    _broker_fault_scenario(
        "F8 close_all_connections",
        size,
        chaos_rabbit.close_all_connections,
        chaos_ledger=chaos_ledger,
        chaos_rabbit=chaos_rabbit,
        start_worker=start_worker,
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
    chaos_app: Any,
    chaos_ledger: redis.Redis,
    chaos_rabbit: ChaosRabbitNode,
    start_worker: WorkerFactory,
) -> None:
    def freeze() -> None:
        pid = chaos_rabbit.freeze()
        try:
            time.sleep(frozen)
        finally:
            chaos_rabbit.thaw(pid)

    _, producer, _ = _broker_fault_scenario(
        "F9 broker SIGSTOP",
        size,
        freeze,
        chaos_ledger=chaos_ledger,
        chaos_rabbit=chaos_rabbit,
        start_worker=start_worker,
    )
    # A publish never waited much longer than its timeouts (10 s socket + 10 s confirm).
    assert producer.slowest_publish < 25, producer.slowest_publish


@pytest.mark.parametrize("size", size_params())
def test_f10_a_memory_alarm_fails_publishers_clearly_and_loses_nothing(
    size: str,
    chaos_app: Any,
    chaos_ledger: redis.Redis,
    chaos_rabbit: ChaosRabbitNode,
    start_worker: WorkerFactory,
) -> None:
    def alarm() -> None:
        chaos_rabbit.set_memory_watermark(0)
        try:
            time.sleep(12)
        finally:
            chaos_rabbit.set_memory_watermark(0.4)

    _, producer, _ = _broker_fault_scenario(
        "F10 memory alarm",
        size,
        alarm,
        chaos_ledger=chaos_ledger,
        chaos_rabbit=chaos_rabbit,
        start_worker=start_worker,
    )
    assert producer.slowest_publish < 25, producer.slowest_publish
