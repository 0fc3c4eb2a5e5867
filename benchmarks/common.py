"""Shared helpers for the benchmark scripts: devices, side-by-side timing, machine description, tables."""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timings:
    """Seconds per call of one variant: wall clock, and CPU time of this process."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    def seconds(self, clock: str) -> list[float]:
        return self.wall_s if clock == "wall" else self.cpu_s


def timed(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of `fn`, GPU work included."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int, device: str, warmup: int = 1
) -> dict[str, Timings]:
    """Timings of each function, the repeats alternating between them.

    Alternating spreads any drift of a shared machine (other jobs, clock changes) over every variant,
    so ratios stay fair even when absolute times wander.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: Timings() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = timed(fn, device)
            times[name].wall_s.append(wall)
            times[name].cpu_s.append(cpu)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over repeats of numerator[i] / denominator[i]: each pair ran back to back."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


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
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
