"""The README runs as written: every `multitoken` line of the tour, at smaller sizes, and the Python snippet.

Each tour line is read from README.md itself. `SMALLER` shrinks sizes only (steps, lengths, limits,
the corpus); paths, files and every other flag stay as written. Lines that train whole studies or need
a GPU are parsed by the real command line (so their flags exist) and run by their own tests.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from multitoken.cli import build_parser, commands, main

from helpers import make_corpus

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Sizes only: the README's value -> a seconds-sized one.
SMALLER = {
    "--source": lambda value, corpus: corpus if value == "python-stdlib" else value,
    "--preset": lambda value, corpus: "debug",
    "--seq-len": lambda value, corpus: "32",
    "--max-steps": lambda value, corpus: str(max(2, int(value) // 100)),
    "--warmup-steps": lambda value, corpus: "1",
    "--max-new-tokens": lambda value, corpus: "4",
    "--limit": lambda value, corpus: "1",
    "--n-prompts": lambda value, corpus: "2",
}
SMALL_TRAIN = ["--preset", "debug", "--seq-len", "32", "--val-every", "0", "--val-batches", "1"]
EXTRA = {
    "train": [
        *SMALL_TRAIN,
        "--save-every",
        "0",
        "--no-progress",
        "--device",
        "cpu",
    ],  # over --config sizes too
    "eval loss": ["--max-windows", "2", "--seq-len", "32"],
}
PARSE_ONLY = (
    "--compile",  # torch.compile: a GPU feature, minutes to start on a CPU
    "experiment ",  # whole studies: tests/experiments and tests/lab run each at --scale debug
    "lab tasks",
    "lab icl",
    "lab scaling run",
    "lab scaling fit",  # tests/lab/test_scaling.py fits these very points
)


def tour_lines() -> list[str]:
    """The command lines of the tour block, comments dropped."""
    block = README.split("## A tour of the command line", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith((".", "#"))]


def words(line: str) -> list[str]:
    """The command's words after `multitoken` (or `torchrun ... -m multitoken`)."""
    argv = shlex.split(line, comments=True)
    return argv[argv.index("multitoken") + 1 :] if argv[0] == "multitoken" else argv[argv.index("-m") + 2 :]


def smaller(argv: list[str], corpus: str) -> list[str]:
    out = list(argv)
    for i, word in enumerate(out[:-1]):
        if word in SMALLER:
            out[i + 1] = SMALLER[word](out[i + 1], corpus)
    name = " ".join(w for w in out[:2] if not w.startswith("-"))
    for key, extra in EXTRA.items():
        if name == key or (key == "train" and out[0] == "train"):
            out += extra
    return out


def test_the_tour_lists_commands_that_exist():
    lines = tour_lines()
    assert len(lines) >= 20
    parser = build_parser(commands())
    for line in lines:
        parser.parse_args(words(line))  # exits (a test failure) on an unknown command or flag


def test_the_readme_names_no_file_a_clone_lacks():
    named = set(re.findall(r"examples/[\w./-]+\w", README))
    assert named, "the README no longer uses examples/"
    for path in named:
        assert (ROOT / path).exists(), f"README names {path}, which the repository lacks"
    assert "../shared" not in README and "DESIGN.md" not in README


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """A folder where the tour ran at small sizes: data/stdlib, runs/tiny-n4, examples/ beside them."""
    home = tmp_path_factory.mktemp("tour")
    corpus_dir = make_corpus(home / "corpus", 40)
    for i, doc in enumerate(
        sorted(corpus_dir.iterdir())
    ):  # function headers, as the stdlib has, in every split
        doc.write_text(doc.read_text() + f"\ndef step_{i}(x):\n    return x + {i}\n")
    corpus = str(corpus_dir)
    (home / "examples").symlink_to(ROOT / "examples")
    cwd = Path.cwd()
    os.chdir(home)
    ran = []
    try:
        for line in tour_lines():
            if line.startswith("torchrun") or any(marker in line for marker in PARSE_ONLY):
                continue
            if "lm-eval" in line:
                pytest.importorskip("lm_eval")
                os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            argv = smaller(words(line), corpus)
            assert main(argv) == 0, f"README line failed: {line}\nran as: {argv}"
            ran.append(argv[:2])
        yield home, ran
    finally:
        os.chdir(cwd)


def test_every_tour_line_runs_at_small_sizes(tour):
    home, ran = tour
    assert len(ran) >= 13
    assert (home / "runs" / "tiny-n4" / "checkpoints" / "step_000006").is_dir()  # resumed to --max-steps 600
    assert (home / "eval" / "mbpp" / "samples.jsonl").is_file()
    assert (home / "eval" / "scored" / "results.jsonl").is_file()


def test_the_python_snippet_runs_as_written(tour, monkeypatch):
    home, _ = tour
    monkeypatch.chdir(home)
    snippet = README.split("```python", 1)[1].split("```", 1)[0]
    exec(compile(snippet, "README.md", "exec"), {})
