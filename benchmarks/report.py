"""Render a results file as the Markdown tables of docs/performance.md.

python -m benchmarks.report results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SYSTEMS = ("raw_amqp", "conveyor", "celery_stock", "dramatiq")

#: The issue's targets: (metric, peer, comparison, bound), as ratios conveyor / peer of one run.
TARGETS = (
    ("drain_throughput", "dramatiq", ">=", 0.8),
    ("drain_throughput", "celery_stock", ">", 1.0),
    ("publish_confirmed_single", "raw_amqp", ">=", 0.8),
    ("bulk_enqueue_pipelined", "raw_amqp", ">=", 0.5),
    ("latency_p99_at_100_per_s", "dramatiq", "<=", 1.5),
    ("worker_peak_rss", "dramatiq", "<=", 1.5),
)


def number(value: float) -> str:
    """Three decimals for ratios and small figures, one for the rest."""
    return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"


def targets_table(results: list[dict[str, Any]]) -> list[str]:
    """Each target with the run's ratio and whether it was met."""
    value = {(r["system"], r["metric"]): r["value"] for r in results}
    lines = ["| target | ratio in this run | met |", "|---|---|---|"]
    for metric, peer, comparison, bound in TARGETS:
        mine, theirs = value.get(("conveyor", metric)), value.get((peer, metric))
        if not mine or not theirs:
            continue
        ratio = mine / theirs
        met = {">=": ratio >= bound, ">": ratio > bound, "<=": ratio <= bound}[comparison]
        lines.append(
            f"| {metric}: conveyor / {peer} {comparison} {bound} | {ratio:.2f} | "
            f"{'yes' if met else '**no**'} |"
        )
    for row in results:
        if row["system"].startswith("best "):
            met = row["value"] >= 0.5
            lines.append(
                f"| {row['system']} >= 0.5 | {row['value']:.2f} | {'yes' if met else '**no**'} |"
            )
    return lines


def machine_table(machine: dict[str, Any]) -> list[str]:
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
    return [
        "| machine | |",
        "|---|---|",
        f"| CPU | {machine['cpu']} ({machine['cores']} cores) |",
        f"| memory | {machine['memory_gib']} GiB |",
        f"| OS | {machine['os']} |",
        f"| Python | {machine['python']} |",
        f"| RabbitMQ / Redis | {machine['rabbitmq']} / {machine['redis_server']} |",
        f"| packages | {packages} |",
        f"| load average at start | {', '.join(map(str, machine['load_average_at_start']))} |",
    ]


def results_table(results: list[dict[str, Any]]) -> list[str]:
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    for row in results:
        metrics.setdefault(row["metric"], {})[row["system"]] = row
    lines = [
        "| metric | unit | " + " | ".join(SYSTEMS) + " |",
        "|---|---|" + "---|" * len(SYSTEMS),
    ]
    others = [row for row in results if row["system"] not in SYSTEMS]
    for metric, by_system in metrics.items():
        if not set(by_system) & set(SYSTEMS):
            continue
        unit = next(iter(by_system.values()))["unit"]
        cells = []
        for system in SYSTEMS:
            row = by_system.get(system)
            cells.append(
                f"{number(row['value'])} ({number(row['min'])} to {number(row['max'])})"
                if row
                else "n/a"
            )
        lines.append(f"| {metric} | {unit} | " + " | ".join(cells) + " |")
    if others:
        lines += ["", "| batch path | metric | value | unit |", "|---|---|---|---|"]
        lines += [
            f"| {r['system']} | {r['metric']} | {number(r['value'])} "
            f"({number(r['min'])} to {number(r['max'])}) | {r['unit']} |"
            for r in others
        ]
    return lines


def main(argv: list[str]) -> int:
    report = json.loads(Path(argv[0]).read_text())
    out = [
        *machine_table(report["machine"]),
        "",
        "Median of the repeats, (min to max) beside it.",
        "",
        *results_table(report["results"]),
        "",
        *targets_table(report["results"]),
    ]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
