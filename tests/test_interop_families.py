"""Import of every supported `transformers` family: logits equal transformers' own (float32)."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

from multitoken import from_hf, to_hf
from multitoken.errors import UserError

SHAPE = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 50000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so all three frequency bands occur at head_dim 16
}
FAMILIES = {
    "llama3": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**SHAPE, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)
    ),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**SHAPE, sliding_window=None, head_dim=24)  # head_dim * heads != width
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True)
    ),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**SHAPE, head_dim=32, tie_word_embeddings=False)
    ),
}


def random_hf(family: str):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped one cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_directory_gives_transformers_logits_and_exports_back(family, tmp_path):
    hf = random_hf(family)
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    tokens_BT = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        expected = hf(tokens_BT).logits
        torch.testing.assert_close(ours(tokens_BT)[:, :, 0], expected, atol=1e-4, rtol=1e-4)
        back = to_hf(ours)
        torch.testing.assert_close(back(tokens_BT).logits, expected, atol=1e-4, rtol=1e-4)
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings


def test_llama3_scaling_changes_the_logits_so_the_test_above_can_fail(tmp_path):
    hf = random_hf("llama3")
    ours = from_hf(hf)
    plain = from_hf(hf)
    plain.config.rope_scaling = None
    plain.init_buffers()
    tokens_BT = torch.randint(0, 101, (1, 40))
    with torch.no_grad():
        assert not torch.allclose(ours(tokens_BT), plain(tokens_BT), atol=1e-3)


def test_a_bfloat16_import_keeps_bfloat16_weights(tmp_path):
    random_hf("qwen2").save_pretrained(tmp_path)
    ours = from_hf(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}


def test_a_sharded_directory_imports_like_one_file(tmp_path):
    hf = random_hf("qwen3")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = from_hf(tmp_path, n_future=2, head_style="linear")
    tokens_BT = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        logits = ours(tokens_BT)
        torch.testing.assert_close(logits[:, :, 0], hf(tokens_BT).logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[:, :, 1], logits[:, :, 0])  # a new linear head is the identity


PEAK_SCRIPT = """
import sys, torch, transformers, safetensors.torch  # libraries loaded before the window
from multitoken import from_hf
from multitoken.studies.measure import current_memory_mib, peak_memory_mib, reset_peak_memory
from_hf(sys.argv[2])  # a tiny import first, so the lazy imports of the importer are outside the window too
cpu = torch.device("cpu")
reset_peak_memory(cpu)
base = current_memory_mib(cpu)
model = from_hf(sys.argv[1])
print(peak_memory_mib(cpu) - base, sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc")
def test_a_sharded_import_holds_the_model_once(tmp_path):
    """A fresh process imports a 40 MB model from 4 MB shards: its resident size grows by about one copy."""
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "big", max_shard_size="4MB")
    random_hf("qwen2").save_pretrained(tmp_path / "tiny")
    argv = [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "big"), str(tmp_path / "tiny")]
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    peak_mib, model_mib = map(float, out.stdout.split())
    assert model_mib > 35 and peak_mib < 1.5 * model_mib  # two full copies would be 2x


def write_config(path, **values):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(values))


@pytest.mark.parametrize(
    ("family", "change", "message"),
    [
        ("mistral", {"sliding_window": 8}, "sliding-window attention"),
        ("llama3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "'yarn'"),
        ("llama3", {"attention_bias": True}, "attention biases"),
    ],
)
def test_features_we_do_not_compute_are_refused(family, change, message, tmp_path):
    hf = random_hf(family)
    for key, value in change.items():
        setattr(hf.config, key, value)
    with pytest.raises(UserError, match=message):
        from_hf(hf)


def test_another_architecture_is_refused_before_transformers_reads_it(tmp_path):
    write_config(tmp_path / "moe", architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe")
    with pytest.raises(UserError, match="architecture Qwen2MoeForCausalLM is not supported"):
        from_hf(tmp_path / "moe")
