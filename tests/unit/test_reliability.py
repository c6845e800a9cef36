"""Idempotent effects, the producer's argument limit and the time-limit/consumer-timeout order."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import celeryconfig
from tasks.base import ArgumentsTooLarge, check_argument_size
from tasks.idempotency import EffectInProgress, enqueue_once, run_once, task_id_for
from tests.infra import ROOT


@pytest.fixture
def store(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(f"{redis_url}/14", decode_responses=True)
    client.flushdb()
    yield client
    client.close()


def test_an_effect_runs_once_per_key_and_repeats_return_the_first_result(
    store: redis.Redis,
) -> None:
    calls: list[int] = []

    def effect() -> int:
        calls.append(1)
        return 42

    first = run_once(store, "charge:7", effect, ttl=60, lease=5)
    again = run_once(store, "charge:7", effect, ttl=60, lease=5)
    assert (first.ran, first.value) == (True, 42)
    assert (again.ran, again.value) == (False, 42)
    assert calls == [1]


def test_a_failed_effect_releases_its_key_so_a_retry_can_run_it(store: redis.Redis) -> None:
    def broken() -> int:
        raise RuntimeError("card network down")

    with pytest.raises(RuntimeError):
        run_once(store, "charge:8", broken, ttl=60, lease=5)
    assert run_once(store, "charge:8", lambda: 1, ttl=60, lease=5).ran


def test_a_concurrent_delivery_is_told_to_come_back_later(store: redis.Redis) -> None:
    inside = threading.Event()
    release = threading.Event()

    def slow() -> int:
        inside.set()
        release.wait(5)
        return 1

    holder = threading.Thread(target=lambda: run_once(store, "k", slow, ttl=60, lease=5))
    holder.start()
    inside.wait(5)
    with pytest.raises(EffectInProgress):
        run_once(store, "k", lambda: 2, ttl=60, lease=5)
    release.set()
    holder.join()
    assert run_once(store, "k", lambda: 3, ttl=60, lease=5).value == 1


def test_a_blocked_delivery_is_told_how_long_the_lease_has_left(store: redis.Redis) -> None:
    store.set("conveyor:effect:held", "lease:killed-holder", px=50_000)
    with pytest.raises(EffectInProgress) as blocked:
        run_once(store, "held", lambda: 1, ttl=60, lease=5)
    assert 45 < blocked.value.retry_after <= 50


def test_a_lease_left_by_a_killed_delivery_expires(store: redis.Redis) -> None:
    store.set("conveyor:effect:orphan", "lease:dead", px=100)
    threading.Event().wait(0.2)
    assert run_once(store, "orphan", lambda: 5, ttl=60, lease=5).ran


class _FakeTask:
    """Records publishes; enqueue_once only needs name, apply_async and AsyncResult."""

    name = "billing.charge"

    def __init__(self) -> None:
        self.published: list[str] = []

    def apply_async(self, args: Any, kwargs: Any, task_id: str, **options: Any) -> None:
        self.published.append(task_id)

    def AsyncResult(self, task_id: str) -> str:
        return task_id


def test_a_second_publish_with_the_same_enqueue_key_is_a_no_op(store: redis.Redis) -> None:
    task = _FakeTask()
    first = enqueue_once(task, key="order-9", client=store, ttl=60, args=(9,))
    second = enqueue_once(task, key="order-9", client=store, ttl=60, args=(9,))
    assert first == second == task_id_for("billing.charge", "order-9")
    assert task.published == [first]


def test_arguments_over_the_limit_are_refused_with_a_clear_error() -> None:
    check_argument_size(("x" * 100,), {}, limit=1000)
    with pytest.raises(ArgumentsTooLarge, match="pass its id"):
        check_argument_size(("x" * 2000,), {}, limit=1000)


def test_the_hard_time_limit_fires_before_the_brokers_consumer_timeout() -> None:
    conf = (ROOT / "deploy" / "rabbitmq" / "conveyor.conf").read_text()
    consumer_timeout_ms = int(re.search(r"^consumer_timeout\s*=\s*(\d+)", conf, re.M)[1])  # type: ignore[index]
    assert celeryconfig.task_soft_time_limit < celeryconfig.task_time_limit
    assert celeryconfig.task_time_limit * 1000 < consumer_timeout_ms


def test_chaos_ledger_counts_runs_of_re_published_ids_apart_from_redeliveries() -> None:
    from tests.chaos.harness import count_duplicates

    ok = ["once", "redelivered", "republished-landed-twice", "republished-and-redelivered"]
    indeterminate = {"republished-landed-twice": 1, "republished-and-redelivered": 1}
    runs = {
        "once": 1,
        "redelivered": 2,
        "republished-landed-twice": 2,
        "republished-and-redelivered": 3,
    }
    # The second run of a re-published id is its second publish; a third is a redelivery.
    assert count_duplicates(ok, indeterminate, runs) == (2, 2, 0)
    # A re-published id whose first publish never landed ran once: nothing to excuse.
    assert count_duplicates(["x"], {"x": 3}, {"x": 1}) == (0, 0, 0)
    # A retry the task published itself is a publish too; a run beyond it is a redelivery.
    assert count_duplicates(["r"], {}, {"r": 3}, {"r": 1}) == (1, 1, 0)
    assert count_duplicates(["r"], {}, {"r": 3}) == (2, 0, 0)


def test_chaos_ledger_bounds_only_the_runs_the_broker_flagged_as_redelivered() -> None:
    from tests.chaos.harness import count_duplicates

    # A redelivered copy that ran beside its first run is a redelivery.
    assert count_duplicates(["a"], {}, {"a": 2}, {}, {"a": 1}) == (1, 0, 0)
    # A prefetched copy that never ran before the connection loss: its flagged run is its
    # first, and nothing is extra.
    assert count_duplicates(["b"], {}, {"b": 1}, {}, {"b": 1}) == (0, 0, 0)
    # A retry published twice (the second time inside kombu, after the confirm was lost):
    # three runs, one recorded retry, none flagged; the third run is an unrecorded publish.
    assert count_duplicates(["c"], {}, {"c": 3}, {"c": 1}, {}) == (0, 1, 1)
    # Flagged runs beyond the publishes stay redeliveries, whatever else ran.
    assert count_duplicates(["d"], {}, {"d": 4}, {"d": 1}, {"d": 1}) == (1, 1, 1)


def test_redis_effects_commit_with_their_marker_once_per_key(store: redis.Redis) -> None:
    from tasks.idempotency import run_once_in_redis

    def effect(pipe: Any) -> None:
        pipe.hincrby("counters", "k", 1)

    first = run_once_in_redis(store, "tx-key", effect, ttl=60, lease=5)
    again = run_once_in_redis(store, "tx-key", effect, ttl=60, lease=5)
    assert (first.ran, first.value) == (True, [1])
    assert (again.ran, again.value) == (False, None)
    assert store.hget("counters", "k") == "1"


def test_a_redis_effect_whose_lease_was_taken_over_applies_nothing(store: redis.Redis) -> None:
    from tasks.idempotency import EFFECT_PREFIX, run_once_in_redis

    def effect_after_losing_the_lease(pipe: Any) -> None:
        # Another delivery takes the key while this one is about to commit (its lease ran out)
        store.set(EFFECT_PREFIX + "tx-lost", "lease:someone-else")
        pipe.hincrby("counters", "lost", 1)

    with pytest.raises(EffectInProgress):
        run_once_in_redis(store, "tx-lost", effect_after_losing_the_lease, ttl=60, lease=5)
    assert store.hget("counters", "lost") is None
    assert store.get(EFFECT_PREFIX + "tx-lost") == "lease:someone-else"


def test_a_failing_redis_effect_releases_its_lease_and_applies_nothing(
    store: redis.Redis,
) -> None:
    from tasks.idempotency import EFFECT_PREFIX, run_once_in_redis

    def broken(pipe: Any) -> None:
        pipe.hincrby("counters", "broken", 1)
        raise RuntimeError("bug in the effect")

    with pytest.raises(RuntimeError):
        run_once_in_redis(store, "tx-broken", broken, ttl=60, lease=5)
    assert store.hget("counters", "broken") is None
    assert store.get(EFFECT_PREFIX + "tx-broken") is None
