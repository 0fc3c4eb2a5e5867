"""train_variant: in-process and isolated (spawned) training give the same run; errors cross the process."""

import json

import pytest

from multitoken.errors import UserError
from multitoken.studies.runs import RUN_STATS, read_metrics, train_variant

from helpers import debug_config, make_dataset


def losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


def test_isolated_run_equals_in_process_run(tmp_path):
    data = make_dataset(tmp_path)
    here = train_variant(debug_config(data, tmp_path / "here", max_steps=4, save_every=4))
    there = train_variant(debug_config(data, tmp_path / "there", max_steps=4, save_every=4), isolated=True)
    assert losses(there) == pytest.approx(losses(here), rel=1e-6)
    stats = json.loads((there / RUN_STATS).read_text())
    assert stats["peak_memory_mib"] > 0 and stats["train_seconds"] > 0


def test_isolated_run_is_reused_when_complete(tmp_path):
    data = make_dataset(tmp_path)
    cfg = debug_config(data, tmp_path / "run", max_steps=2, save_every=2)
    run_dir = train_variant(cfg, isolated=True)
    mtime = (run_dir / RUN_STATS).stat().st_mtime
    assert train_variant(cfg, isolated=True) == run_dir
    assert (run_dir / RUN_STATS).stat().st_mtime == mtime


def test_user_error_in_the_child_reaches_the_caller(tmp_path):
    cfg = debug_config(tmp_path / "no-such-data", tmp_path / "run", max_steps=2)
    with pytest.raises(UserError, match="no-such-data"):
        train_variant(cfg, isolated=True)
