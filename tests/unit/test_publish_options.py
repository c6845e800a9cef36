from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.base import publish_options

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def options(**given: object) -> dict[str, object]:
    return publish_options(dict(given), publish_timeout=7.0, now=NOW)


def test_every_publish_gets_bounded_waits() -> None:
    assert options() == {"timeout": 7.0, "confirm_timeout": 7.0}
    assert options(timeout=1)["timeout"] == 1


@pytest.mark.parametrize(("countdown", "expected"), [(0.4, 1), (1.0, 1), (1.7, 2), (30, 30)])
def test_a_countdown_is_rounded_up_to_whole_seconds(countdown: float, expected: int) -> None:
    assert options(countdown=countdown)["countdown"] == expected


@pytest.mark.parametrize("countdown", [0, -5])
def test_a_countdown_in_the_past_means_now(countdown: float) -> None:
    assert "countdown" not in options(countdown=countdown)


def test_an_eta_becomes_a_whole_second_countdown() -> None:
    assert options(eta=NOW + timedelta(seconds=2.2))["countdown"] == 3
    assert options(eta=(NOW + timedelta(seconds=5)).isoformat())["countdown"] == 5
    assert "eta" not in options(eta=NOW + timedelta(seconds=5))


def test_an_eta_in_the_past_runs_now() -> None:
    assert "countdown" not in options(eta=NOW - timedelta(minutes=1))


def test_a_least_privilege_producer_publishes_without_declaring() -> None:
    assert (
        publish_options({}, publish_timeout=1, now=NOW, declare_on_publish=False)["declare"] == []
    )
    assert "declare" not in publish_options({}, publish_timeout=1, now=NOW)
