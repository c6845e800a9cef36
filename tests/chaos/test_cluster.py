"""Failover on a 3-node RabbitMQ cluster: node kills during a drain, and the loss of quorum.

A real `celery -A tasks worker` (concurrency 2) drains 2,000 short tasks from the quorum queue
`default` while a producer keeps publishing with confirms. One node is killed with SIGKILL:
first the node the worker consumes through, then, separately, the node leading the queue;
countdown tasks published just before the kill must run after it. The ledger
(tests/chaos/harness.py) shows what was lost and what ran twice; each task's start time shows
how long consumption stopped. A third scenario kills two of the three nodes: the queue has no
quorum, a publish must fail at once, and the tasks confirmed before must all run once the
nodes are back. Each scenario's row in the chaos report (CONVEYOR_CHAOS_REPORT) carries its
stall and rejoin times in `notes`; docs/scaling.md takes its figures from those rows. The
module also runs the cluster command (python -m tests.cluster) and checks that processes given
the same node list spread over the nodes.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from kombu.exceptions import OperationalError

from tests.chaos.conftest import point_app, pointed_at
from tests.chaos.harness import Producer, assert_invariants, check, publish_bound
from tests.cluster import RabbitCluster
from tests.infra import RABBITMQ_BIN, ROOT, ChaosRabbitNode, WorkerProcess, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(600)]

CONCURRENCY = 2
TASKS = 2000
#: Published back to back before the worker starts, so that it never runs out of work and
#: every gap in start times is the failover's.
BACKLOG = 1500
#: The acceptance bound: a worker resumes consuming this soon after losing its node.
MAX_STALL = 5.0
#: Countdown tasks published just before the kill, due this many seconds later: after it.
DELAYED_TASKS = 10
COUNTDOWN = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    started = time.monotonic()
    cluster = RabbitCluster(tmp_path_factory.mktemp("cluster")).start()
    print(f"3-node cluster up in {time.monotonic() - started:.1f}s")  # noqa: T201
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def cluster_app(conveyor_app: Any, cluster: RabbitCluster) -> Iterator[Any]:
    with pointed_at(conveyor_app, cluster.broker_url):
        # The task queues exist before the first scenario looks for their leaders.
        with conveyor_app.connection_for_write() as connection:
            for queue in conveyor_app.conf.task_queues:
                queue.bind(connection).declare()
        yield conveyor_app


# The command line (python -m tests.cluster). These tests come first: the module's own
# cluster starts with the first scenario, so the two never run side by side.


def cluster_command(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.cluster", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def processes_from(directory: Path) -> list[str]:
    """Command lines of the running processes that name `directory` (its nodes)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if str(directory).encode() in command:
            found.append(command.replace(b"\0", b" ").decode(errors="replace"))
    return found


