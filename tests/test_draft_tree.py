"""Tree drafts: greedy output identical to plain greedy, exact cached logits, the tree tables and builders."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_generate import PROMPTS, CharTokenizer, agreeing_model, first_repeat_free_token, serve_as_checkpoint
from test_speculative import chi2_pvalue, decoding_module, exact_laws, peaky, sample_counts

import multitoken.draft_tree as draft_tree_module
from multitoken.draft_tree import (
    DraftTree,
    accept_tree_greedy,
    measure_rank_accuracy,
    sparse_tree,
    tree_candidates,
    tree_positions,
)
from multitoken.errors import UserError
from multitoken.generate import generate
from multitoken.generate_cli import generate_cli
from multitoken.sampling import sample, sampling_probs

from conftest import tiny_model

TREES = {
    2: [DraftTree.from_widths([3]), DraftTree.from_paths([(0,), (2,)])],
    4: [
        DraftTree.from_widths([2, 2, 2]),
        DraftTree.from_widths([4, 2]),
        sparse_tree([[0.6, 0.2, 0.1]] * 3, 7),
    ],
}


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("style", ["transformer", "linear"])
def test_tree_greedy_equals_greedy(style, n):
    random = tiny_model(n, n_future=n, head_style=style).double().eval()
    agreeing = agreeing_model(style, n)
    for model in (random, agreeing):
        for prompts, trees in ((PROMPTS, TREES[n]), (PROMPTS[1:2], TREES[n][:1])):
            plain = generate(model, prompts, 19, speculative=False)
            for tree in trees:
                out = generate(model, prompts, 19, draft_tree=tree)
                assert out.tokens == plain.tokens
                assert out.stats.draft_offsets == list(range(2, tree.depth + 2))
    chain = generate(agreeing, PROMPTS, 19)
    tree = generate(agreeing, PROMPTS, 19, draft_tree=TREES[n][0])
    assert tree.stats.tokens_per_forward > chain.stats.tokens_per_forward  # a tree catches rank-1 drafts
    # An EOS inside an accepted path ends each row where plain greedy ends it.
    eos = first_repeat_free_token(plain.tokens[0])
    plain = generate(agreeing, PROMPTS, 19, speculative=False, eos_id=eos)
    out = generate(agreeing, PROMPTS, 19, draft_tree=TREES[n][0], eos_id=eos)
    assert out.tokens == plain.tokens and out.finish_reasons == plain.finish_reasons
    assert "eos" in out.finish_reasons


@pytest.mark.parametrize("style", ["transformer", "linear"])
def test_tree_logits_equal_full_forward(style):
    """After paths are committed (the only cache copy), each token's logits are those of one full pass."""
    for model in (tiny_model(1, n_future=4, head_style=style).double().eval(), agreeing_model(style, 4)):
        out = generate(model, PROMPTS, 13, draft_tree=DraftTree.from_widths([3, 2, 2]), return_logits=True)
        for prompt, tokens, logits_TV in zip(PROMPTS, out.tokens, out.logits, strict=True):
            full_TV = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1, 0]
            torch.testing.assert_close(logits_TV, full_TV.float(), atol=1e-6, rtol=1e-6)
    assert out.stats.tokens_per_forward > 2  # the agreeing model did accept deep paths


