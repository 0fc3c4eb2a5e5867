"""lab choice-points: position classes from entropies, shares, gradients at the trunk output, the command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from multitoken.cli import main
from multitoken.config import ModelConfig
from multitoken.loss import build_targets
from multitoken.model import MultiTokenLM
from multitoken.studies.lab import choice_points as cp


def test_positions_are_marked_by_entropy_now_and_next():
    nan = math.nan
    entropy_BT = torch.tensor([[3.0, 0.1, 3.0, 3.0, 0.5, 0.2, nan]])
    masks = cp.mark_positions(entropy_BT, high=2.0, low=0.5)
    assert masks["choice points"].tolist() == [[True, False, False, True, False, False, False]]
    assert masks["uncertain, no branch"].tolist() == [[False, False, True, False, False, False, False]]
    assert masks["other"].tolist() == [[False, True, False, False, True, False, False]]


def test_shares_sum_to_one_over_the_classes():
    masks = cp.mark_positions(torch.rand(3, 20) * 4, high=2.5, low=1.0)
    got = cp.shares(torch.rand(3, 20), masks)
    assert sum(got.values()) == pytest.approx(1.0)


def test_losses_and_gradients_match_autograd_through_the_whole_model():
    torch.manual_seed(0)
    model = MultiTokenLM(
        ModelConfig(vocab_size=50, dim=32, n_layers=4, n_heads=2, n_future=3, max_seq_len=32)
    )
    tokens_BT = torch.randint(0, 50, (2, 16))
    loss_BTN, grad1_BT, gradn_BT = cp.head_losses_and_grads(model, tokens_BT, sep_id=None)
    # reference: the full forward with a hook on the trunk output
    rope = model.rope_context(tokens_BT, None)
    h_BTD = model.trunk_forward(tokens_BT, rope).detach().requires_grad_(True)
    logits_BTNV = torch.stack([model.logits(model.head_forward(i, h_BTD, rope)) for i in range(3)], dim=2)
    targets_BTN = build_targets(tokens_BT, model.config.head_offsets)
    per_BTN = F.cross_entropy(
        logits_BTNV.permute(0, 3, 1, 2), targets_BTN, reduction="none", ignore_index=-100
    )
    assert torch.allclose(loss_BTN.nan_to_num(), per_BTN, atol=1e-5)
    assert loss_BTN[:, -1, 1:].isnan().all() and loss_BTN[:, :-3].isfinite().all()
    (g1_BTD,) = torch.autograd.grad(per_BTN[..., 0].sum(), h_BTD, retain_graph=True)
    (gn_BTD,) = torch.autograd.grad(per_BTN.sum(), h_BTD)
    assert torch.allclose(grad1_BT, g1_BTD.norm(dim=-1), atol=1e-5)
    assert torch.allclose(gradn_BT, gn_BTD.norm(dim=-1), atol=1e-5)


def test_a_next_token_model_is_measured_as_its_own_baseline():
    torch.manual_seed(0)
    model = MultiTokenLM(
        ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, n_future=1, max_seq_len=32)
    )
    r = cp.measure(model, torch.randint(0, 50, (4, 16)), sep_id=None, quantiles=(0.5, 0.8))
    # every position whose next token and the one after have targets: 14 of 16 per window
    assert r["n_heads"] == 1 and sum(r["counts"].values()) == 4 * 14
    assert r["loss 1-token"] == r["loss next-token"] and r["gradient 1-token"] == r["gradient next-token"]


def test_debug_run_writes_report(tmp_path):
    out = tmp_path / "cp"
    argv = ["lab", "choice-points", "--scale", "debug", "--out", str(out), "--device", "cpu", "--no-progress",
            "--n-future", "3"]  # fmt: skip
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())["results"]["n=3"]
    for key in ("positions", "loss next-token", "loss 3-token", "gradient next-token", "gradient 3-token"):
        assert sum(r[key].values()) == pytest.approx(1.0)
    assert (out / "choice_points.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n-future", "1"], "at least 2"),
        (["--low-quantile", "0.9", "--high-quantile", "0.5"], "low-quantile"),
    ],
)
def test_bad_input_is_one_line_exit_2(flags, message, tmp_path, capsys):
    assert main(["lab", "choice-points", "--scale", "debug", "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
