import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from multitoken import from_hf_llama
from multitoken.interop import to_hf_llama

from conftest import tiny_model


def hf_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # make norms non-trivial so a mis-mapped norm can't hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_n1_model_is_a_plain_llama(tied):
    hf = hf_llama(tied)
    ours = from_hf_llama(hf).eval()
    tokens_BT = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        expected = hf(tokens_BT).logits
        got = ours(tokens_BT)[:, :, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert ours.config.tie_embeddings == tied


def test_extra_heads_start_from_the_last_layer_and_next_token_path_is_unchanged():
    hf = hf_llama(False)
    ours = from_hf_llama(hf, n_future=3).eval()
    tokens_BT = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        logits = ours(tokens_BT)
        torch.testing.assert_close(logits[:, :, 0], hf(tokens_BT).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, :, 1], logits[:, :, 0])  # copies of the same layer


@pytest.mark.parametrize("style", ["linear", "medusa", "conditioned"])
def test_new_residual_heads_start_as_the_next_token_head(style):
    """x + SiLU(0) = x: every new head's logits are the imported model's (medusa: with zero bias too)."""
    hf = hf_llama(False)
    ours = from_hf_llama(hf, n_future=3, head_style=style).eval()
    tokens_BT = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        logits = ours(tokens_BT)
        torch.testing.assert_close(logits[:, :, 0], hf(tokens_BT).logits, atol=1e-5, rtol=1e-5)
    for i in (1, 2):
        torch.testing.assert_close(logits[:, :, i], logits[:, :, 0])


def test_an_activation_other_than_silu_is_refused():
    from multitoken.errors import UserError

    hf = hf_llama(tied=False)
    hf.config.hidden_act = "gelu"
    with pytest.raises(UserError, match="hidden_act 'gelu' is not supported"):
        from_hf_llama(hf)


def test_round_trip_to_hf(tmp_path):
    hf = hf_llama(False)
    hf.save_pretrained(tmp_path)
    ours = from_hf_llama(tmp_path)
    back = to_hf_llama(ours).eval()
    tokens_BT = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens_BT).logits, hf(tokens_BT).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["transformer", "linear", "sequential", "conditioned"])
def test_next_token_path_of_every_head_style_exports(style):
    ours = tiny_model(2, n_future=3, head_style=style).eval()
    hf = to_hf_llama(ours).eval()
    assert hf.config.num_hidden_layers == ours.config.n_trunk_layers + (style == "transformer")
    tokens_BT = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens_BT).logits, ours(tokens_BT)[:, :, 0], atol=1e-5, rtol=1e-5)
