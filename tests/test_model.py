import pytest
import torch

from multitoken.model import shift_left

from conftest import HEAD_STYLES, tiny_model


@pytest.mark.parametrize("style", HEAD_STYLES)
def test_logits_shape_and_block_count(style):
    model = tiny_model(n_future=4, head_style=style)
    tokens_BT = torch.randint(0, 97, (2, 10))
    assert model(tokens_BT).shape == (2, 10, 4, 97)
    blocks = sum(1 for m in model.modules() if type(m).__name__ == "Block")
    assert blocks == 6  # parameter-matched: n_layers blocks in total


@pytest.mark.parametrize("style", HEAD_STYLES)
def test_heads_are_causal(style):
    """Changing a later token never changes earlier positions' logits, for any head."""
    model = tiny_model(n_future=3, head_style=style)
    tokens_BT = torch.randint(0, 97, (1, 12))
    changed_BT = tokens_BT.clone()
    changed_BT[0, 8] = (tokens_BT[0, 8] + 1) % 97
    base, other = model(tokens_BT), model(changed_BT)
    if style == "sequential":
        # depth k at position t reads token t + k, so it may see up to position 8 - k.
        for k in range(3):
            torch.testing.assert_close(base[:, : 8 - k, k], other[:, : 8 - k, k])
    elif style == "conditioned":
        # the drafting heads at position t read token t + 1: position 7's see the change, and use it.
        torch.testing.assert_close(base[:, :8, 0], other[:, :8, 0])
        torch.testing.assert_close(base[:, :7, 1:], other[:, :7, 1:])
        assert not torch.allclose(base[:, 7, 1:], other[:, 7, 1:])
    else:
        torch.testing.assert_close(base[:, :8], other[:, :8])
    assert not torch.allclose(base[:, 8:, 0], other[:, 8:, 0])


@pytest.mark.parametrize("style", HEAD_STYLES)
def test_cached_forward_equals_full_forward(style):
    """Prefill then token-by-token decoding through the KV cache gives the full pass's logits."""
    model = tiny_model(n_future=2, head_style=style).eval()
    tokens_BT = torch.randint(0, 97, (2, 16))
    full_BTNV = model(tokens_BT)
    model.setup_caches(batch_size=2, max_seq_len=32)
    pos_BT = torch.arange(10).expand(2, 10)
    prefill = model(tokens_BT[:, :10], input_pos_BT=pos_BT)
    # Only the next-token head is comparable position by position for sequential (needs future tokens).
    torch.testing.assert_close(prefill[:, :, 0], full_BTNV[:, :10, 0], atol=1e-5, rtol=1e-5)
    for t in range(10, 16):
        step = model(tokens_BT[:, t : t + 1], input_pos_BT=torch.full((2, 1), t))
        torch.testing.assert_close(step[:, 0, 0], full_BTNV[:, t, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", HEAD_STYLES)
def test_attention_over_the_used_slots_equals_attention_over_the_whole_cache(style):
    """n_keys (as decoding passes it: beyond every query's position) changes cost, not values."""
    model = tiny_model(n_future=2, head_style=style).eval()
    tokens_BT = torch.randint(0, 97, (2, 14))
    model.setup_caches(batch_size=2, max_seq_len=48)
    pos_BT = torch.tensor([list(range(10)), [*range(6), 47, 47, 47, 47]])  # row 1 padded to the spare slot
    block_BT, at_BT = tokens_BT[:, 10:], torch.tensor([[10, 11, 12, 13], [6, 7, 8, 9]])
    with torch.no_grad():
        model.trunk_forward(tokens_BT[:, :10], model.rope_context(tokens_BT[:, :10], pos_BT))
        outputs = []
        for n_keys in (None, 14):  # the cache write is the same both times
            rope = model.rope_context(block_BT, at_BT, n_keys=n_keys)
            h_BTD = model.trunk_forward(block_BT, rope)
            outputs.append(model.logits(model.head_forward(0, h_BTD, rope)))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-6)
    assert rope.mask_B1TS.shape[-1] == 14


def test_cache_rows_keep_their_own_positions():
    """Rows at different positions in one batch match each row decoded alone."""
    model = tiny_model(n_future=1).eval()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 5))
    model.setup_caches(batch_size=2, max_seq_len=16)
    padded_BT = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)])
    out = model(padded_BT, input_pos_BT=torch.arange(9).expand(2, 9))
    model.clear_caches()
    torch.testing.assert_close(out[0, :, 0], model(a)[0, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :5, 0], model(b)[0, :, 0], atol=1e-5, rtol=1e-5)


def test_shift_left():
    tokens_BT = torch.tensor([[1, 2, 3, 4]])
    assert shift_left(tokens_BT, 2).tolist() == [[3, 4, 0, 0]]


def test_tied_embeddings_share_storage():
    model = tiny_model(tie_embeddings=True)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


@pytest.mark.parametrize("masked", [False, True])
def test_expanded_kv_heads_equal_grouped_attention(masked):
    """Repeating each KV head for its query heads (the CUDA path under a mask) changes nothing."""
    from multitoken.model import attend

    q_BHTE, k_BKSE, v_BKSE = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask_B1TS = torch.rand(2, 1, 5, 5) > 0.3 if masked else None
    if masked:
        mask_B1TS[..., 0] = True  # every query sees at least one key
    grouped = attend(q_BHTE, k_BKSE, v_BKSE, mask_B1TS, expand_kv=False)
    expanded = attend(q_BHTE, k_BKSE, v_BKSE, mask_B1TS, expand_kv=True)
    torch.testing.assert_close(expanded, grouped, atol=1e-6, rtol=1e-6)
    # Query heads 0-2 share KV head 0: against attention with that head alone.
    alone = attend(q_BHTE[:, :3], k_BKSE[:, :1], v_BKSE[:, :1], mask_B1TS, expand_kv=False)
    torch.testing.assert_close(grouped[:, :3], alone, atol=1e-6, rtol=1e-6)
