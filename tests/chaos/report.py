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
    ("dead_lettered", "dead-lettered"),
    # Runs beyond the first, in two counts that are never added together: runs explained by a
    # second publish of the id, and redeliveries (the count the promise bounds).
    ("republish_duplicates", "publish duplicates"),
    ("unrecorded_publish_duplicates", "unrecorded publish duplicates"),
    ("duplicates", "redeliveries"),
    ("duplicate_bound", "bound"),
    ("time_to_recover", "time to recover s"),
    ("seconds", "total s"),
    ("drain_seconds", "drain after last publish s"),
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


def cell(row: dict[str, object], key: str) -> str:
    value = row.get(key)
    if value is None:
        # A scenario without heals has no time to recover; rows from before a column existed
        # have nothing to show in it.
        return "-"
    return str(value)


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, key) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows = [json.loads(line) for line in Path(argv[1]).read_text().splitlines() if line.strip()]
    sys.stdout.write(table(rows) + "\n\n" + f"Machine: {machine()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