def test_tables_of_a_small_tree():
    tree = DraftTree.from_paths([(1, 0), (0,), (1,), (0, 1)])  # any order; prefixes present
    assert tree.paths == ((0,), (1,), (0, 1), (1, 0)) and tree.n_nodes == 5 and tree.depth == 2
    assert tree.widths() == [2, 2]
    t = tree.tensors("cpu")
    assert t.parent_T.tolist() == [0, 0, 0, 1, 2]
    assert t.depth_T.tolist() == [0, 1, 1, 2, 2]
    assert t.rank_T.tolist() == [0, 0, 1, 1, 0]
    assert t.path_TP.tolist() == [[0, 0, 0], [0, 1, 1], [0, 2, 2], [0, 1, 3], [0, 2, 4]]
    assert [level.tolist() for level in t.levels] == [[1, 2], [3, 4]] and t.top_k == 2
    expected = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]]
    assert t.ancestor_TT.int().tolist() == expected
    assert len(DraftTree.from_widths([4, 2, 1]).paths) == 4 + 8 + 8
    assert DraftTree.parse("2,1").paths == ((0,), (1,), (0, 0), (1, 0))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DraftTree.from_paths([(0, 0)]), "has no parent [0]"),
        (lambda: DraftTree.from_paths([]), "at least one node"),
        (lambda: DraftTree.from_paths([(-1,)]), "ranks >= 0"),
        (lambda: DraftTree.from_widths([2, 0]), "positive integers"),
        (lambda: DraftTree.parse("2,x"), "widths per depth"),
    ],
)
def test_bad_trees_are_user_errors(build, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build()


def test_candidates_and_positions():
    tree = DraftTree.from_paths([(0,), (1,), (1, 0)]).tensors("cpu")
    # Head +2 ranks tokens 7 > 5 > ..., head +3 ranks 3 first.
    draft_logits_BJV = torch.zeros(1, 2, 10)
    draft_logits_BJV[0, 0, 7], draft_logits_BJV[0, 0, 5], draft_logits_BJV[0, 1, 3] = 3.0, 2.0, 1.0
    assert tree_candidates(torch.tensor([9]), draft_logits_BJV, tree).tolist() == [[9, 7, 5, 3]]
    slots_BT, rope_pos_BT, mask_B1TS = tree_positions(torch.tensor([2, 4]), tree, cache_len=9, max_seq_len=6)
    assert slots_BT.tolist() == [[2, 3, 4, 5], [4, 5, 6, 7]]
    assert rope_pos_BT.tolist() == [[2, 3, 3, 4], [4, 5, 5, 5]]  # clamped to the RoPE table
    # Row 0: committed slots 0-1, then node 3 (path (1, 0)) sees the root (2), its parent (4) and itself (5).
    assert mask_B1TS[0, 0].int().tolist() == [
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 1, 1, 0, 0, 0],
    ]


def test_accept_tree_greedy_on_hand_written_logits():
    """Node tokens and the next-token head's argmax at each node decide the accepted path."""
    tree = DraftTree.from_widths([2, 2]).tensors("cpu")  # nodes: root, (0), (1), (0,0), (0,1), (1,0), (1,1)
    tokens_BT = torch.tensor([[9, 1, 2, 3, 4, 5, 6]] * 4)
    argmax = [
        [2, 8, 5, 0, 0, 0, 0],  # root -> 2 = node (1); after (1) -> 5 = node (1,0): two accepted
        [1, 4, 0, 0, 0, 0, 0],  # root -> node (0); after it -> 4 = node (0,1): two accepted
        [7, 0, 0, 0, 0, 0, 0],  # no child matches: none accepted, bonus 7
        [1, 4, 0, 0, 0, 0, 0],  # as row 1 but capped at one draft by the row's budget
    ]
    logits_BTV = F.one_hot(torch.tensor(argmax), 10).float()
    n_acc_B, path_BP, bonus_B = accept_tree_greedy(logits_BTV, tokens_BT, torch.tensor([2, 2, 2, 1]), tree)
    assert n_acc_B.tolist() == [2, 2, 0, 1]
    assert path_BP.tolist() == [[0, 2, 5], [0, 1, 4], [0, 0, 0], [0, 1, 1]]
    assert bonus_B.tolist() == [0, 0, 7, 4]


def test_sparse_tree_keeps_the_most_likely_paths():
    accuracy = [[0.5, 0.2, 0.1], [0.6, 0.3], [0.4, 0.35]]
    tree = sparse_tree(accuracy, 6)

    def prob(path):
        return math.prod(accuracy[d][r] for d, r in enumerate(path))

    every = [p for d in (1, 2, 3) for p in itertools.product(*(range(len(a)) for a in accuracy[:d]))]
    best = sorted(every, key=prob, reverse=True)[:6]
    assert sorted(map(prob, tree.paths)) == pytest.approx(sorted(map(prob, best)))
    assert tree.n_nodes == 7


