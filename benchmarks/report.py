"""Render a results file as the Markdown tables of docs/performance.md.

python -m benchmarks.report results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SYSTEMS = ("raw_amqp", "conveyor", "celery_stock", "dramatiq")


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
                f"{row['value']:,.1f} ({row['min']:,.1f} to {row['max']:,.1f})" if row else "n/a"
            )
        lines.append(f"| {metric} | {unit} | " + " | ".join(cells) + " |")
    if others:
        lines += ["", "| batch path | metric | value | unit |", "|---|---|---|---|"]
        lines += [
            f"| {r['system']} | {r['metric']} | {r['value']:,.1f} "
            f"({r['min']:,.1f} to {r['max']:,.1f}) | {r['unit']} |"
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
    ]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
