"""Every study's `--scale debug` figures equal the ones recorded in figures.json (see record.py)."""

import importlib.util
import json
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("pins_record", HERE / "record.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(record.STUDIES))
def test_debug_figures_unchanged(name):
    stored = json.loads(record.FIGURES.read_text())
    assert name in stored, f"no pinned figures for {name}; run tests/pins/record.py --write"
    assert record.differences(stored[name], record.record([name])[name], name) == []


def test_clock_and_machine_entries_are_left_out():
    kept = record.keep({"val_loss": 1.5, "train_seconds": 3.0, "peak_memory_mib": 9.0, "data": "/a/b/data"})
    assert kept == {"val_loss": 1.5, "data": "data"}
    assert record.differences({"a": [1, 2]}, {"a": [1, 3]}) == ["/a[1]: 2 -> 3"]
