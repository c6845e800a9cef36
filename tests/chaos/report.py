"""Turn a chaos run's JSON lines into the markdown table of docs/reliability.md.

CONVEYOR_CHAOS_REPORT=chaos.jsonl pytest -m slow tests/chaos
python -m tests.chaos.report chaos.jsonl
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

COLUMNS = (
    ("scenario", "scenario"),
    ("tasks", "tasks"),
    ("faults", "faults"),
    ("republished", "re-published"),
    ("retried", "retries published by tasks"),
    ("lost", "lost"),
    ("republish_duplicates", "runs of re-published or retried ids"),
    ("duplicates", "redeliveries"),
    ("duplicate_bound", "bound"),
    ("seconds", "total s"),
    ("drain_seconds", "drain after heal s"),
    ("slowest_publish", "slowest publish s"),
)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores"


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "")) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows = [json.loads(line) for line in Path(argv[1]).read_text().splitlines() if line.strip()]
    sys.stdout.write(table(rows) + "\n\n" + f"Machine: {machine()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
