import os
import tempfile

import pytest
import torch

from multitoken import ModelConfig, MultiTokenLM

HEAD_STYLES = ("transformer", "linear", "sequential", "medusa", "conditioned")

# Tiny models run fastest on one thread, and a shared machine's oversubscribed OpenMP threads spin.
torch.set_num_threads(1)
# Step costs measured by the adaptive decoding policy go to a throwaway cache, not the user's.
os.environ.setdefault("MULTITOKEN_CACHE_DIR", tempfile.mkdtemp(prefix="multitoken-test-cache-"))


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=97, dim=64, n_layers=6, n_heads=4, n_kv_heads=2, max_seq_len=128)
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> MultiTokenLM:
    """A tiny model with every parameter random, so zero-initialised heads don't hide bugs."""
    torch.manual_seed(seed)
    model = MultiTokenLM(tiny_config(**overrides))
    with torch.no_grad():
        for head in model.heads:
            if hasattr(head, "proj") and head.proj.weight.abs().sum() == 0:
                head.proj.weight.normal_(0, 0.05)
    return model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
