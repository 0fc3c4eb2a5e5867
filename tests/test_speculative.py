"""Draft acceptance on stub models with hand-written logits, and the law of speculative sampling."""

import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from torch import nn

from multitoken.config import ModelConfig
from multitoken.generate import generate
from multitoken.sampling import SamplingParams, sample, sampling_probs
from multitoken.speculative import accept_greedy, draft_depth

from conftest import tiny_model

decoding_module = importlib.import_module("multitoken.decoding")


class OracleStub(nn.Module):
    """MultiTokenLM's decoding interface with hand-written logits.

    Row b's greedy continuation is seq_BS[b]: the next-token head at position t always predicts
    seq_BS[b, t + 1]. Drafting head i at position t predicts seq_BS[b, t + i + 1] when right_BNS[b, i, t],
    else a wrong token. In the sequential style a head is also wrong unless the chain fed it the true
    token at t + i, which checks that drafts are chained through the right positions.
    """

    def __init__(self, seq_BS: torch.Tensor, right_BNS: torch.Tensor, head_style: str = "transformer"):
        super().__init__()
        n_future, S = right_BNS.shape[1], seq_BS.shape[1]
        self.V = int(seq_BS.max()) + 2
        self.config = ModelConfig(
            vocab_size=self.V,
            n_future=n_future,
            n_layers=n_future,
            head_style=head_style,
            dim=8,
            n_heads=2,
            max_seq_len=S,
        )
        self.anchor = nn.Parameter(torch.zeros(()))
        self.seq_BS, self.right_BNS = seq_BS, right_BNS.clone()
        self.right_BNS[:, 0] = True

    def setup_caches(self, batch_size, max_seq_len=None, dtype=None, extra_slots=0):
        # Which text each cache row holds: DecodeBatch.keep_rows moves it as it moves a real KV cache.
        row_B111 = torch.arange(batch_size).view(-1, 1, 1, 1)
        self.row_cache = SimpleNamespace(k_cache_BSKE=row_B111, v_cache_BSKE=row_B111.clone())

    def clear_caches(self):
        pass

    def attention_modules(self):
        return [SimpleNamespace(kv_cache=self.row_cache)]

    def rope_context(self, tokens_BT, input_pos_BT, first_row=0, n_keys=None):
        return SimpleNamespace(input_pos_BT=input_pos_BT, first_row=first_row)

    def trunk_forward(self, tokens_BT, rope):
        B, T = tokens_BT.shape
        rows_B = self.row_cache.k_cache_BSKE[rope.first_row : rope.first_row + B, 0, 0, 0]
        rows_BT = rows_B.unsqueeze(1).expand(B, T)
        # Hidden "state": (row, position, head, chain went wrong).
        return torch.stack(
            [rows_BT, rope.input_pos_BT, torch.zeros_like(rows_BT), torch.zeros_like(rows_BT)], -1
        )

    def head_forward(self, index, h_BTD, rope, next_tokens_BT=None):
        z_BTD = h_BTD.clone()
        z_BTD[..., 2] = index
        if self.config.head_style == "sequential" and index > 0:
            row, pos = h_BTD[..., 0], h_BTD[..., 1].clamp(max=self.seq_BS.shape[1] - 1 - index)
            z_BTD[..., 3] |= (next_tokens_BT != self.seq_BS[row, pos + index]).long()
        return z_BTD

    def drafting_states(self, h_BD, next_B, n):
        return torch.stack([self.head_forward(j, h_BD, None, next_B) for j in range(1, n + 1)], dim=1)

    def logits(self, z_XD):
        row, pos, head, wrong = z_XD.unbind(-1)
        S = self.seq_BS.shape[1]
        pos = pos.clamp(max=S - 1 - self.config.n_future)
        target = self.seq_BS[row, pos + head + 1]
        ok = self.right_BNS[row, head, pos] & (wrong == 0)
        return F.one_hot(torch.where(ok, target, (target + 1) % self.V), self.V).float() * 10