def test_the_cluster_command_starts_three_joined_nodes_and_stops_them(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"

    # Given a cluster started by the command
    started = cluster_command("start", "--dir", str(directory), "--timeout", "240")
    try:
        assert started.returncode == 0, started.stderr + _log(directory)
        state = json.loads(started.stdout)
        names = [node["name"] for node in state["nodes"]]

        # Then its three nodes answer and form one cluster, reachable by the printed URL list
        assert [node["running"] for node in state["nodes"]] == [True] * 3
        assert state["broker_url"].split(";") == [node["url"] for node in state["nodes"]]
        status = cluster_command("status", "--dir", str(directory))
        assert status.returncode == 0, status.stdout + status.stderr
        rabbitmqctl = str(RABBITMQ_BIN / "rabbitmqctl")
        members = subprocess.run(
            [rabbitmqctl, "-n", names[0], "cluster_status", "--formatter", "json"],
            env={**os.environ, "HOME": str(directory / "home")},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert sorted(json.loads(members.stdout)["running_nodes"]) == sorted(names)
        with Connection(state["broker_url"], connect_timeout=10) as connection:
            connection.ensure_connection(max_retries=1)
        assert processes_from(directory)
    finally:
        # When it is stopped
        stopped = cluster_command("stop", "--dir", str(directory))

    # Then every node is gone, with the directory, and status says nothing runs
    assert stopped.returncode == 0, stopped.stderr
    assert not directory.exists()
    assert processes_from(directory) == []
    after = cluster_command("status", "--dir", str(directory))
    assert after.returncode == 1
    assert "no cluster runs" in after.stderr


def test_a_cluster_start_that_times_out_leaves_no_node_running(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"

    # When the nodes cannot be up in time (each takes about 5 s to boot)
    failed = cluster_command("start", "--dir", str(directory), "--timeout", "4")

    # Then the command fails, says so, and no node it started is left running
    assert failed.returncode == 1
    assert "did not start in 4s" in failed.stderr
    assert list(directory.glob("c*/")), "the nodes were never launched"
    time.sleep(2)
    assert processes_from(directory) == []


def _log(directory: Path) -> str:
    log = directory / "cluster.log"
    return log.read_text()[-3000:] if log.exists() else ""


@dataclass
class Scene:
    app: Any
    cluster: RabbitCluster
    ledger: redis.Redis
    workdir: Path
    ledger_url: str
    result_backend: str

    def reset(self) -> None:
        """Every node running and joined, leaders spread, the ledger and queues empty."""
        for node in self.cluster.nodes:
            if not node.executor.running():
                node.restart()
        wait_for(
            lambda: len(self.cluster.running_members()) == len(self.cluster.nodes),
            120,
            what="every node to run in the cluster",
        )
        self.ledger.flushdb()
        via = self.cluster.any_running()
        for queue in ("default", "conveyor.dead_letter"):
            if queue in via.message_counts():
                via.ctl("purge_queue", queue)

    def order(self, first: ChaosRabbitNode) -> str:
        """The broker list with `first` first: the client connects there."""
        rest = [node.url for node in self.cluster.nodes if node is not first]
        return ";".join([first.url, *rest])

    def worker(self, name: str, first: ChaosRabbitNode) -> WorkerProcess:
        return WorkerProcess(
            broker_url=self.order(first),
            result_backend=self.result_backend,
            workdir=self.workdir / name,
            name=name,
            concurrency=CONCURRENCY,
            env={
                "CONVEYOR_TEST_LEDGER_URL": self.ledger_url,
                # The test picks the worker's node; production processes shuffle the list.
                "CONVEYOR_BROKER_SHUFFLE": "false",
            },
        ).start(timeout=120)

    def publish_via(self, first: ChaosRabbitNode) -> None:
        point_app(self.app, self.order(first))

    def leader_of(self, queue: str) -> ChaosRabbitNode:
        return self.cluster.node_of(self.cluster.quorum_leaders()[queue])

    def starts(self) -> list[float]:
        return sorted(float(t) for t in self.ledger.lrange("starts", 0, -1))


@pytest.fixture
def scene(
    cluster_app: Any,
    cluster: RabbitCluster,
    ledger_url: str,
    result_backend: str,
    tmp_path: Path,
) -> Scene:
    ledger = redis.Redis.from_url(ledger_url, decode_responses=True)
    scene = Scene(cluster_app, cluster, ledger, tmp_path, ledger_url, result_backend)
    scene.reset()
    return scene


def longest_gap(starts: list[float], since: float) -> float:
    """The longest time without a task starting, from `since` to the last start."""
    later = [t for t in starts if t >= since]
    if not later:
        return float("inf")
    points = [since, *later]
    return max(b - a for a, b in itertools.pairwise(points))


def refused(error: BaseException) -> bool:
    """Whether `error`, or what it was raised from, is a refused TCP connection."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or "Connection refused" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Like wait_for, but returns False on timeout: the assertions after it say what failed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def drained(scene: Scene, producer: Producer, timeout: float) -> bool:
    """Wait until every confirmed id has run at least once; False if it has not in time."""
    return wait_until(lambda: all_ran(scene, producer.ok), timeout)


def all_ran(scene: Scene, ids: list[str]) -> bool:
    return not not_run(scene, ids)


def not_run(scene: Scene, ids: list[str]) -> list[str]:
    runs = scene.ledger.hgetall("runs")
    return [task_id for task_id in ids if int(runs.get(task_id, 0)) == 0]


#: Processes started with the same node list; the chance that all of them still take the same
#: first node is 3 x (1/3)^12, about 1 in 177,000.
PROCESSES = 12
#: Connects the way a worker or producer does and prints the port of the node it reached.
WHICH_NODE = (
    "from tasks.celery_app import app\n"
    "with app.connection_for_write() as connection:\n"
    "    connection.ensure_connection(max_retries=3)\n"
    "    print(connection.connection.sock.getpeername()[1])\n"
)


def test_processes_given_the_node_list_spread_over_the_nodes(cluster: RabbitCluster) -> None:
    # Given every process gets the same list of the three nodes, shuffling on (the default)
    env = {**os.environ, "CELERY_BROKER_URL": cluster.broker_url}
    env.pop("CONVEYOR_BROKER_SHUFFLE", None)

    # When each connects
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WHICH_NODE],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    answers = [process.communicate(timeout=120) for process in processes]

    # Then they did not all land on the first node of the list
    assert [process.returncode for process in processes] == [0] * PROCESSES, answers
    reached = [int(out) for out, _ in answers]
    assert set(reached) <= {node.port for node in cluster.nodes}
    assert len(set(reached)) > 1, f"every process connected to port {reached[0]}"


def drain_through_a_node_kill(scene: Scene, scenario: str, victim_role: str) -> None:
    from tests.worker_tasks import timed_work

    # Given the queue exists and leaders are spread, a worker on a node that is not the
    # queue's leader: the two roles can then be killed separately.
    scene.cluster.rebalance()
    leader = scene.leader_of("default")
    consumer_node = next(node for node in scene.cluster.nodes if node is not leader)
    victim = consumer_node if victim_role == "consumer" else leader
    # The producer also starts on the victim, so publishing has to fail over too.
    scene.publish_via(victim)
    started = time.monotonic()
    producer = Producer(
        timed_work, TASKS, args=lambda i: (), burst=BACKLOG, spread=40.0, give_up_after=120
    ).start()
    wait_for(lambda: len(producer.ok) >= BACKLOG, 120, what="the backlog to be published")
    worker = scene.worker(scenario, consumer_node)
    try:
        assert scene.cluster.consumer_nodes("default") == [consumer_node.node_name]
        wait_for(lambda: scene.ledger.llen("starts") >= 300, 120, what="the drain to start")
        published_before = len(producer.ok)

        # And countdown tasks wait in the delayed-delivery queues (quorum queues too), due
        # after the kill: they reach the task queue and run only once the cluster failed over.
        delayed = [timed_work.apply_async((), countdown=COUNTDOWN).id for _ in range(DELAYED_TASKS)]

        # When the victim is killed mid-drain.
        killed_at = time.time()
        victim.kill9()
        wait_for(
            lambda: len(producer.ok) > published_before + 50,
            60,
            what="publishing to continue after the kill",
        )
        producer.join(180)
        # Every confirmed task has run (or the wait gives up and check() reports the loss):
        # only then are the start times complete.
        drained(scene, producer, 180)
        stall = longest_gap(scene.starts(), killed_at)
        moved_to = scene.cluster.consumer_nodes("default")
        wait_until(lambda: all_ran(scene, delayed), 60)
        delayed_missing = not_run(scene, delayed)

        # And the victim restarts and rejoins; leaders are spread again.
        restarted_at = time.monotonic()
        victim.restart()
        wait_for(
            lambda: victim.node_name in scene.cluster.running_members(),
            120,
            what="the killed node to rejoin",
        )
        rejoin = time.monotonic() - restarted_at
        scene.cluster.rebalance()
        leaders = scene.cluster.quorum_leaders()
        # The row in the chaos report carries the stall and rejoin (docs/scaling.md's table).
        outcome = check(
            scenario,
            producer,
            scene.ledger,
            scene.cluster.any_running(),
            faults=1,
            duplicate_bound=CONCURRENCY,
            started=started,
            timeout=180,
            notes=f"killed the {victim_role} node; stall {stall:.2f}s; rejoined in "
            f"{rejoin:.1f}s; consumer moved to {moved_to}; countdown tasks run "
            f"{DELAYED_TASKS - len(delayed_missing)} of {DELAYED_TASKS}",
        )
        print(f"{scenario}: {outcome}")  # noqa: T201
    finally:
        worker.stop(timeout=30)

    # Then nothing was lost, at most one extra run per pool process, and consumption
    # resumed within the bound.
    assert_invariants(outcome, producer)
    assert moved_to and victim.node_name not in moved_to
    assert stall < MAX_STALL, f"no task started for {stall:.2f}s after the kill"
    assert not delayed_missing, f"countdown tasks never ran: {delayed_missing}"
    assert victim.node_name in set(leaders.values()), f"no leader on the rejoined node: {leaders}"


def test_killing_the_workers_node_loses_nothing_and_stalls_under_five_seconds(
    scene: Scene,
) -> None:
    drain_through_a_node_kill(scene, "cluster-kill-consumer-node", "consumer")


def test_killing_the_queue_leaders_node_loses_nothing_and_stalls_under_five_seconds(
    scene: Scene,
) -> None:
    drain_through_a_node_kill(scene, "cluster-kill-leader-node", "leader")


def test_without_quorum_publishers_fail_clearly_and_recovery_loses_nothing(
    scene: Scene,
) -> None:
    from tests.worker_tasks import timed_work

    # Given 200 confirmed tasks waiting in the queue.
    survivor, *victims = scene.cluster.nodes
    scene.publish_via(survivor)
    producer = Producer(timed_work, 200, args=lambda i: (), spread=0).start().join(120)
    assert len(producer.ok) == 200

    # When two of the three nodes die, the queue has no quorum: a publish fails, in bounded
    # time, instead of hanging or claiming success.
    for node in victims:
        node.kill9()
    bound = publish_bound(scene.app)
    began = time.monotonic()
    with pytest.raises(OperationalError) as failure:
        timed_work.apply_async(())
    took = time.monotonic() - began
    print(f"no quorum: publish failed after {took:.1f}s with {failure.value!r}")  # noqa: T201
    assert took <= bound + 5, f"the failing publish took {took:.1f}s (bound {bound:.0f}s)"
    # The paused survivor (pause_minority) has closed its listener: what the publisher sees is
    # a refused connection to the last node it tried, the same as with every node down
    # (docs/scaling.md says how an operator tells the two apart).
    assert refused(failure.value), f"not a refused connection: {failure.value!r}"

    # Then with the nodes back, every confirmed task runs and none is lost.
    started = time.monotonic()
    for node in victims:
        node.restart()
    wait_for(lambda: len(scene.cluster.running_members()) == 3, 180, what="the cluster to re-form")
    rejoin = time.monotonic() - started
    worker = scene.worker("cluster-no-quorum", survivor)
    try:
        outcome = check(
            "cluster-no-quorum",
            producer,
            scene.ledger,
            survivor,
            faults=2,
            duplicate_bound=0,
            started=started,
            timeout=180,
            notes=f"publish failed after {took:.1f}s: {type(failure.value).__name__}: "
            f"{failure.value}; "
            f"rejoined in {rejoin:.1f}s",
        )
    finally:
        worker.stop(timeout=30)
    assert_invariants(outcome, producer)
