"""The scripts under benchmarks/ import (their helpers exist) and parse their default arguments."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "common")


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports_and_parses_its_defaults(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    module = importlib.import_module(name)
    assert callable(module.main)
    if hasattr(module, "parse_args"):
        assert module.parse_args() is not None
