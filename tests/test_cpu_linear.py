"""oneDNN's packed linear for blocks of rows on a CPU: equal to F.linear, only where it pays, safe to train."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multitoken import cpu_linear
from multitoken.cpu_linear import (
    ROUTED_MIN_WEIGHTS,
    PackedLinearForward,
    onednn_available,
    pack_linears,
    unpack_linears,
)
from multitoken.generate import generate

from conftest import tiny_model

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")

VOCAB = ROUTED_MIN_WEIGHTS // 64
"""A vocabulary whose unembedding at width 64 is large enough to be routed."""


def packed(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    linear.forward = PackedLinearForward(linear)
    return linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8, 64])
def test_packed_forward_equals_f_linear(rows, bias):
    linear = packed(64, VOCAB, bias)
    linear.forward.route(True)  # oneDNN at every row count
    x_BTD = torch.randn(2, rows, 64)
    with torch.no_grad():
        expected = F.linear(x_BTD, linear.weight, linear.bias)
        torch.testing.assert_close(linear(x_BTD), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            linear(x_BTD.transpose(0, 1)), expected.transpose(0, 1), rtol=1e-5, atol=1e-5
        )
        assert linear.forward._packed is not None  # it really took the packed path


def test_rows_below_the_rule_take_mkl_exactly():
    linear = packed(64, 64)  # a trunk matrix: oneDNN only from ONEDNN_MIN_OUTPUTS / 64 rows
    x_BTD = torch.randn(1, 4, 64)
    with torch.no_grad():
        assert torch.equal(linear(x_BTD), F.linear(x_BTD, linear.weight, linear.bias))
    assert linear.forward._packed is None
    wide = packed(64, VOCAB)
    wide.forward.route(False)
    x_BTD = torch.randn(4, 8, 64)
    with torch.no_grad():
        assert torch.equal(wide(x_BTD), F.linear(x_BTD, wide.weight, wide.bias))


def test_training_takes_autograd_and_a_changed_weight_is_packed_again():
    linear = packed(64, VOCAB)
    linear.forward.route(True)
    x_BD = torch.randn(4, 64)
    linear(x_BD).square().sum().backward()  # with autograd: F.linear, gradients flow
    assert linear.weight.grad is not None and linear.forward._packed is None
    with torch.no_grad():
        before = linear(x_BD)
        linear.weight.mul_(2)  # an optimizer step, in place
        torch.testing.assert_close(
            linear(x_BD), 2 * (before - linear.bias) + linear.bias, rtol=1e-5, atol=1e-5
        )


def test_pack_linears_packs_what_pays_and_unpacks():
    model = tiny_model(vocab_size=VOCAB, dim=64)

    def packed_names():
        return {
            n for n, m in model.named_modules() if isinstance(m.__dict__.get("forward"), PackedLinearForward)
        }

    routed = pack_linears(model, max_rows=1)  # one row a call: only the unembedding
    assert packed_names() == {"output"} and [r.linear for r in routed] == [model.output]
    pack_linears(model, max_rows=128)  # 128 rows: the trunk's matrices too
    assert {"output", "trunk.0.attn.wq", "trunk.0.mlp.w1"} <= packed_names()
    pack_linears(model, max_rows=1)
    assert packed_names() == {"output"}
    unpack_linears(model)
    assert packed_names() == set()
    assert pack_linears(model, max_rows=1) == routed  # the same packed copy comes back
    unpack_linears(model, keep_packed=False)
    assert pack_linears(model, max_rows=1) != routed


def test_a_deep_copy_of_a_packed_model_follows_its_own_weights():
    model = tiny_model(vocab_size=VOCAB).eval()
    pack_linears(model, max_rows=64)
    tokens_BT = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        before = model.next_token_logits(tokens_BT)
        twin = copy.deepcopy(model)
        twin.output.weight.zero_()
        assert twin.next_token_logits(tokens_BT).abs().max() == 0
        torch.testing.assert_close(model.next_token_logits(tokens_BT), before)


@pytest.mark.parametrize("style", ["linear", "transformer"])
def test_speculative_greedy_equals_plain_with_packed_blocks(style, monkeypatch):
    """float32 and a vocabulary large enough that decoding packs the unembedding (and the trunk for big blocks)."""
    packed_shapes = set()

    pack_weight = cpu_linear.pack_weight

    unembedding_packs = [0]

    def spy(weight):
        packed_shapes.add(tuple(weight.shape))
        unembedding_packs[0] += weight.shape[0] == VOCAB
        return pack_weight(weight)

    monkeypatch.setattr(cpu_linear, "pack_weight", spy)
    model = tiny_model(2, n_future=4, head_style=style, vocab_size=VOCAB, dim=192, n_layers=4).eval()
    prompts = [[(7 * b + 3 * i) % 2000 + 1 for i in range(5 + b)] for b in range(8)]
    plain = generate(model, prompts, 24, speculative=False)
    for speculative in (True, None):
        assert generate(model, prompts, 24, speculative=speculative).tokens == plain.tokens
    single = generate(model, prompts[:1], 24, speculative=True)
    assert single.tokens == plain.tokens[:1]
    assert unembedding_packs == [1]  # packed once, kept between generate() calls
    assert not any(isinstance(m.__dict__.get("forward"), PackedLinearForward) for m in model.modules())
    assert (VOCAB, 192) in packed_shapes  # the unembedding took oneDNN
    assert (192, 192) in packed_shapes  # and the trunk's, on 8 rows of 4 tokens or more
