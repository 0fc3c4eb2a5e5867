"""What only the benchmark scripts share: their one-line machine description and the date of a figure.

Timing (`timed`, `interleaved_times`, `paired_ratio`) and peak memory come from
`multitoken.studies.measure`, tables from `multitoken.studies.report.format_table`.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from multitoken.config import preset_config
from multitoken.model import MultiTokenLM
from multitoken.studies.measure import cpu_model_name
from multitoken.studies.report import format_table


def machine_description(device: str) -> str:
    """One line naming the accelerator or CPU, the threads torch uses, and the torch version."""
    if device.startswith("cuda"):
        hardware = torch.cuda.get_device_name()
    else:
        hardware = f"{cpu_model_name()}, {torch.get_num_threads()} threads"
    return f"{hardware}, torch {torch.__version__}"


def today() -> str:
    """The UTC date, YYYY-MM-DD."""
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table of cells as given (`format_table` without its float rounding)."""
    return format_table(headers, rows, cell=str)


def add_random_model_args(parser: argparse.ArgumentParser, preset: str, vocab_size: int) -> None:
    """The flags of a benchmark of a random model: its shape, and how it is timed."""
    parser.add_argument("--preset", default=preset, help="shape of the random model")
    parser.add_argument("--vocab-size", type=int, default=vocab_size, help="vocabulary of the random model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)


def random_model(args: argparse.Namespace, **overrides) -> MultiTokenLM:
    """The random model of `add_random_model_args`' flags, in eval mode, with torch's threads and seed set
    from them (`overrides`: other ModelConfig fields, e.g. n_future)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return MultiTokenLM(preset_config(args.preset, vocab_size=args.vocab_size, **overrides)).eval()
