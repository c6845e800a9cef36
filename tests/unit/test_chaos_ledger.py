"""The chaos ledger's arithmetic that needs no broker: time to recover after each heal."""

from __future__ import annotations

from tests.chaos.harness import recovery_times


def test_time_to_recover_counts_only_tasks_that_started_after_the_heal() -> None:
    # A task running through the heal finishes at 10.5: it shows nothing about consuming again.
    pairs = [(9.0, 10.5), (12.0, 12.4), (13.0, 13.1), (30.0, 30.2)]

    assert recovery_times(pairs, [10.0, 20.0]) == [2.4, 10.2]


def test_a_heal_with_no_task_completed_after_it_has_no_time_to_recover() -> None:
    assert recovery_times([(1.0, 2.0)], [5.0]) == [None]
    assert recovery_times([(1.0, 2.0)], []) == []
