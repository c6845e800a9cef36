"""The chaos ledger: publish with a record of what was confirmed, inject faults, drain, check.

- `Producer` publishes task ids from a thread. Each id is `ok` once apply_async returned, or
  `indeterminate` while it raised or timed out; an indeterminate id is re-published with the
  same id until it is ok, as a careful web app would.
- Each execution of a chaos task increments the id's counter in the ledger's `runs` hash
  (tests/worker_tasks.py, a Redis database the faults never touch).
- `check` waits until every ok id has run (or sits in the dead-letter queue) and the queues are
  empty, fails if they do not drain in time, then returns the counts: lost, duplicates,
  dead-lettered, and the time each heal took to show a task completing again.
- `assert_invariants` holds the run to the matrix: nothing lost, redeliveries within the bound,
  the dead-letter queue holding exactly the ids the scenario expects there (none, except F2's
  poison tasks), and every heal followed by a completed task within RECOVERY_SECONDS.

Duplicates are counted per publish, not per id. An indeterminate publish may well have reached
the queue before the connection died (AMQP gives no way to ask), so an id published k times
may run k times with no fault in the delivery path at all: those runs are expected and are
reported as `republish_duplicates`. So are runs of a retry the task published itself (an
idempotent task whose redelivered copy finds the first copy still holding the lease retries):
tests/worker_tasks.py records each in the ledger's `retried` hash. What the promise bounds
(`duplicates`, checked against `duplicate_bound`) is the runs beyond the publishes that the
broker flagged as redelivered: redeliveries of tasks in flight at a crash or connection loss.
Runs beyond the publishes that arrived unflagged are copies of a publish Celery retried inside
apply_async (`unrecorded_publish_duplicates`), reported beside them.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.infra import ChaosRabbitNode

#: Where each scenario's figures are appended (one JSON object per line) when set;
#: docs/reliability.md is built from this file (python -m tests.chaos.report).
REPORT_PATH = os.environ.get("CONVEYOR_CHAOS_REPORT")

#: Promise 5: workers consume again within this long of the broker or Redis coming back.
RECOVERY_SECONDS = 30.0
#: Promise 4: a publish returns or raises within this long, whatever the broker does. With the
#: defaults a publish waits at most conveyor_publish_timeout (10 s), then Celery's publish retry
#: reconnects up to 3 times, each bounded by broker_connection_timeout (4 s) plus at most 1 s
#: of interval: 25 s, and 10 s of margin for a loaded machine. A fixed target, not computed
#: from the settings, so that a slower setting or a hang past it fails the scenario.
PUBLISH_ANSWER_SECONDS = 35.0


@dataclass
class Producer:
    """Publishes `count` tasks over about `spread` seconds, re-publishing failed ids."""

    task: Any
    count: int
    args: Callable[[int], tuple[Any, ...]]
    spread: float = 5.0
    #: The first `burst` ids go out back to back (a backlog); the rest over `spread` seconds.
    burst: int = 0
    #: Gives up on an id after this long of failing publishes (the test then fails: a producer
    #: that cannot publish after the fault healed is a finding, not something to wait out).
    give_up_after: float = 180.0
    ok: list[str] = field(default_factory=list)
    indeterminate: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    slowest_publish: float = 0.0
    unpublished: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        return self

    def join(self, timeout: float = 300) -> Producer:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "producer still publishing"
        return self

    def finished(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    def probe(self) -> None:
        """Publish one more task after the run (count grows by one): a fault healed after the
        last publish still gets a task that starts after it, to show consuming resumed."""
        assert self.finished(), "probe only after the producer's own run"
        self._publish(self.count)
        self.count += 1

    def _run(self) -> None:
        pause = self.spread / max(self.count - self.burst, 1)
        for i in range(self.count):
            self._publish(i)
            if i >= self.burst:
                time.sleep(pause)

    def _publish(self, i: int) -> None:
        """Publish task `i` under a new id until it is confirmed or `give_up_after` passes."""
        task_id = str(uuid.uuid4())
        first_try = time.monotonic()
        while True:
            started = time.monotonic()
            try:
                self.task.apply_async(self.args(i), task_id=task_id)
            except Exception as exc:
                self.slowest_publish = max(self.slowest_publish, time.monotonic() - started)
                self.indeterminate[task_id] = self.indeterminate.get(task_id, 0) + 1
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if time.monotonic() - first_try > self.give_up_after:
                    self.unpublished.append(task_id)
                    return
                time.sleep(0.2)
                continue
            self.slowest_publish = max(self.slowest_publish, time.monotonic() - started)
            self.ok.append(task_id)
            return


@dataclass
class Outcome:
    scenario: str
    tasks: int
    confirmed: int
    republished: int
    lost: int
    #: Runs beyond the id's publishes: redeliveries, the quantity the promise bounds.
    duplicates: int
    duplicate_bound: int
    #: Runs explained by the producer re-publishing an indeterminate id or by the task
    #: publishing its own retry (at most one per such publish of that id).
    republish_duplicates: int
    dead_lettered: int
    faults: int
    seconds: float
    drain_seconds: float
    slowest_publish: float
    lost_ids: list[str]
    notes: str = ""
    #: Retries the tasks published themselves (Celery's task_retry signal).
    retried: int = 0
    #: Runs beyond the publishes that arrived as first deliveries (not flagged redelivered):
    #: a publish sent twice below the ledger (count_duplicates). Reported, not bounded; the
    #: idempotent effects still must happen once.
    unrecorded_publish_duplicates: int = 0
    #: Dead letters the scenario expects (F2's poison tasks), and ids found there otherwise.
    expected_dead: int = 0
    unexpected_dead_ids: list[str] = field(default_factory=list)
    missing_dead_ids: list[str] = field(default_factory=list)
    #: Messages left in the task queues (ready or unacked) when the check ended.
    left_in_queues: int = 0
    #: Heals (the fault undone) in the run, and the worst time from a heal to the completion
    #: of the first task that started after it; None when some heal saw no task complete.
    heals: int = 0
    time_to_recover: float | None = None
    recovery_bound: float | None = None

    def record(self) -> None:
        if REPORT_PATH:
            Path(REPORT_PATH).parent.mkdir(parents=True, exist_ok=True)
            with open(REPORT_PATH, "a") as out:
                row = {k: v for k, v in asdict(self).items() if not k.endswith("_ids")}
                out.write(json.dumps({**row, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}) + "\n")


def dead_lettered_ids(rabbit: ChaosRabbitNode, queue: str = "conveyor.dead_letter") -> set[str]:
    """Task ids in the dead-letter queue, read without removing them."""
    from kombu import Connection

    from tasks.deadletter import store

    with Connection(rabbit.url, connect_timeout=10) as connection:
        return {entry.id for entry in store.list_entries(connection, queue)}


def count_duplicates(
    ok: Iterable[str],
    indeterminate: dict[str, int],
    runs: dict[str, int],
    retried: dict[str, int] | None = None,
    redelivered: dict[str, int] | None = None,
) -> tuple[int, int, int]:
    """(redeliveries, runs of re-published ids, runs of unrecorded publishes) for the
    confirmed ids.

    An id published 1 + k times (k re-publishes by the producer or retries published by the
    task) may run 1 + k times without any redelivery; only runs beyond its publishes are
    duplicates. With `redelivered` (the runs whose delivery the broker flagged redelivered),
    such a run counts as a redelivery only up to the id's flagged runs: the rest arrived as
    first deliveries, so they are copies of a publish no ledger saw (a retry publish that kombu
    sent again after its confirm was lost with the connection), not the broker's redeliveries.
    Without it, every run beyond the publishes counts as a redelivery.
    """
    retried = retried or {}
    redeliveries = republished = unrecorded = 0
    for task_id in ok:
        extra_runs = max(0, runs.get(task_id, 0) - 1)
        extra_publishes = indeterminate.get(task_id, 0) + retried.get(task_id, 0)
        republished += min(extra_runs, extra_publishes)
        unexplained = extra_runs - min(extra_runs, extra_publishes)
        if redelivered is not None:
            flagged = min(unexplained, redelivered.get(task_id, 0))
            unrecorded += unexplained - flagged
            unexplained = flagged
        redeliveries += unexplained
    return redeliveries, republished, unrecorded


def completions(ledger: redis.Redis) -> list[tuple[float, float]]:
    """(started, finished) wall-clock times of every task that returned (chaos_tasks.py)."""
    pairs = []
    for raw in ledger.lrange("completions", 0, -1):
        started, finished = raw.split()
        pairs.append((float(started), float(finished)))
    return pairs


def recovery_times(
    pairs: Iterable[tuple[float, float]], heals: Sequence[float]
) -> list[float | None]:
    """For each heal (wall-clock time), seconds until a task that started after it completed.

    A task that started before the heal and finished after it does not count: it shows
    nothing about consuming again. None for a heal after which no task completed.
    """
    pairs = list(pairs)
    times: list[float | None] = []
    for heal in heals:
        after = [finished for started, finished in pairs if started >= heal]
        times.append(round(min(after) - heal, 2) if after else None)
    return times


def check(
    scenario: str,
    producer: Producer,
    ledger: redis.Redis,
    rabbit: ChaosRabbitNode,
    *,
    faults: int,
    duplicate_bound: int,
    started: float,
    timeout: float = 120,
    queues: Iterable[str] = ("default",),
    notes: str = "",
    expected_dead: Iterable[str] = (),
    heals: Sequence[float] = (),
    recovery_bound: float | None = RECOVERY_SECONDS,
) -> Outcome:
    """Drain, then count lost and duplicate executions; records the figures.

    Fails when the queues still hold messages (ready or unacked), an ok id has not run, or an
    expected dead letter is missing after `timeout` seconds: the row is recorded first.
    """
    expected = set(expected_dead)
    drain_started = time.monotonic()
    deadline = drain_started + timeout
    while True:
        runs = ledger.hgetall("runs")
        missing = [i for i in producer.ok if int(runs.get(i, 0)) == 0 and i not in expected]
        counts = rabbit.message_counts()
        busy = sum(counts.get(q, 0) for q in queues)
        if not missing and busy == 0 and (not expected or expected <= dead_lettered_ids(rabbit)):
            drained = True
            break
        if time.monotonic() > deadline:
            drained = False
            break
        time.sleep(0.5)
    drain_seconds = time.monotonic() - drain_started
    # Late duplicates (a redelivery still running) show up within a moment of draining.
    time.sleep(1.5)
    counts = rabbit.message_counts()
    left = sum(counts.get(q, 0) for q in queues)
    runs = {k: int(v) for k, v in ledger.hgetall("runs").items()}
    retried = {k: int(v) for k, v in ledger.hgetall("retried").items()}
    in_dlq = dead_lettered_ids(rabbit)
    dead = in_dlq & set(producer.ok)
    lost_ids = [i for i in producer.ok if runs.get(i, 0) == 0 and i not in dead]
    redelivered = {k: int(v) for k, v in ledger.hgetall("redelivered").items()}
    duplicates, republish_duplicates, unrecorded = count_duplicates(
        producer.ok, producer.indeterminate, runs, retried, redelivered
    )
    recoveries = recovery_times(completions(ledger), heals)
    outcome = Outcome(
        scenario=scenario,
        tasks=producer.count,
        confirmed=len(producer.ok),
        republished=sum(producer.indeterminate.values()),
        lost=len(lost_ids),
        duplicates=duplicates,
        duplicate_bound=duplicate_bound,
        republish_duplicates=republish_duplicates,
        unrecorded_publish_duplicates=unrecorded,
        dead_lettered=len(in_dlq),
        faults=faults,
        seconds=round(time.monotonic() - started, 1),
        drain_seconds=round(drain_seconds, 1),
        slowest_publish=round(producer.slowest_publish, 2),
        lost_ids=lost_ids[:10],
        notes=notes,
        retried=sum(retried.get(i, 0) for i in producer.ok),
        expected_dead=len(expected),
        unexpected_dead_ids=sorted(in_dlq - expected)[:10],
        missing_dead_ids=sorted(expected - in_dlq)[:10],
        left_in_queues=left,
        heals=len(heals),
        time_to_recover=(
            None
            if None in recoveries
            else max((t for t in recoveries if t is not None), default=None)
        ),
        recovery_bound=recovery_bound if heals else None,
    )
    if not drained:
        outcome.notes = (outcome.notes + "; " if outcome.notes else "") + "did not drain"
    outcome.record()
    assert drained, (
        f"not drained after {timeout:.0f}s: {left} messages in {list(queues)}, "
        f"{len(missing)} ok ids never run, expected dead letters missing: "
        f"{outcome.missing_dead_ids} ({outcome})"
    )
    return outcome


def publish_bound(app: Any) -> float:
    """The longest a publish may take under the configuration, in seconds.

    Each attempt may wait conveyor_publish_timeout for the socket/confirm; Celery's publish
    retry then reconnects (broker_connection_timeout for the handshake, plus the policy's
    interval) up to max_retries times, each attempt again bounded by the publish timeout.
    """
    conf = app.conf
    policy = conf.task_publish_retry_policy
    retries = int(policy["max_retries"])
    attempt = float(conf.conveyor_publish_timeout)
    reconnect = float(conf.broker_connection_timeout) + float(policy["interval_max"])
    return attempt * (retries + 1) + retries * reconnect


def assert_invariants(outcome: Outcome, producer: Producer) -> None:
    assert not producer.unpublished, (
        f"{len(producer.unpublished)} ids never published after healing; last errors: "
        f"{producer.errors[-3:]}"
    )
    assert outcome.confirmed == outcome.tasks
    assert outcome.lost == 0, f"lost {outcome.lost}: {outcome.lost_ids} ({outcome})"
    assert outcome.duplicates <= outcome.duplicate_bound, outcome
    assert outcome.left_in_queues == 0, f"{outcome.left_in_queues} messages left ({outcome})"
    # Exactly the dead letters the scenario expects: a confirmed task dead-lettered by a fault
    # is not lost in the ledger's sense, but it is not delivered either.
    assert not outcome.unexpected_dead_ids, f"unexpected dead letters ({outcome})"
    assert not outcome.missing_dead_ids, f"expected dead letters missing ({outcome})"
    assert outcome.dead_lettered == outcome.expected_dead, outcome
    if outcome.recovery_bound is not None:
        assert outcome.time_to_recover is not None, (
            f"a heal with no task completed after it ({outcome})"
        )
        assert outcome.time_to_recover <= outcome.recovery_bound, (
            f"recovered in {outcome.time_to_recover}s, bound {outcome.recovery_bound}s ({outcome})"
        )