def simulate(seq, right, prompt_len, n_new, depth):
    """Pure-Python blockwise parallel decoding of one OracleStub row: (tokens, forwards, per-head counts)."""
    tokens, forwards = [seq[prompt_len]], 1
    proposed, reached, accepted = [0] * (depth - 1), [0] * (depth - 1), [0] * (depth - 1)
    t = prompt_len  # position of the pending token; drafts came from the heads at t - 1
    while len(tokens) < n_new:
        n_block = min(depth, n_new - len(tokens))
        n_acc = 0
        for j in range(n_block - 1):
            proposed[j] += 1
            if n_acc == j:
                reached[j] += 1
                if right[j + 1][t - 1]:
                    accepted[j] += 1
                    n_acc += 1
        tokens += seq[t + 1 : t + n_acc + 2]
        t += n_acc + 1
        forwards += 1
    return tokens, forwards, (proposed, reached, accepted)


def make_stub(rows, n_future, right_fn, head_style="transformer", S=64):
    seq_BS = torch.randint(2, 20, (rows, S), generator=torch.Generator().manual_seed(0))
    right_BNS = torch.zeros(rows, n_future, S, dtype=torch.bool)
    for b in range(rows):
        for i in range(n_future):
            for t in range(S):
                right_BNS[b, i, t] = right_fn(b, i, t)
    return OracleStub(seq_BS, right_BNS, head_style)


@pytest.mark.parametrize("style", ["transformer", "sequential"])
def test_never_always_sometimes_accepted(style):
    never = make_stub(1, 3, lambda b, i, t: False, style)
    prompt = [never.seq_BS[0, :3].tolist()]
    out = generate(never, prompt, 7, speculative=True)
    assert out.tokens == [never.seq_BS[0, 3:10].tolist()]
    assert out.stats.forward_passes == 7 and out.stats.tokens_per_forward == 1.0
    assert out.stats.drafts_proposed == [5, 4] and out.stats.drafts_reached == [5, 0]
    assert out.stats.acceptance_per_head == [0.0, 0.0]

    always = make_stub(1, 3, lambda b, i, t: True, style)
    out = generate(always, prompt, 7, speculative=True)
    assert out.tokens == [always.seq_BS[0, 3:10].tolist()]
    assert out.stats.forward_passes == 3 and out.stats.tokens_per_forward == pytest.approx(7 / 3)
    assert out.stats.acceptance_per_head == [1.0, 1.0]

    second_only = make_stub(1, 3, lambda b, i, t: i == 1, style)  # offset-2 head right, offset-3 wrong
    out = generate(second_only, prompt, 9, speculative=True)
    assert out.tokens == [second_only.seq_BS[0, 3:12].tolist()]
    assert out.stats.forward_passes == 5 and out.stats.tokens_per_forward == pytest.approx(9 / 5)
    assert out.stats.drafts_reached == [4, 3] and out.stats.drafts_accepted == [4, 0]
    assert out.stats.acceptance_per_head == [1.0, 0.0]


@pytest.mark.parametrize("style", ["transformer", "sequential"])
def test_random_acceptance_matches_reference_simulation(style):
    """Rows with different prompt lengths accept different counts; stats match a pure-Python decoder."""
    gen = torch.Generator().manual_seed(1)
    table = torch.rand(4, 4, 64, generator=gen) < 0.6
    stub = make_stub(4, 4, lambda b, i, t: bool(table[b, i, t]), style)
    lengths, n_new = [3, 7, 1, 5], 13
    out = generate(
        stub, [stub.seq_BS[b, :L].tolist() for b, L in enumerate(lengths)], n_new, speculative=True
    )
    totals = [[0] * 3 for _ in range(3)]
    row_forwards = 0
    for b, L in enumerate(lengths):
        right = stub.right_BNS[b].tolist()
        tokens, forwards, counts = simulate(stub.seq_BS[b].tolist(), right, L, n_new, 4)
        assert out.tokens[b] == tokens
        row_forwards += forwards
        for total, count in zip(totals, counts, strict=True):
            for j in range(3):
                total[j] += count[j]
    assert out.stats.row_forwards == row_forwards
    assert [out.stats.drafts_proposed, out.stats.drafts_reached, out.stats.drafts_accepted] == totals
    assert out.stats.tokens_per_forward == pytest.approx(4 * n_new / row_forwards)
    assert 1.2 < out.stats.tokens_per_forward < 4


