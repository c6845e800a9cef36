"""``python -m benchmarks.vhosts [--vhosts N] [--connections N] [--messages N] [--json PATH]``

What one Conveyor vhost costs a RabbitMQ node in file handles and memory, idle and under load,
and how that grows with vhosts and connections (docs/scaling.md). On one private node, in
steps, each read from ``rabbitmqctl status`` once the node has settled:

1. the empty node;
2. the baseline: a plain vhost with one classic queue;
3. a Conveyor vhost without its delay levels (4 task queues, dead-letter, unroutable), and
   one with its levels as classic queues;
4. a whole Conveyor vhost, the same with its 28 ``celery_delayed_*`` levels (34 quorum queues),
   as deploy/rabbitmq/definitions.py declares it, then N more;
5. N idle AMQP connections to it;
6. under load: messages published with confirms to its task queues and delay levels, peak
   and settled.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kombu import Connection, Exchange, Producer
from kombu.transport.native_delayed_delivery import calculate_routing_key, level_name

import celeryconfig
from benchmarks.environment import machine
from tests.infra import ROOT, RabbitNode

#: The node's open-file limit for the run: enough for every step, whatever the shell's is.
NOFILE = 65536
#: Seconds the node is left alone before a reading: quorum queues open their files lazily.
SETTLE = 3.0
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.py"


def node_figures(node: RabbitNode) -> dict[str, int]:
    """File handles, sockets and memory the node reports."""
    status = json.loads(node.ctl("status", "--formatter", "json"))
    fds, memory = status["file_descriptors"], status["memory"]
    return {
        "fd_used": int(fds["total_used"]),
        "fd_limit": int(fds["total_limit"]),
        "sockets_used": int(fds["sockets_used"]),
        "memory_rss": int(memory["total"]["rss"]),
        "memory_quorum_queues": int(memory.get("quorum_queue_procs", 0)),
        "memory_connections": int(memory.get("connection_readers", 0))
        + int(memory.get("connection_writers", 0))
        + int(memory.get("connection_channels", 0))
        + int(memory.get("connection_other", 0)),
    }


def settled(node: RabbitNode) -> dict[str, int]:
    """The median of three readings, after the node has had SETTLE seconds to itself."""
    time.sleep(SETTLE)
    readings = []
    for _ in range(3):
        readings.append(node_figures(node))
        time.sleep(0.5)
    return {key: int(statistics.median(r[key] for r in readings)) for key in readings[0]}


def conveyor_definitions(
    vhost: str, *, delay_levels: bool = True, classic_levels: bool = False
) -> dict[str, Any]:
    """deploy/rabbitmq/definitions.py's topology for `vhost` (users and permissions left out:
    they cost no handles), without the celery_delayed_* queues if not `delay_levels`, or with
    them as classic queues (``broker_native_delayed_delivery_queue_type = "classic"``)."""
    env = {**os.environ, "CONVEYOR_VHOST": vhost}
    for role in ("admin", "producer", "worker", "monitor", "exporter"):
        env.setdefault(f"CONVEYOR_{role.upper()}_PASSWORD", "benchmark")
    out = subprocess.run(
        [sys.executable, str(DEFINITIONS)], env=env, capture_output=True, text=True, check=True
    ).stdout
    doc: dict[str, Any] = json.loads(out)
    if not delay_levels:
        doc["queues"] = [q for q in doc["queues"] if not q["name"].startswith("celery_delayed_")]
        doc["bindings"] = [
            b
            for b in doc["bindings"]
            if not b["destination"].startswith("celery_delayed_")
            or b["destination_type"] == "exchange"
        ]
    if classic_levels:
        for queue in doc["queues"]:
            if queue["name"].startswith("celery_delayed_"):
                queue["arguments"]["x-queue-type"] = "classic"
                queue["arguments"].pop("x-dead-letter-strategy", None)
    return {key: doc[key] for key in ("vhosts", "exchanges", "queues", "bindings")}


def import_definitions(node: RabbitNode, doc: dict[str, Any], workdir: Path) -> None:
    path = workdir / f"definitions-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(doc))
    node.ctl("import_definitions", str(path))
    for vhost in doc["vhosts"]:
        node.ctl("set_permissions", "-p", vhost["name"], "guest", ".*", ".*", ".*")


def vhost_url(node: RabbitNode, vhost: str) -> str:
    return node.url.rsplit("/", 1)[0] + vhost


def delta(after: dict[str, int], before: dict[str, int], per: int = 1) -> dict[str, float]:
    keys = (
        "fd_used",
        "sockets_used",
        "memory_rss",
        "memory_quorum_queues",
        "memory_connections",
    )
    return {key: round((after[key] - before[key]) / per, 2) for key in keys}


def with_idle_connections(url: str, count: int, read: Callable[[], dict[str, int]]) -> Any:
    connections = [Connection(url, heartbeat=0) for _ in range(count)]
    try:
        for connection in connections:
            connection.connect()
        return read()
    finally:
        for connection in connections:
            connection.release()


def publish_load(url: str, messages: int) -> None:
    """Persistent messages, confirmed, to the four task queues and (one in five) the delay
    levels, as countdowns of up to a day."""
    task_exchange = Exchange(celeryconfig.conveyor_task_exchange, type="topic")
    queues = celeryconfig.conveyor_queue_names
    with Connection(url, transport_options={"confirm_publish": True}) as connection:
        producer = Producer(connection.channel())
        for n in range(messages):
            queue = queues[n % len(queues)]
            if n % 5 == 4:
                countdown = 60 + (n * 7919) % 86_400
                exchange = Exchange(level_name(27), type="topic")
                key = calculate_routing_key(countdown, queue)
            else:
                exchange, key = task_exchange, queue
            producer.publish(b"x" * 512, exchange=exchange, routing_key=key, delivery_mode=2)


def under_load(node: RabbitNode, url: str, messages: int) -> dict[str, dict[str, int]]:
    """Peak figures while `messages` are published, and settled ones with them at rest."""
    peak: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in node_figures(node).items():
                peak[key] = max(peak.get(key, 0), value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    publish_load(url, messages)
    seconds = time.monotonic() - started
    done.set()
    sampler.join()
    return {"peak": peak, "at_rest": settled(node), "publish_seconds": {"value": round(seconds)}}


def run(node: RabbitNode, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    steps: dict[str, Any] = {"empty_node": settled(node)}
    node.ctl("add_vhost", "plain")
    node.ctl("set_permissions", "-p", "plain", "guest", ".*", ".*", ".*")
    with Connection(vhost_url(node, "plain")) as connection:
        connection.default_channel.queue_declare("baseline", durable=True)
    steps["plain_vhost"] = settled(node)
    import_definitions(node, conveyor_definitions("no-delay", delay_levels=False), workdir)
    steps["conveyor_vhost_without_delay_levels"] = settled(node)
    import_definitions(node, conveyor_definitions("classic-levels", classic_levels=True), workdir)
    steps["conveyor_vhost_with_classic_delay_levels"] = settled(node)
    import_definitions(node, conveyor_definitions("conveyor-0"), workdir)
    steps["conveyor_vhost"] = settled(node)
    more = [conveyor_definitions(f"conveyor-{n}") for n in range(1, args.vhosts + 1)]
    import_definitions(
        node, {key: [x for doc in more for x in doc[key]] for key in more[0]}, workdir
    )
    steps[f"plus_{args.vhosts}_conveyor_vhosts"] = settled(node)
    url = vhost_url(node, "conveyor-0")
    steps[f"plus_{args.connections}_connections"] = with_idle_connections(
        url, args.connections, lambda: settled(node)
    )
    steps["load"] = under_load(node, url, args.messages)
    return steps


def report(steps: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per-unit costs, and each against the baseline (the plain vhost) measured in the run."""
    empty, plain = steps["empty_node"], steps["plain_vhost"]
    no_delay = delta(steps["conveyor_vhost_without_delay_levels"], plain)
    classic = delta(
        steps["conveyor_vhost_with_classic_delay_levels"],
        steps["conveyor_vhost_without_delay_levels"],
    )
    vhost = delta(steps["conveyor_vhost"], steps["conveyor_vhost_with_classic_delay_levels"])
    per_vhost = delta(steps[f"plus_{args.vhosts}_conveyor_vhosts"], steps["conveyor_vhost"],
                      args.vhosts)  # fmt: skip
    baseline = delta(plain, empty)
    before_load = steps[f"plus_{args.vhosts}_conveyor_vhosts"]
    costs = {
        "plain_vhost_with_one_classic_queue (baseline)": baseline,
        "conveyor_vhost_without_delay_levels (6 quorum queues)": no_delay,
        "conveyor_vhost_with_classic_delay_levels (6 quorum, 28 classic)": classic,
        "conveyor_vhost (34 quorum queues)": vhost,
        "each_further_conveyor_vhost": per_vhost,
        "per_delay_level (of 28)": {k: round((vhost[k] - no_delay[k]) / 28, 2) for k in vhost},
        "per_idle_connection": delta(
            steps[f"plus_{args.connections}_connections"], before_load, args.connections
        ),
        f"load_{args.messages}_messages_peak": delta(steps["load"]["peak"], before_load),
        f"load_{args.messages}_messages_at_rest": delta(steps["load"]["at_rest"], before_load),
    }
    # File handles only: the baseline's memory (a few KiB) is below the noise of RSS.
    ratios = {
        name: round(cost["fd_used"] / baseline["fd_used"], 1) if baseline["fd_used"] else None
        for name, cost in costs.items()
    }
    return {"costs": costs, "fd_ratios_to_baseline": ratios, "node_limit": empty["fd_limit"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="File handles and memory one Conveyor vhost costs a private RabbitMQ node."
    )
    parser.add_argument("--vhosts", type=int, default=4, help="further Conveyor vhosts")
    parser.add_argument("--connections", type=int, default=100, help="idle AMQP connections")
    parser.add_argument("--messages", type=int, default=5000, help="messages published")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    # The node inherits this process's limit: raise it so that no step runs into it.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    details = machine()
    with tempfile.TemporaryDirectory(prefix="bench-vhosts-") as tmp:
        node = RabbitNode(Path(tmp) / "rabbit").start()
        try:
            steps = run(node, args, Path(tmp))
        finally:
            node.stop()
    results = {"machine": details, "steps": steps, **report(steps, args)}
    text = json.dumps(results, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
