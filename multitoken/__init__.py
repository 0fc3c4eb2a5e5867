"""multitoken: train, evaluate and serve multi-token-prediction language models."""

from multitoken.config import ModelConfig, preset_config
from multitoken.generate import generate
from multitoken.model import MultiTokenLM

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavier pieces load on first use, so `import multitoken` stays quick.
    if name == "load_checkpoint":
        from multitoken.checkpoint import load_checkpoint

        return load_checkpoint
    if name in ("from_hf", "from_hf_llama", "to_hf"):
        from multitoken import interop

        return getattr(interop, name)
    raise AttributeError(f"module 'multitoken' has no attribute {name!r}")


__all__ = [
    "ModelConfig",
    "MultiTokenLM",
    "from_hf",
    "from_hf_llama",
    "generate",
    "load_checkpoint",
    "preset_config",
    "to_hf",
]
