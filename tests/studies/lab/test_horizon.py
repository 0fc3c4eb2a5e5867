"""lab horizon: the horizons, a probe that reads what the state holds and invents nothing, the command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from multitoken.cli import main
from multitoken.config import ModelConfig
from multitoken.errors import UserError
from multitoken.model import MultiTokenLM
from multitoken.studies.lab import horizon


def test_horizons_are_powers_of_two_up_to_max_k():
    assert horizon.horizons(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert horizon.horizons(5) == [1, 2, 4, 5]
    with pytest.raises(UserError):
        horizon.horizons(0)


def _model():
    torch.manual_seed(0)
    return MultiTokenLM(ModelConfig(vocab_size=16, dim=32, n_layers=2, n_heads=2, max_seq_len=64)).eval()


def test_probe_reads_a_periodic_stream_and_finds_nothing_in_noise():
    g = torch.Generator().manual_seed(0)
    period_S = torch.randperm(16, generator=g)
    periodic_S = period_S.repeat(256)  # x_{t+16} = x_t, and x_{t+1} follows from x_t
    got = horizon.horizon_losses(_model(), periodic_S[:2048], periodic_S[2048:], 32, [1, 16], steps=200)
    for k in (1, 16):
        assert got[k]["unigram"] == pytest.approx(math.log(16), rel=0.01)
        assert got[k]["probe"] < 0.3 * got[k]["unigram"]
    noise_S = torch.randint(0, 16, (4096,), generator=g)
    got = horizon.horizon_losses(_model(), noise_S[:2048], noise_S[2048:], 32, [1, 16], steps=200)
    for k in (1, 16):
        assert got[k]["probe"] > 0.97 * got[k]["unigram"]


def test_debug_run_writes_report(tmp_path):
    out = tmp_path / "h"
    argv = ["lab", "horizon", "--scale", "debug", "--out", str(out), "--device", "cpu", "--no-progress",
            "--max-k", "8", "--probe-steps", "20", "--tokens", "2000"]  # fmt: skip
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())["results"]["n=1"]
    assert set(r) == {"1", "2", "4", "8"} and all(v["probe"] > 0 for v in r.values())
    assert (out / "horizon.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "flags, message", [(["--max-k", "0"], "max-k"), (["--probe-steps", "0"], "probe-steps")]
)
def test_bad_input_is_one_line_exit_2(flags, message, tmp_path, capsys):
    assert main(["lab", "horizon", "--scale", "debug", "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
