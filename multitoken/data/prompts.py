"""Prompts drawn from a prepared dataset: reproducible code prompts for decoding demos and benchmarks."""

from __future__ import annotations

import re
from pathlib import Path

from multitoken.errors import UserError


def val_code_prompts(directory: str | Path, n: int) -> list[str]:
    """The first `n` distinct function headers ("def name(") of a prepared dataset's val split."""
    from multitoken.data.loader import TokenDataset

    data = TokenDataset(directory, split="val")
    text = data.tokenizer().decode(data.window(0, data.n_tokens).tolist())
    headers = list(dict.fromkeys(re.findall(r"^def \w+\(", text, flags=re.MULTILINE)))
    if not headers:
        raise UserError(
            f"the val split of {directory} has no function headers ('def name(') to use as prompts"
        )
    return headers[:n]


__all__ = ["val_code_prompts"]
