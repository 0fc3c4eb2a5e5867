"""What only a GPU can check: bf16 autocast and compiled training, CUDA-graph decoding. Skipped without CUDA.

Run on a GPU machine with `pytest -m gpu tests/test_gpu.py`.
"""

import pytest
import torch
from test_generate import PROMPTS, agreeing_model

from multitoken import load_checkpoint
from multitoken.draft_tree import DraftTree
from multitoken.generate import generate
from multitoken.train import train

from conftest import tiny_model
from helpers import debug_config, make_dataset, read_metrics

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("gpu"))


def test_bf16_autocast_training_learns_and_saves_float32_weights(dataset, tmp_path):
    cfg = debug_config(dataset, tmp_path / "run", device="cuda", max_steps=60, batch_size=8, seq_len=64)
    train(cfg)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert all(loss == loss for loss in losses)  # no NaN
    assert losses[-1] < 0.7 * losses[0]
    model, _ = load_checkpoint(tmp_path / "run")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_compiled_training_matches_eager_in_bf16(dataset, tmp_path):
    eager = debug_config(dataset, tmp_path / "eager", device="cuda", max_steps=10)
    compiled = debug_config(dataset, tmp_path / "compiled", device="cuda", max_steps=10, compile=True)
    train(eager), train(compiled)
    a = [m["loss"] for m in read_metrics(tmp_path / "eager")]
    b = [m["loss"] for m in read_metrics(tmp_path / "compiled")]
    assert a == pytest.approx(b, rel=2e-2)  # bf16 kernels differ; trajectories stay together


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_speculative_and_tree_decoding_equal_plain(dtype):
    model = agreeing_model("linear", 4).to("cuda", dtype)
    plain = generate(model, PROMPTS, 19, speculative=False)
    assert generate(model, PROMPTS, 19).tokens == plain.tokens
    assert generate(model, PROMPTS, 19, draft_tree=DraftTree.from_widths([3, 2, 2])).tokens == plain.tokens


def test_cuda_graph_decoding_equals_eager():
    """compile=True replays the step as a CUDA graph ("reduce-overhead"); the cache is updated inside it."""
    model = tiny_model(3, n_future=3, head_style="linear").cuda().eval()
    for kwargs in (dict(speculative=False), dict(), dict(draft_tree=DraftTree.from_widths([2, 2]))):
        eager = generate(model, PROMPTS, 24, **kwargs)
        for _ in range(2):  # the second call replays recorded graphs
            assert generate(model, PROMPTS, 24, compile=True, **kwargs).tokens == eager.tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_gqa_attention_runs_on_fused_kernels(dtype):
    """Cached calls carry a mask; with grouped KV heads they must still avoid SDPA's math fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_model(4, n_future=3, head_style="linear").to("cuda", dtype).eval()
    assert model.config.n_kv_heads < model.config.n_heads
    expected = generate(model, PROMPTS, 12, draft_tree=DraftTree.from_widths([2, 2])).tokens
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        assert generate(model, PROMPTS, 12, draft_tree=DraftTree.from_widths([2, 2])).tokens == expected
        assert generate(model, PROMPTS, 12, speculative=False).tokens == generate(model, PROMPTS, 12).tokens
