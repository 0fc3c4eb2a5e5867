import copy

import pytest
import torch
import torch.nn.functional as F

from multitoken.loss import IGNORE_INDEX, build_targets, head_metrics, multi_token_backward

from conftest import HEAD_STYLES, tiny_model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("style", HEAD_STYLES)
@pytest.mark.parametrize("offsets", [None, [1, 2, 4, 8]])
def test_memory_efficient_gradients_equal_naive(style, offsets):
    if style == "sequential" and offsets:
        pytest.skip("sequential heads are consecutive by construction")
    model = tiny_model(n_future=4, head_style=style, head_offsets=offsets, loss_weights=[1, 0.5, 0.3, 0.3])
    reference = copy.deepcopy(model)
    tokens_BT = torch.randint(0, 97, (3, 24))
    tokens_BT[0, 7] = tokens_BT[2, 15] = 5  # document separators
    losses = multi_token_backward(model, tokens_BT, sep_id=5, chunk_size=7)
    reference_losses = multi_token_backward(reference, tokens_BT, sep_id=5, memory_efficient=False)
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    ours, theirs = grads(model), grads(reference)
    assert ours.keys() == theirs.keys() and len(ours) == len(list(model.parameters()))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5, msg=name)


def test_n1_equals_plain_next_token_cross_entropy():
    model = tiny_model(n_future=1)
    reference = copy.deepcopy(model)
    tokens_BT = torch.randint(0, 97, (2, 16))
    (loss,) = multi_token_backward(model, tokens_BT)
    logits_BTV = reference(tokens_BT)[:, :, 0]
    plain = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), tokens_BT[:, 1:].flatten())
    plain.backward()
    assert loss == pytest.approx(plain.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_targets_align_with_offsets_including_far_future():
    tokens_BT = torch.arange(10).unsqueeze(0) + 10
    targets_BTN = build_targets(tokens_BT, [1, 2, 4, 8])
    for i, k in enumerate([1, 2, 4, 8]):
        for t in range(10):
            expected = tokens_BT[0, t + k].item() if t + k < 10 else IGNORE_INDEX
            assert targets_BTN[0, t, i].item() == expected


def test_targets_stop_at_document_separators_and_padding():
    sep, pad = 0, 1
    tokens_BT = torch.tensor([[5, 6, sep, 7, 8, pad, pad]])
    targets_BTN = build_targets(tokens_BT, [1, 2], sep_id=sep, pad_id=pad)
    assert targets_BTN[0, :, 0].tolist() == [6, sep, 7, 8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    # offset 2 from position 1 would cross the separator at 2 into the next document
    assert targets_BTN[0, :, 1].tolist() == [
        sep,
        IGNORE_INDEX,
        8,
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
    ]


def test_zero_weight_heads_get_no_gradient_and_report_nan():
    model = tiny_model(n_future=3, loss_weights=[0, 0, 1])
    losses = multi_token_backward(model, torch.randint(0, 97, (2, 16)))
    assert losses[0] != losses[0] and losses[1] != losses[1] and losses[2] > 0
    assert all(p.grad is None for p in model.heads[0].parameters())
    assert all(p.grad is not None for p in model.heads[2].parameters())


def test_global_normalizer_makes_split_batches_match_whole():
    model = tiny_model(n_future=2)
    split = copy.deepcopy(model)
    tokens_BT = torch.randint(0, 97, (4, 12))
    tokens_BT[1, 3] = 5
    multi_token_backward(model, tokens_BT, sep_id=5)
    counts_N = (build_targets(tokens_BT, [1, 2], sep_id=5) != IGNORE_INDEX).sum(dim=(0, 1))
    for half in (tokens_BT[:2], tokens_BT[2:]):
        multi_token_backward(split, half, sep_id=5, normalizer_N=counts_N)
    for p, q in zip(model.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_head_metrics_match_full_logits():
    model = tiny_model(n_future=2)
    tokens_BT = torch.randint(0, 97, (2, 16))
    loss_N, correct_N, count_N = head_metrics(model, tokens_BT, chunk_size=5)
    logits_BTNV = model(tokens_BT)
    for i, k in enumerate([1, 2]):
        logits = logits_BTNV[:, :-k, i].flatten(0, 1)
        target = tokens_BT[:, k:].flatten()
        assert loss_N[i].item() == pytest.approx(
            F.cross_entropy(logits, target, reduction="sum").item(), rel=1e-5
        )
        assert correct_N[i].item() == (logits.argmax(-1) == target).sum().item()
        assert count_N[i].item() == target.numel()


def reference_after_marker(tokens: list[int], marker: int, sep: int) -> list[bool]:
    """Token t is scored iff, walking back from t-1, a marker comes before any separator."""
    out = []
    for t in range(len(tokens)):
        seen = False
        for s in range(t - 1, -1, -1):
            if tokens[s] == sep:
                break
            if tokens[s] == marker:
                seen = True
                break
        out.append(seen)
    return out


def test_loss_after_a_marker_keeps_the_same_target_tokens_for_every_head():
    marker, sep = 3, 0
    gen = torch.Generator().manual_seed(0)
    tokens_BT = torch.randint(0, 8, (6, 40), generator=gen)  # many markers and separators
    offsets = [1, 2, 4]
    plain_BTN = build_targets(tokens_BT, offsets, sep_id=sep)
    masked_BTN = build_targets(tokens_BT, offsets, sep_id=sep, loss_after_id=marker)
    for b in range(tokens_BT.shape[0]):
        scored = reference_after_marker(tokens_BT[b].tolist(), marker, sep)
        for i, k in enumerate(offsets):
            for t in range(tokens_BT.shape[1] - k):
                keep = scored[t + k] and plain_BTN[b, t, i] != IGNORE_INDEX
                assert masked_BTN[b, t, i] == (plain_BTN[b, t, i] if keep else IGNORE_INDEX)
    assert (masked_BTN != IGNORE_INDEX).sum() > 20  # the check above saw kept targets too


def test_loss_after_a_marker_scores_the_answer_and_its_end():
    prompt, eq, answer, sep = [10, 11, 12], 3, [20, 21], 0
    tokens_BT = torch.tensor([[*prompt, eq, *answer, sep, *prompt, eq, answer[0]]])
    targets_BTN = build_targets(tokens_BT, [1, 2], sep_id=sep, loss_after_id=eq)
    kept = [[t for t in targets_BTN[0, :, i].tolist() if t != IGNORE_INDEX] for i in range(2)]
    assert kept == [[20, 21, sep, 20], [20, 21, sep, 20]]


def test_head_metrics_count_only_the_marked_targets():
    model = tiny_model(n_future=2)
    tokens_BT = torch.randint(8, 97, (2, 16))
    tokens_BT[:, 5] = 7
    _, _, count_N = head_metrics(model, tokens_BT, loss_after_id=7)
    # both heads score the tokens at 6..15: head 1 from positions 5..14, head 2 from 4..13
    assert count_N.tolist() == [2 * 10, 2 * 10]