def test_eos_inside_accepted_block_and_early_finishing_rows():
    stub = make_stub(3, 4, lambda b, i, t: True)
    stub.seq_BS[0, 6] = 1  # EOS as the 2nd token of row 0's first verified block
    out = generate(stub, [stub.seq_BS[b, :3].tolist() for b in range(3)], 10, eos_id=1, speculative=True)
    assert out.tokens[0] == stub.seq_BS[0, 3:6].tolist() and out.finish_reasons[0] == "eos"
    for b in (1, 2):
        if 1 in stub.seq_BS[b, 3:13].tolist():
            continue
        assert out.tokens[b] == stub.seq_BS[b, 3:13].tolist() and out.finish_reasons[b] == "length"
    assert out.stats.new_tokens == sum(len(t) for t in out.tokens) + 1


def test_draft_depth_uses_contiguous_offsets_only():
    assert draft_depth(ModelConfig(n_future=4, head_offsets=[1, 2, 4, 8], n_layers=6)) == 2
    assert draft_depth(ModelConfig(n_future=3, n_layers=6)) == 3
    assert draft_depth(ModelConfig(n_future=1)) == 1


def test_accept_greedy_counts_prefix_and_respects_block_length():
    logits_BTV = F.one_hot(torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]]), 10).float()
    drafts_BJ = torch.tensor([[5, 6, 0], [5, 6, 7]])
    n_acc_B, bonus_B = accept_greedy(logits_BTV, drafts_BJ, torch.tensor([3, 1]))
    assert n_acc_B.tolist() == [2, 1] and bonus_B.tolist() == [7, 6]


