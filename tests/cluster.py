"""A local 3-node RabbitMQ cluster on loopback, for the cluster tests and for development.

    python -m tests.cluster start [--dir DIR] [--nodes 3] [--management]
    python -m tests.cluster status [--dir DIR]
    python -m tests.cluster stop [--dir DIR]

`start` boots the nodes from the installed binaries (/usr/lib/rabbitmq/bin, never the machine's
own node), joins them into one cluster, prints the broker URL list for CELERY_BROKER_URL and
returns; a background process keeps the nodes and `stop` ends it, which stops every node and
deletes DIR. Each node has its own name (c1-<port>@localhost...), AMQP and distribution ports
(free loopback ports), data, log and pid paths under DIR; they share one Erlang cookie under a
private HOME. If the nodes are not up within --timeout, `start` ends them and fails. The
chaos tests use `RabbitCluster` as their fixture and run this command itself from start to
stop (tests/chaos/test_cluster.py).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.infra import RABBITMQ_BIN, ChaosRabbitNode, RabbitNode

SYSTEM_COOKIE = Path("/var/lib/rabbitmq/.erlang.cookie")
DEFAULT_DIR = Path(os.environ.get("CONVEYOR_CLUSTER_DIR", "/tmp/conveyor-cluster"))
STATE_FILE = "cluster.json"
#: A node that sees a majority of the cluster gone stops serving clients until it is back:
#: publishers then fail at once with a refused connection instead of waiting out each quorum
#: queue's 60 s command timeout (docs/scaling.md).
PARTITION_HANDLING = "cluster_partition_handling = pause_minority\n"


class RabbitCluster:
    """`size` RabbitMQ nodes joined into one cluster; every path lives under `workdir`."""

    def __init__(self, workdir: Path, size: int = 3, *, management: bool = False) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        home = workdir / "home"
        home.mkdir(exist_ok=True)
        _install_cookie(home / ".erlang.cookie")
        self.nodes = [
            ChaosRabbitNode(
                workdir / f"c{i}", node_prefix=f"c{i}", home=home, extra_config=PARTITION_HANDLING
            )
            for i in range(1, size + 1)
        ]
        self.api_urls = [node.enable_management() for node in self.nodes] if management else []

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def broker_url(self) -> str:
        """The failover list, for CELERY_BROKER_URL."""
        return ";".join(self.urls)

    def start(self) -> RabbitCluster:
        """Boot every node at once (each takes about 5 s), then join the others to the first."""
        _in_parallel([node.start for node in self.nodes])
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            node.stop_app()
            node.ctl("join_cluster", seed.node_name)
            node.start_app()
        return self

    def stop(self) -> None:
        _in_parallel([node.stop for node in self.nodes])

    def node_of(self, node_name: str) -> ChaosRabbitNode:
        return next(node for node in self.nodes if node.node_name == node_name)

    def running(self) -> list[ChaosRabbitNode]:
        return [node for node in self.nodes if node.executor.running()]

    def any_running(self) -> ChaosRabbitNode:
        return self.running()[0]

    def running_members(self, via: ChaosRabbitNode | None = None) -> set[str]:
        """Node names the cluster reports as running, asked of `via` (any running node)."""
        status = json.loads(
            (via or self.any_running()).ctl("cluster_status", "--formatter", "json")
        )
        return set(status["running_nodes"])

    def quorum_leaders(self, via: ChaosRabbitNode | None = None) -> dict[str, str]:
        """Quorum queue name -> its leader's node name."""
        out = (via or self.any_running()).ctl(
            "list_queues", "name", "type", "leader", "--formatter", "json"
        )
        return {row["name"]: row["leader"] for row in json.loads(out) if row["type"] == "quorum"}

    def consumer_nodes(self, queue: str, via: ChaosRabbitNode | None = None) -> list[str]:
        """The nodes holding the connections that consume `queue` (from their channel pids)."""
        # The table formatter prints a pid as <c1-40123@localhost.1686.2345.0>: node first (the
        # JSON one leaves the node out).
        # Consumers on a node that went down stay listed, inactive, in case it comes back.
        out = (via or self.any_running()).ctl(
            "list_consumers", "-s", "queue_name", "channel_pid", "active"
        )
        rows = (line.split("\t") for line in out.splitlines() if "\t" in line)
        return [
            pid.strip("<>").rsplit(".", 3)[0]
            for name, pid, active in rows
            if name == queue and active == "true"
        ]

    def rebalance(self, via: ChaosRabbitNode | None = None) -> str:
        """Spread quorum queue leaders over the running nodes again (rabbitmq-queues)."""
        return _queues_tool(via or self.any_running(), "rebalance", "quorum")

    def message_counts(self) -> dict[str, int]:
        return self.any_running().message_counts()

    def describe(self) -> dict[str, Any]:
        return {
            "broker_url": self.broker_url,
            "nodes": [
                {
                    "name": node.node_name,
                    "url": node.url,
                    "dist_port": node.dist_port,
                }
                for node in self.nodes
            ],
            "management": self.api_urls,
        }


