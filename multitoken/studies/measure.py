"""Timing and peak memory, for the studies' runs and the scripts in benchmarks/.

Memory figures are MiB: on CUDA the allocator's counters, on CPU the process's resident set (Linux
/proc; the RSS high-water mark is reset through /proc/PID/clear_refs where the kernel allows it).
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call of `fn`, queued GPU work included."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


@dataclass
class Timings:
    """Seconds per call of one variant: wall clock, and CPU time of this process."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    def seconds(self, clock: str) -> list[float]:
        return self.wall_s if clock == "wall" else self.cpu_s


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
            wall, cpu, _ = timed(fn, device)
            times[name].wall_s.append(wall)
            times[name].cpu_s.append(cpu)
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over repeats of numerator[i] / denominator[i]: each pair ran back to back."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA peak stats, or the process's RSS high-water mark (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # not Linux: ru_maxrss keeps the whole process's high-water mark
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")


def current_memory_mib(device: torch.device) -> float:
    """Allocated CUDA memory, or the resident set size (Linux; 0 elsewhere), in MiB."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or peak RSS (VmHWM, else ru_maxrss), in MiB since reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