def test_sampling_probs_top_k_top_p():
    logits_V = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = sampling_probs(logits_V, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(p, torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    p = sampling_probs(logits_V, SamplingParams(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    p = sampling_probs(logits_V, SamplingParams(temperature=1.0, top_p=0.01))
    torch.testing.assert_close(p, torch.tensor([1.0, 0, 0, 0, 0]))
    assert sampling_probs(logits_V, SamplingParams()).tolist() == [1.0, 0, 0, 0, 0]


# ---- speculative sampling has the law of plain sampling ----------------------------------------------

PARAMS = SamplingParams(temperature=0.9, top_k=5, top_p=0.95)
PROMPT = [3, 1, 4]


_PEAKY = {}


def peaky(style="transformer"):
    """Vocabulary of 6 and logits large enough that drafts and targets differ a lot."""
    if style not in _PEAKY:
        model = tiny_model(
            3, vocab_size=6, n_future=3, head_style=style, dim=32, n_heads=2, n_kv_heads=1, n_layers=4
        )
        with torch.no_grad():
            model.output.weight.mul_(5)
        _PEAKY[style] = model.eval()
    return _PEAKY[style]


@torch.no_grad()
def exact_laws(model):
    """Exact P(x1, x2) and P(x2, x3) of plain sampling, from full forwards."""
    V = model.config.vocab_size
    p1_V = sampling_probs(model(torch.tensor([PROMPT]))[0, -1, 0], PARAMS)
    pairs_M2 = torch.cartesian_prod(torch.arange(V), torch.arange(V))
    seqs_MT = torch.cat([torch.tensor(PROMPT).expand(len(pairs_M2), -1), pairs_M2], dim=1)
    logits_MTNV = model(seqs_MT)
    p2_VV = sampling_probs(logits_MTNV[::V, -2, 0], PARAMS)  # P(x2 | x1), rows x1
    p3_VVV = sampling_probs(logits_MTNV[:, -1, 0], PARAMS).view(V, V, V)  # P(x3 | x1, x2)
    law12_VV = p1_V[:, None] * p2_VV
    law23_VV = (law12_VV[:, :, None] * p3_VVV).sum(0)
    return law12_VV.double(), law23_VV.double()


def chi2_pvalue(counts_VV, law_VV):
    n = counts_VV.sum()
    expected = (law_VV / law_VV.sum() * n).flatten()
    observed = counts_VV.flatten().double()
    if observed[expected == 0].sum() > 0:
        return 0.0  # sampled a pair of probability zero
    big = expected >= 5
    f_exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    f_obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    if f_exp[-1] < 5:  # fold a tiny remainder into the last bin
        f_exp, f_obs = f_exp[:-1], f_obs[:-1]
        f_obs[-1] += observed[~big].sum()
        f_exp[-1] += expected[~big].sum()
    return chisquare(f_obs.numpy(), f_exp.numpy()).pvalue


def sample_counts(model, speculative, n=4000, seed=0, **kwargs):
    V = model.config.vocab_size
    out = generate(
        model,
        [PROMPT] * n,
        4,  # tokens 2 and 3 both come from one verified block of two drafts
        temperature=PARAMS.temperature,
        top_k=PARAMS.top_k,
        top_p=PARAMS.top_p,
        speculative=speculative,
        seed=seed,
        **kwargs,
    )
    seqs = torch.tensor(out.tokens)
    c12 = torch.bincount(seqs[:, 0] * V + seqs[:, 1], minlength=V * V).view(V, V)
    c23 = torch.bincount(seqs[:, 1] * V + seqs[:, 2], minlength=V * V).view(V, V)
    return c12, c23, out.stats


@pytest.mark.parametrize(
    ("style", "speculative"),
    [
        ("transformer", False),
        ("transformer", True),
        ("sequential", True),
        ("linear", True),
        ("conditioned", True),
    ],
)
def test_sampling_law(style, speculative):
    model = peaky(style)
    law12, law23 = exact_laws(model)
    c12, c23, stats = sample_counts(model, speculative)
    assert chi2_pvalue(c12, law12) > 1e-3
    assert chi2_pvalue(c23, law23) > 1e-3
    if speculative:  # both drafting heads were judged, and some but not all drafts accepted
        assert all(r > 0 for r in stats.drafts_reached)
        assert 0 < stats.acceptance_per_head[0] < 1


def test_sampling_law_check_rejects_a_wrong_sampler(monkeypatch):
    """Power check: a sampler that always keeps drafts is caught by the same test."""

    def accept_all(logits_BTV, drafts_BJ, q_BJV, n_drafts_B, params, generator):
        if n_drafts_B is None:
            n_drafts_B = torch.full((len(drafts_BJ),), drafts_BJ.shape[1])
        p_BTV = sampling_probs(logits_BTV, params)
        p_next_BV = p_BTV[torch.arange(len(n_drafts_B)), n_drafts_B]
        return n_drafts_B, sample(p_next_BV, generator)

    monkeypatch.setattr(decoding_module, "accept_sampled", accept_all)
    law12, _ = exact_laws(peaky())
    c12, _, _ = sample_counts(peaky(), True)
    assert chi2_pvalue(c12, law12) < 1e-6


def test_same_seed_same_samples():
    peaky_model = peaky()
    kwargs = dict(temperature=1.0, seed=7)
    a = generate(peaky_model, [PROMPT] * 4, 10, **kwargs)
    b = generate(peaky_model, [PROMPT] * 4, 10, **kwargs)
    c = generate(peaky_model, [PROMPT] * 4, 10, temperature=1.0, seed=8)
    assert a.tokens == b.tokens != c.tokens
