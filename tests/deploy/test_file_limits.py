"""Every RabbitMQ that Conveyor deploys starts with room for file handles (docs/scaling.md)."""

from __future__ import annotations

import configparser

import pytest
import yaml

from tests.infra import ROOT
from tests.unit.test_compose import ONE_SHOTS, REQUIRED, compose_config

#: Open files a broker gets: about 100 per idle vhost plus one per connection (docs/scaling.md).
NOFILE = 65536


@pytest.mark.parametrize("profile", [(), ("--profile", "cluster")], ids=["default", "cluster"])
def test_every_rabbitmq_service_in_compose_raises_its_open_file_limit(
    profile: tuple[str, ...],
) -> None:
    done = compose_config(REQUIRED, *profile)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    brokers = {
        name
        for name, service in services.items()
        if str(service.get("image", "")).startswith("rabbitmq:") and name not in ONE_SHOTS
    }
    assert brokers, "no RabbitMQ service found"
    for name in brokers:
        nofile = services[name].get("ulimits", {}).get("nofile")
        assert nofile == {"soft": NOFILE, "hard": NOFILE}, f"{name}: ulimits.nofile is {nofile}"


def test_the_systemd_drop_in_raises_rabbitmqs_open_file_limit() -> None:
    unit = configparser.ConfigParser(strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read(ROOT / "deploy" / "systemd" / "rabbitmq-server.service.d" / "limits.conf")
    assert unit.sections() == ["Service"]
    assert int(unit["Service"]["LimitNOFILE"]) >= NOFILE