def _queues_tool(node: RabbitNode, *args: str) -> str:
    """Run rabbitmq-queues against `node`, with the node's environment (cookie, HOME)."""
    tool = Path(node.executor.rabbit_ctl).with_name("rabbitmq-queues")
    env = {**os.environ, **node.executor._envvars}
    return subprocess.run(
        [str(tool), "-n", node.node_name, *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def _install_cookie(path: Path) -> None:
    """The machine's cookie when readable (so its rabbitmqctl can also reach these nodes)."""
    if path.exists():
        return
    try:
        cookie = SYSTEM_COOKIE.read_text().strip()
    except OSError:
        cookie = secrets.token_hex(20)
    path.write_text(cookie)
    path.chmod(0o400)


def _in_parallel(actions: list[Any]) -> None:
    errors: list[BaseException] = []

    def run(action: Any) -> None:
        try:
            action()
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# --- Command line ---------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    """Hold a cluster until SIGTERM/SIGINT: the node executors die with their owner process."""
    directory: Path = args.dir
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = RabbitCluster(directory, args.nodes, management=args.management)
    try:
        cluster.start()
        state = {**cluster.describe(), "pid": os.getpid()}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        stop.wait()
    finally:
        # The state file goes last: `stop` returns once it is gone, the nodes with it.
        try:
            cluster.stop()
        finally:
            (directory / STATE_FILE).unlink(missing_ok=True)
    return 0


def _start(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if (directory / STATE_FILE).exists():
        sys.stderr.write(f"a cluster already runs from {directory}; stop it first\n")
        return 1
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    command = [sys.executable, "-m", "tests.cluster", "serve", "--dir", str(directory)]
    command += ["--nodes", str(args.nodes)] + (["--management"] if args.management else [])
    with (directory / "cluster.log").open("ab") as log:
        holder = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while not (directory / STATE_FILE).exists():
        if holder.poll() is not None or time.monotonic() > deadline:
            # The nodes run in sessions of their own and outlive a killed holder: end them too.
            holder.kill()
            holder.wait()
            _kill_node_processes(directory)
            sys.stderr.write(
                f"the cluster did not start in {args.timeout:.0f}s; "
                f"see {directory / 'cluster.log'} and {directory}/c*/logs\n"
            )
            return 1
        time.sleep(0.5)
    return _status(args)


def _kill_node_processes(directory: Path) -> list[int]:
    """SIGKILL every process started from `directory` (its nodes, by their command lines).

    This command and its callers name the directory too, so they are left alone.
    """
    spared = {os.getpid()}
    pid = os.getppid()
    while pid > 1:
        spared.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    needle = str(directory).encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return killed


def _status(args: argparse.Namespace) -> int:
    path: Path = args.dir / STATE_FILE
    if not path.exists():
        sys.stderr.write(f"no cluster runs from {args.dir}\n")
        return 1
    state = json.loads(path.read_text())
    env = {**os.environ, "HOME": str(args.dir / "home")}
    for node in state["nodes"]:
        done = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node["name"], "-q", "ping"],
            env=env,
            capture_output=True,
            timeout=60,
        )
        node["running"] = done.returncode == 0
    sys.stdout.write(json.dumps(state, indent=2) + "\n")
    return 0 if all(node["running"] for node in state["nodes"]) else 1


def _stop(args: argparse.Namespace) -> int:
    path: Path = args.dir / STATE_FILE
    if not path.exists():
        sys.stderr.write(f"no cluster runs from {args.dir}\n")
        return 1
    pid = int(json.loads(path.read_text())["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    if path.exists():
        sys.stderr.write(f"the cluster holder (pid {pid}) did not stop in {args.timeout}s\n")
        return 1
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    parser.add_argument("command", choices=("start", "status", "stop", "serve"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--management", action="store_true", help="management plugin on each")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args(argv)
    # Absolute, as the nodes' command lines hold it: a failed start finds them by it.
    args.dir = args.dir.absolute()
    command = {"start": _start, "status": _status, "stop": _stop, "serve": _serve}
    return command[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
