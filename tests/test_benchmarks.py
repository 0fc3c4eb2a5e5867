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


def test_step_arithmetic_records_the_rows_each_plan_runs(monkeypatch):
    """The recorded arithmetic of a chain step of k drafts: the trunk's matmuls on k + 1 rows, the
    unembedding on the k drafts and then on the k + 1 verified positions."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import torch

    from multitoken.config import preset_config
    from multitoken.model import MultiTokenLM

    step_arithmetic = importlib.import_module("step_arithmetic")
    torch.manual_seed(0)
    model = MultiTokenLM(preset_config("debug", vocab_size=64, n_future=3, head_style="linear")).eval()
    calls = step_arithmetic.record_steps(model, batch_size=1, position=32)

    def rows_through(plan: str, weight: torch.Tensor) -> list[int]:
        return [
            args[0].shape[0]
            for func, args, _ in calls[plan]
            if func is torch.ops.aten.mm.default and args[1].data_ptr() == weight.data_ptr()
        ]

    assert list(calls) == ["plain", "chain1", "chain2"]
    for k, plan in enumerate(calls):
        assert rows_through(plan, model.trunk[0].attn.wq.weight) == [k + 1]
        assert rows_through(plan, model.output.weight) == ([k] if k else []) + [k + 1]
