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


def assert_same_up_to_near_ties(tokens, plain, margin: float) -> None:
    """`tokens` equal plain decoding's, or part from them only where plain's top two logits are within
    `margin`: in bf16, CUDA kernels for a block of positions and for one position may differ by an ulp."""
    for row, (ours, theirs) in enumerate(zip(tokens, plain.tokens, strict=True)):
        if ours == theirs:
            continue
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
        assert first is not None, f"row {row}: same tokens, different lengths"
        top2 = plain.logits[row][first].topk(2).values
        assert float(top2[0] - top2[1]) <= margin, f"row {row} parts at token {first} without a near-tie"


@pytest.mark.parametrize(("dtype", "margin"), [(torch.float32, 0.0), (torch.bfloat16, 0.02)])
def test_cuda_speculative_and_tree_decoding_equal_plain(dtype, margin):
    model = agreeing_model("linear", 4).to("cuda", dtype)
    plain = generate(model, PROMPTS, 19, speculative=False, return_logits=True)
    if margin == 0.0:
        assert generate(model, PROMPTS, 19).tokens == plain.tokens
        assert (
            generate(model, PROMPTS, 19, draft_tree=DraftTree.from_widths([3, 2, 2])).tokens == plain.tokens
        )
        return
    assert_same_up_to_near_ties(generate(model, PROMPTS, 19).tokens, plain, margin)
    tree = generate(model, PROMPTS, 19, draft_tree=DraftTree.from_widths([3, 2, 2]))
    assert_same_up_to_near_ties(tree.tokens, plain, margin)


def test_cuda_graph_decoding_equals_eager():
    """compile=True replays the step as a CUDA graph ("reduce-overhead"); the cache is updated inside it."""
    model = tiny_model(3, n_future=3, head_style="linear").cuda().eval()
    for kwargs in (dict(speculative=False), dict(), dict(draft_tree=DraftTree.from_widths([2, 2]))):
        eager = generate(model, PROMPTS, 24, **kwargs)
        for _ in range(2):  # the second call replays recorded graphs
            assert generate(model, PROMPTS, 24, compile=True, **kwargs).tokens == eager.tokens


@pytest.mark.parametrize(("dtype", "margin"), [(torch.float32, 1e-3), (torch.bfloat16, 0.02)])
def test_cached_gqa_attention_runs_on_fused_kernels(dtype, margin):
    """Cached calls carry a mask; with grouped KV heads they must still run without SDPA's math fallback
    (restricted to the fused kernels, SDPA raises when none applies)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_model(4, n_future=3, head_style="linear").to("cuda", dtype).eval()
    assert model.config.n_kv_heads < model.config.n_heads
    plain = generate(model, PROMPTS, 12, speculative=False, return_logits=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        fused = [
            generate(model, PROMPTS, 12, speculative=False),
            generate(model, PROMPTS, 12),
            generate(model, PROMPTS, 12, draft_tree=DraftTree.from_widths([2, 2])),
        ]
    for result in fused:  # other kernels than the unrestricted run's: equal up to near-ties
        assert_same_up_to_near_ties(result.tokens, plain, margin)
