"""lab mutual-information: the estimator recovers a Markov chain's closed-form terms; losses decompose."""

from __future__ import annotations

import json

import pytest
import torch

from multitoken.cli import main
from multitoken.config import ModelConfig
from multitoken.studies.lab import mutual_information as mi

# A 4-state chain with strong, unequal dependence between consecutive tokens.
TRANSITION_KK = torch.tensor(
    [
        [0.70, 0.20, 0.05, 0.05],
        [0.10, 0.10, 0.60, 0.20],
        [0.25, 0.25, 0.25, 0.25],
        [0.05, 0.45, 0.05, 0.45],
    ]
)


class MarkovOracle(torch.nn.Module):
    """A stub 2-head LM holding the chain's true conditionals: head 1 = log P, head 2 = log P^2."""

    def __init__(self, transition_KK: torch.Tensor):
        super().__init__()
        self.config = ModelConfig(vocab_size=4, dim=8, n_layers=2, n_heads=1, n_future=2, max_seq_len=4096)
        p_KK = transition_KK.double()
        self.register_buffer("logp_KNV", torch.stack([p_KK.log(), (p_KK @ p_KK).log()], dim=1).float())
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens_BT):
        return self.logp_KNV[tokens_BT]


def test_closed_form_of_the_chain_is_consistent():
    exact = mi.markov_entropies(TRANSITION_KK)
    pi_K = mi.stationary(TRANSITION_KK)
    assert torch.allclose(pi_K @ TRANSITION_KK.double(), pi_K, atol=1e-12)
    # H(X,Y) = H(X) + H(Y|X) = H(Y) + H(X|Y), and 0 <= I <= H(X)
    assert exact["H(X)"] + exact["H(Y|X)"] == pytest.approx(exact["H(Y)"] + exact["H(X|Y)"])
    assert 0.1 < exact["I(X;Y)"] < exact["H(X)"]


def test_estimator_recovers_the_markov_chain_terms_within_one_percent():
    exact = mi.markov_entropies(TRANSITION_KK)
    tokens_BT = mi.sample_markov(TRANSITION_KK, 64, 4000, torch.Generator().manual_seed(0))
    estimate = mi.model_terms(MarkovOracle(TRANSITION_KK), tokens_BT, sep_id=None)
    assert estimate["positions"] == 64 * (4000 - 2)
    for name in mi.TERMS:
        assert estimate[name] == pytest.approx(exact[name], rel=0.01), name


def test_a_model_that_ignores_the_context_measures_no_information():
    # Head 2 = head 1 = the stationary law: H(Y) = H(Y|X) = H(pi), so I(X;Y) = 0 and the terms add up.
    pi_K = mi.stationary(TRANSITION_KK)
    uniform_KK = pi_K.expand(4, 4).float()
    tokens_BT = mi.sample_markov(TRANSITION_KK, 8, 500, torch.Generator().manual_seed(1))
    estimate = mi.model_terms(MarkovOracle(uniform_KK), tokens_BT, sep_id=None)
    assert estimate["I(X;Y)"] == pytest.approx(0.0, abs=0.02)
    assert estimate["H(X|Y)"] == pytest.approx(estimate["H(X)"], abs=0.02)


def test_two_token_loss_counts_the_mutual_information_twice():
    terms = mi.markov_entropies(TRANSITION_KK)
    d = mi.loss_decomposition(terms)
    assert d["next-token"]["total"] == pytest.approx(terms["H(X)"])
    assert d["2-token"]["total"] == pytest.approx(terms["H(X)"] + terms["H(Y)"])
    assert d["2-token"]["I(X;Y) nats"] == pytest.approx(2 * d["next-token"]["I(X;Y) nats"])


def test_a_model_without_a_second_token_head_is_refused():
    oracle = MarkovOracle(TRANSITION_KK)
    oracle.config = ModelConfig(vocab_size=4, dim=8, n_layers=2, n_heads=1, n_future=1, max_seq_len=64)
    with pytest.raises(Exception, match="t\\+1 and t\\+2"):
        mi.model_terms(oracle, torch.zeros(1, 8, dtype=torch.long), sep_id=None)


def test_debug_run_writes_report(tmp_path):
    out = tmp_path / "mi"
    argv = [
        "lab",
        "mutual-information",
        "--scale",
        "debug",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    terms = results["n=2"]["terms_nats"]
    assert terms["H(X|Y)"] + terms["I(X;Y)"] == pytest.approx(terms["H(X)"])
    assert (out / "mutual_information.png").stat().st_size > 1000


def test_bad_scale_is_one_line_exit_2(tmp_path, capsys):
    assert main(["lab", "mutual-information", "--scale", "huge", "--out", str(tmp_path / "r")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