def test_measure_rank_accuracy_matches_a_direct_count():
    model = tiny_model(3, n_future=3, head_style="linear").eval()
    tokens_BT = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    accuracy = measure_rank_accuracy(model, tokens_BT, depth=2, max_rank=3)
    logits_BTNV = model(tokens_BT)
    for d, offset in enumerate((2, 3)):
        for r in range(3):
            hits = [
                logits_BTNV[b, t, d + 1].argsort(descending=True)[r].item() == tokens_BT[b, t + offset].item()
                for b in range(2)
                for t in range(20 - offset)
            ]
            assert accuracy[d][r] == pytest.approx(sum(hits) / len(hits))


@pytest.mark.parametrize(
    ("model_kwargs", "kwargs", "message"),
    [
        (dict(n_future=3), dict(speculative=False), "drop --no-speculative"),
        (dict(n_future=3, head_style="sequential"), {}, "parallel heads"),
        (dict(n_future=2), {}, "2 deep but this model has 1 drafting heads"),
    ],
)
def test_bad_tree_use_is_one_line(model_kwargs, kwargs, message):
    model = tiny_model(0, **model_kwargs)
    with pytest.raises(UserError, match=message) as info:
        generate(model, [[1, 2]], 4, draft_tree=DraftTree.from_widths([2, 2]), **kwargs)
    assert "\n" not in str(info.value)


def test_tree_wider_than_vocabulary_is_one_line():
    model = tiny_model(0, n_future=2)  # vocabulary of 97
    with pytest.raises(UserError, match="tries 200 drafts at one depth but the vocabulary has only 97"):
        generate(model, [[1, 2]], 4, draft_tree=DraftTree.from_widths([200]))


def test_generate_cli_draft_tree(monkeypatch, capsys, tmp_path):
    model = agreeing_model("linear", 3).float()
    serve_as_checkpoint(monkeypatch, model)
    stats_file = tmp_path / "stats.json"
    args = dict(prompt="bcd", max_new_tokens=12, device="cpu", stats_json=str(stats_file))
    generate_cli("ckpt", draft_tree="3,2", compare_plain=True, **args)
    expected = CharTokenizer().decode(generate(model, [[1, 2, 3]], 12, speculative=False, eos_id=0).tokens[0])
    assert capsys.readouterr().out == "bcd" + expected + "\n"
    record = json.loads(stats_file.read_text())
    assert record["identical_to_plain"] and record["draft_offsets"] == [2, 3]
    assert record["drafts_proposed"][:2] == [3 * record["row_forwards"] - 3, 6 * record["row_forwards"] - 6]
    with pytest.raises(UserError, match="drop --no-speculative"):
        generate_cli("ckpt", draft_tree="3,2", speculative="off", **args)


@pytest.mark.parametrize("style", ["transformer", "linear", "conditioned"])
def test_tree_sampling_law(style):
    """Sampling through a tree draws (x1, x2) and (x2, x3) with plain sampling's exact law."""
    model = peaky(style)
    law12, law23 = exact_laws(model)
    c12, c23, stats = sample_counts(model, True, draft_tree=DraftTree.from_widths([2, 2]))
    assert chi2_pvalue(c12, law12) > 1e-3
    assert chi2_pvalue(c23, law23) > 1e-3
    assert all(r > 0 for r in stats.drafts_reached) and 0 < stats.acceptance_per_head[0] < 1


def test_tree_sampling_law_check_rejects_a_wrong_sampler(monkeypatch):
    """Power check: keeping a child with p(x) instead of the residual's r(x) is caught."""
    real = draft_tree_module.accept_tree_sampled

    def no_residual(logits_BTV, tokens_BT, max_drafts_B, tree, params, generator):
        n_acc_B, path_BP, _ = real(logits_BTV, tokens_BT, max_drafts_B, tree, params, generator)
        p_BV = sampling_probs(logits_BTV, params)[torch.arange(len(path_BP)), path_BP[:, -1]]
        return n_acc_B, path_BP, sample(p_BV, generator)  # bonus from p, ignoring rejected siblings

    monkeypatch.setattr(decoding_module, "accept_tree_sampled", no_residual)
    law12, _ = exact_laws(peaky())
    c12, _, _ = sample_counts(peaky(), True, draft_tree=DraftTree.from_widths([2, 2]))
    assert chi2_pvalue(c12, law12) < 1e-6
