"""Batch inputs and handlers as plain functions: no broker, no Redis."""

from __future__ import annotations

import random
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from tasks.batch import handlers, inputs
from tasks.batch.handlers import Aggregate, ItemError, WriteFiles


def test_csv_rows_keep_their_line_numbers_and_ragged_rows_become_failed_items(
    tmp_path: Path,
) -> None:
    path = tmp_path / "in.csv"
    path.write_text('key,value\na,1\n\nb,"multi\nline"\nc,3,4\nd\n')
    entries = list(inputs.read_csv(path))
    assert [(e.line, e.error is None) for e in entries] == [
        (2, True),
        (4, True),
        (6, False),
        (7, False),
    ]
    assert entries[1].item == {"key": "b", "value": "multi\nline"}
    assert entries[2].error == "malformed row: 3 fields, the header has 2"


def test_jsonl_lines_that_are_not_json_become_failed_items(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n\nnot json\n[2]\n')
    entries = list(inputs.read_jsonl(path))
    assert [(e.line, e.item if e.error is None else None) for e in entries] == [
        (1, {"a": 1}),
        (3, None),
        (4, [2]),
    ]
    assert entries[1].error is not None and entries[1].error.startswith("malformed JSON")


def test_the_file_format_comes_from_the_suffix_unless_given() -> None:
    assert inputs.file_format("x.CSV") == "csv"
    assert inputs.file_format("x.ndjson") == "jsonl"
    assert inputs.file_format("x.txt", "csv") == "csv"
    with pytest.raises(ValueError, match="cannot tell the format"):
        inputs.file_format("x.txt")


def test_the_aggregate_is_the_same_however_the_items_are_chunked() -> None:
    rng = random.Random(1)
    rows = [
        {"key": rng.choice("abc"), "value": f"{rng.randrange(-(10**6), 10**6) / 1000:.3f}"}
        for _ in range(5_000)
    ]
    handler = Aggregate({})

    def run(chunk: int) -> object:
        values = [handler.process(row, "k") for row in rows]
        partials = [handler.combine(values[i : i + chunk]) for i in range(0, len(rows), chunk)]
        rng.shuffle(partials)
        return handler.reduce(partials)

    whole = run(len(rows))
    assert run(7) == whole and run(1_000) == whole
    total = sum(Decimal(r["value"]) for r in rows if r["key"] == "a")
    assert whole["a"]["sum"] == str(total)  # type: ignore[index]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"key": "a", "value": "x"}, "'value' is not a number: 'x'"),
        ({"key": "a", "value": "NaN"}, "not a finite number"),
        ({"key": "", "value": "1"}, "missing value in field 'key'"),
        ({"key": "a"}, "missing value in field 'value'"),
        ("a,1", "expected a record"),
    ],
)
def test_the_aggregate_rejects_bad_records_with_a_reason(row: object, reason: str) -> None:
    with pytest.raises(ItemError, match=reason):
        Aggregate({}).process(row, "k")


def test_write_files_writes_each_key_once(tmp_path: Path) -> None:
    handler = WriteFiles({"directory": str(tmp_path)})
    assert handler.process({"n": 1}, "b:1") is True
    assert handler.process({"n": 2}, "b:1") is False
    assert (tmp_path / "b-1.json").read_text() == '{"n": 1}'
    assert handler.combine([True, False, True]) == {"written": 2, "existing": 1}


def test_an_unknown_handler_names_the_known_ones() -> None:
    with pytest.raises(LookupError, match=r"registered: .*aggregate"):
        handlers.get("nope")


def test_the_batch_stages_import_neither_the_tasks_module_nor_the_api() -> None:
    # The pipeline inputs -> chunking -> publishing -> api has no cycle: the Celery tasks
    # module is handed down, never imported below the api, and never imports the api.
    code = (
        "import sys\n"
        "import tasks.batch.inputs, tasks.batch.chunking, tasks.batch.publishing\n"
        "assert 'tasks.batch.tasks' not in sys.modules, 'a stage imported the tasks module'\n"
        "import tasks.batch.tasks\n"
        "assert 'tasks.batch.api' not in sys.modules, 'the tasks module imported the api'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_aggregate_checks_its_fields_against_a_csv_header() -> None:
    assert Aggregate.check_input({}, ["region", "amount"]) == {
        "key_field": "region",
        "value_field": "amount",
    }
    assert Aggregate.check_input({}, ["value", "key", "note"]) == {
        "key_field": "key",
        "value_field": "value",
    }
    assert Aggregate.check_input({"key_field": "x"}, None) == {"key_field": "x"}  # no header
    with pytest.raises(ValueError, match=r"unknown field 'regoin' \(option key_field\); .*: a, b"):
        Aggregate.check_input({"key_field": "regoin"}, ["a", "b"])
    with pytest.raises(ValueError, match=r"no column 'key' .*: id, region, amount"):
        Aggregate.check_input({}, ["id", "region", "amount"])


def test_write_files_leaves_its_directory_to_the_first_item_it_writes(tmp_path: Path) -> None:
    target = tmp_path / "later"
    handler = WriteFiles({"directory": str(target)})
    assert not target.exists()
    handler.process({"n": 1}, "b:1")
    assert (target / "b-1.json").exists()
