"""The alert rules and the dashboard load in Prometheus's own checker and do what they say."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.infra import ROOT, require

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "conveyor.json"
#: Metrics that other parts of Conveyor will export (extension points, docs/monitoring.md).
EXTENSION_METRICS = {
    "conveyor_schedule_last_success_timestamp_seconds",
    "conveyor_schedule_interval_seconds",
    # monitoring/outbox.py, registered only when the outbox is configured.
    "conveyor_outbox_oldest_waiting_seconds",
}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    require(shutil.which("promtool") is not None, "promtool not found (apt-get install prometheus)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_expressions() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_the_alert_rules_pass_promtool_check_rules() -> None:
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout


def test_the_prometheus_configuration_passes_promtool_check_config() -> None:
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_alert_fires_on_its_scenario_and_not_on_healthy_series() -> None:
    done = promtool("test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test_scenario() -> None:
    alerts = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    scenarios = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    tested = {t["alertname"] for s in scenarios for t in s.get("alert_rule_test", [])}
    # The exporter-down alert needs `up`, which only a real scrape produces.
    assert alerts - tested == {"ConveyorExporterDown"}


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses recording rules' expressions: one rule per panel query.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, expr in enumerate(dashboard_expressions())
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def conveyor_metric_names(expressions: list[str]) -> set[str]:
    names = set()
    for expr in expressions:
        for name in re.findall(r"\b(conveyor_[a-z_]+)", expr):
            names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


def test_the_dashboard_and_alerts_name_only_metrics_that_are_exported() -> None:
    """Names are checked against a live scrape in test_exporter; here against the code."""
    source = "".join(path.read_text() for path in (ROOT / "monitoring").rglob("*.py"))
    for name in conveyor_metric_names(dashboard_expressions() + alert_expressions()):
        if name in EXTENSION_METRICS:
            continue
        base = name.removesuffix("_total")
        assert f'"{base}"' in source, f"{name} is not defined in monitoring/"
