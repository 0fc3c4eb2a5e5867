"""Prompts for decoding: from a user's file, or drawn reproducibly from a prepared dataset (code prompts
for demos and benchmarks)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from multitoken.errors import UserError


def code_prompts(directory: str | Path, n: int, split: str = "val") -> list[str]:
    """The first `n` distinct function headers ("def name(") of a split of a prepared dataset."""
    from multitoken.data.loader import TokenDataset

    data = TokenDataset(directory, split=split)
    text = data.tokenizer().decode(data.window(0, data.n_tokens).tolist())
    headers = list(dict.fromkeys(re.findall(r"^def \w+\(", text, flags=re.MULTILINE)))
    if not headers:
        raise UserError(
            f"the {split} split of {directory} has no function headers ('def name(') to use as prompts"
        )
    return headers[:n]


def file_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file (one per non-blank line) or of a .jsonl file ({"prompt": ...} objects)."""
    from multitoken.files import read_text

    lines = [line for line in read_text(path, "prompt file").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"prompt file {path} has no non-blank lines")
    if not str(path).endswith(".jsonl"):
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"prompt file {path}, line {number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'prompt file {path}, line {number}: expected an object with a "prompt" string')
        prompts.append(record["prompt"])
    return prompts


__all__ = ["code_prompts", "file_prompts"]
