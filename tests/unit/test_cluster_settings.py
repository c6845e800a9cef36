"""The cluster settings: broker list order, quorum replication, the consumer's steps."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.infra import ROOT
from workers.failover import STEP, STOCK_STEP, Consumer

NODES = [f"amqp://guest:guest@10.0.0.{i}:5672//" for i in (1, 2, 3)]


def load(env: dict[str, str], *names: str, app: bool = False) -> dict[str, object]:
    """Settings of a fresh celeryconfig import under `env`, plus the broker variable after it
    and, with `app`, the URLs a Celery app configured from it connects to (read and write)."""
    code = (
        "import json, os, celeryconfig as c; "
        f"got = {{n: getattr(c, n) for n in {list(names)!r}}}; "
        "got['env'] = os.environ.get('CELERY_BROKER_URL'); "
    )
    if app:
        code += (
            "from celery import Celery; a = Celery(); a.config_from_object(c); "
            "got.update(read=a.conf.broker_read_url, write=a.conf.broker_write_url); "
        )
    done = subprocess.run(
        [sys.executable, "-c", code + "print(json.dumps(got, default=str))"],
        env={"PATH": "", **env},
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    loaded: dict[str, object] = json.loads(done.stdout)
    return loaded


def test_each_process_takes_the_cluster_nodes_in_its_own_order() -> None:
    orders = set()
    for _ in range(12):
        got = load({"CELERY_BROKER_URL": ";".join(NODES)}, "broker_url", app=not orders)
        # Celery reads the variable before broker_url, but broker_read_url and
        # broker_write_url before both: its connections take this process's order, and
        # importing the configuration leaves the environment as it was.
        if not orders:
            assert got["read"] == got["write"] == got["broker_url"]
        assert got["env"] == ";".join(NODES)
        urls = str(got["broker_url"]).split(";")
        assert sorted(urls) == sorted(NODES)
        orders.add(urls[0])
    # 12 draws all starting on the same node would happen once in 3**11.
    assert len(orders) > 1


def test_the_order_given_is_kept_when_shuffling_is_off() -> None:
    got = load(
        {"CELERY_BROKER_URL": ";".join(NODES), "CONVEYOR_BROKER_SHUFFLE": "false"},
        "broker_url",
        app=True,
    )
    assert got["broker_url"] == got["env"] == got["write"] == ";".join(NODES)


def test_quorum_replicas_are_left_to_rabbitmq_unless_set() -> None:
    default = load({}, "_queue_arguments")
    assert "x-quorum-initial-group-size" not in str(default["_queue_arguments"])
    five = load({"CONVEYOR_QUORUM_GROUP_SIZE": "5"}, "_queue_arguments")
    assert "'x-quorum-initial-group-size': 5" in str(five["_queue_arguments"])


def test_the_worker_consumer_replaces_celerys_delayed_delivery_step() -> None:
    steps = Consumer.Blueprint.default_steps
    assert STEP in steps
    assert STOCK_STEP not in steps
    assert load({}, "worker_consumer")["worker_consumer"] == "workers.failover:Consumer"
