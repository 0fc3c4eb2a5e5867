"""Report directories that a person reads: report.md (question, answer, plot, table, provenance),
PNG plots and results.json.

    report = Report("reports/induction", title="Induction", question="Does n=2 help small models copy names?")
    fig, ax = report.figure()
    ax.plot(...); report.save_figure(fig, "accuracy.png", "Accuracy on the second token of a repeated name")
    report.add_table(["size", "n=1", "n=2"], rows)
    report.write(answer="n=2 is 12 points better at 1M parameters ...", results={...}, command=sys.argv)
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from multitoken.studies.measure import cpu_model_name


def machine_description() -> str:
    """One line naming the machine: CPU model and cores, GPU if any, torch version."""
    parts = [f"{cpu_model_name()}, {os.cpu_count()} cores"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)


def rounded(value: Any) -> str:
    """A table cell: floats to 4 significant digits, anything else as str()."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(header: list[str], rows: list[list[Any]], cell: Callable[[Any], str] = rounded) -> str:
    """A markdown table of `cell(value)` for every value (default: floats to 4 significant digits)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def stacked_bars(ax, columns: list[str], parts: list[tuple[str, list[float], str]]) -> None:
    """One bar per column, stacked from (label, value per column, color) segments, the first at the bottom."""
    bottom = [0.0] * len(columns)
    for label, values, color in parts:
        ax.bar(columns, values, bottom=bottom, color=color, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]


@dataclass
class Report:
    """Collects plots and tables, then writes report.md and results.json into `directory`."""

    directory: str | Path
    """Where report.md, results.json and the PNGs go."""
    title: str
    """Heading of report.md."""
    question: str
    """The question the experiment answers; the report leads with it."""
    figures: list[tuple[str, str]] = field(default_factory=list)
    """(file name, caption) of each saved plot, in order."""
    tables: list[tuple[str, str]] = field(default_factory=list)
    """(caption, markdown) of each table."""

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def figure(self, nrows: int = 1, ncols: int = 1, width: float = 7.0, height: float = 4.5):
        """A matplotlib figure on the non-interactive backend."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=nrows * ncols == 1)

    def save_figure(self, fig, name: str, caption: str) -> Path:
        import matplotlib.pyplot as plt

        path = self.directory / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        self.figures.append((name, caption))
        return path

    def add_table(self, header: list[str], rows: list[list[Any]], caption: str = "") -> str:
        table = format_table(header, rows)
        self.tables.append((caption, table))
        return table

    def write(
        self,
        answer: str,
        results: dict[str, Any],
        command: list[str] | str | None = None,
        details: dict[str, Any] | None = None,
    ) -> Path:
        """Write report.md (question, answer, plots, tables, how it was run) and results.json."""
        command = command if command is not None else ["multitoken", *sys.argv[1:]]
        command_line = command if isinstance(command, str) else shlex.join(command)
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines = [
            f"# {self.title}",
            "",
            f"**Question.** {self.question}",
            "",
            f"**Answer (this run).** {answer}",
            "",
        ]
        for name, caption in self.figures:
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        for caption, table in self.tables:
            lines += ([f"**{caption}**", ""] if caption else []) + [table, ""]
        lines += ["## How this was run", "", "```", command_line, "```", ""]
        lines += [f"- machine: {machine_description()}", f"- date: {when}"]
        lines += [f"- {key}: {value}" for key, value in (details or {}).items()]
        (self.directory / "report.md").write_text("\n".join(lines) + "\n")
        payload = {"question": self.question, "answer": answer, "command": command_line, "date": when}
        payload |= {"machine": machine_description(), "details": details or {}, "results": results}
        (self.directory / "results.json").write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
        return self.directory / "report.md"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__dict__"):
        return vars(value)
    return str(value)
