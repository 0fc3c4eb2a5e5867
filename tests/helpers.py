"""Small datasets and runs shared by the trainer, checkpoint and CLI tests."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from multitoken.data.shards import PrepareConfig, prepare
from multitoken.train import TrainConfig

STORY = "the cat sat on the mat. the dog ate the bone. a bird sang in the tree.\n"


def make_corpus(directory: Path, n_docs: int = 40) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (directory / f"doc{i:03d}.txt").write_text(STORY * (3 + i % 4))
    return directory


def make_dataset(tmp_path: Path, n_docs: int = 40) -> Path:
    corpus = make_corpus(tmp_path / "corpus", n_docs)
    return prepare(
        PrepareConfig(source=str(corpus), tokenizer="byte", out=str(tmp_path / "data"), val_fraction=0.1)
    )


def debug_config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        data=str(data),
        out=str(out),
        preset="debug",
        model={"n_future": 2},
        batch_size=4,
        seq_len=32,
        max_steps=8,
        warmup_steps=2,
        log_every=1,
        val_every=0,
        val_batches=1,
        save_every=0,
        tensorboard=False,
        progress=False,
        lr=3e-3,
        device="cpu",  # float32 on CPU, so exact comparisons hold on a GPU machine too
    )
    values.update(overrides)
    return TrainConfig(**values)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@functools.cache
def _parser():
    from multitoken.cli import build_parser, commands

    return build_parser(commands())


def parsed_options(argv: list[str]):
    """The options object `multitoken ARGV` hands its command (parsed as `main` does, nothing run)."""
    import dataclasses

    from multitoken.cli import run_command

    namespace = _parser().parse_args(argv)
    handed = []
    run_command(dataclasses.replace(getattr(namespace, "__command"), target=handed.append), namespace)
    return handed[0]
