"""`multitoken distill-data`: a corpus of a model's own continuations, to train its heads on.

Heads trained on a corpus learn what the corpus says next; at decoding time they must guess what the
*model* says next, and a small model soon wanders off the corpus (into its own loops, say). Medusa's
`create_data` answers this with self-distillation through data: generate continuations from the base
model, then train the heads, base frozen, on that text. This module is that step:

    multitoken distill-data --checkpoint RUN --from-data DATA --out self.jsonl
    multitoken prepare --source self.jsonl:text --tokenizer RUN --out data/self
    multitoken train --init-from RUN --train heads --data data/self --out RUN-heads

Decoding is plain (the heads play no part), batched, greedy by default: the greedy continuations are
exactly what greedy decoding of the base will produce, so its heads learn the path they will draft on.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from multitoken.errors import UserError


@dataclass
class DistillDataConfig:
    """Generate continuations from a checkpoint and write them as a JSONL corpus ({"text": ...} lines)."""

    checkpoint: str
    """Checkpoint or run directory whose model writes the continuations (it must carry its tokenizer)."""
    out: str
    """JSONL file to write, one {"text": prompt + continuation} object per line; prepare it with
    `multitoken prepare --source OUT:text --tokenizer CHECKPOINT`."""
    prompt_file: str | None = None
    """Prompts to continue: a text file with one prompt per line, or a .jsonl file of {"prompt": ...}."""
    from_data: str | None = None
    """Or a prepared dataset directory: continue prompts drawn from its train split (see --prompt-kind)."""
    prompt_kind: Literal["windows", "code"] = "windows"
    """What --from-data draws: windows (random windows of --prompt-tokens tokens, reproducible by
    --seed) or code (its distinct function headers, "def name(", in order: the kind of prompt that
    `generate --prompts-from-data` takes from the val split)."""
    n_prompts: int = 256
    """How many prompts --from-data draws (a --prompt-file gives its own count)."""
    prompt_tokens: int = 16
    """Length in tokens of each window (--prompt-kind windows)."""
    max_new_tokens: int = 112
    """Tokens to generate per prompt (fewer where the model ends the text)."""
    temperature: float = 0.0
    """0 for greedy continuations (what greedy decoding will see); above 0 samples, for variety."""
    batch_size: int = 32
    """Prompts decoded together."""
    seed: int = 0
    """Seed of the window draw and of sampling."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""

    def __post_init__(self) -> None:
        if (self.prompt_file is None) == (self.from_data is None):
            raise UserError("give exactly one of --prompt-file and --from-data")
        for name in ("n_prompts", "prompt_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if self.prompt_kind not in ("windows", "code"):
            raise UserError(f"--prompt-kind must be windows or code, got {self.prompt_kind!r}")
        if not self.out.endswith(".jsonl"):
            raise UserError(f"--out must name a .jsonl file, got {self.out}")


def data_windows(directory: str | Path, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` windows of `length` tokens at uniformly random starts of a prepared dataset's train split."""
    from multitoken.data.loader import TokenDataset

    data = TokenDataset(directory, split="train")
    if data.n_tokens <= length:
        raise UserError(f"the train split of {directory} has {data.n_tokens} tokens, too few for {length}")
    starts = np.random.default_rng(seed).integers(0, data.n_tokens - length, size=n)
    return [data.window(int(s), length).tolist() for s in starts]


def continue_prompts(
    model, prompt_ids: list[list[int]], cfg: DistillDataConfig, eos_id: int, progress: bool = True
) -> list[list[int]]:
    """Each prompt's continuation (token ids), decoded plainly in batches of `cfg.batch_size`."""
    from tqdm import tqdm

    from multitoken.generate import generate

    continuations: list[list[int]] = []
    starts = range(0, len(prompt_ids), cfg.batch_size)
    for first in tqdm(starts, desc="generating", unit="batch", disable=not progress, file=sys.stderr):
        result = generate(
            model,
            prompt_ids[first : first + cfg.batch_size],
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            speculative=False,
            eos_id=eos_id,
            seed=cfg.seed + first,
        )
        continuations.extend(result.tokens)
    return continuations


def distill_data(cfg: DistillDataConfig) -> None:
    """Write a corpus of a model's own continuations, for training its heads on a frozen base.

    Prompts come from a file (--prompt-file) or from random windows of a prepared dataset's train
    split (--from-data). Each is continued by plain batched decoding, greedy unless --temperature > 0,
    and written with its continuation as one {"text": ...} line. Then `multitoken prepare --source
    OUT:text --tokenizer CHECKPOINT` makes it a dataset, and `multitoken train --init-from CHECKPOINT
    --train heads` trains the heads on it (Medusa's self-distillation through data).
    """
    from multitoken.checkpoint import load_checkpoint, write_text_atomic
    from multitoken.devices import resolve_device
    from multitoken.files import check_output_parent

    check_output_parent(cfg.out, "corpus")
    if Path(cfg.out).exists():  # a corpus is minutes or hours of generation: never overwrite one
        raise UserError(f"{cfg.out} already exists; remove it or give another --out")
    model, tokenizer = load_checkpoint(cfg.checkpoint, device=resolve_device(cfg.device))
    if tokenizer is None:
        raise UserError(
            f"checkpoint {cfg.checkpoint} has no tokenizer, so its continuations cannot be written"
        )
    if cfg.from_data is not None and cfg.prompt_kind == "code":
        from multitoken.data.prompts import code_prompts

        headers = code_prompts(cfg.from_data, cfg.n_prompts, split="train")
        prompt_ids = [tokenizer.encode(text) for text in headers]
    elif cfg.from_data is not None:
        prompt_ids = data_windows(cfg.from_data, cfg.n_prompts, cfg.prompt_tokens, cfg.seed)
    else:
        from multitoken.data.prompts import file_prompts

        prompt_ids = [tokenizer.encode(text) for text in file_prompts(cfg.prompt_file)]
    model.eval()
    start = time.perf_counter()
    continuations = continue_prompts(model, prompt_ids, cfg, tokenizer.eos_id)
    lines = [
        json.dumps({"text": tokenizer.decode(prompt + new)}, ensure_ascii=False)
        for prompt, new in zip(prompt_ids, continuations, strict=True)
    ]
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cfg.out, "\n".join(lines) + "\n")
    new_tokens = sum(len(c) for c in continuations)
    print(
        f"wrote {len(lines)} continuations ({new_tokens} new tokens) to {cfg.out} "
        f"in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )


__all__ = ["DistillDataConfig", "continue_prompts", "data_windows", "distill_data"]
