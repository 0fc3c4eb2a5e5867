"""What a decoding step costs on this machine, per draft plan and batch size: measured, cached, refined.

Whether drafting pays depends on the machine as much as on the model: on a GPU verifying 4 positions
costs about as much as verifying 1, on a CPU it does not. `StepCosts.calibrate` times real decoding
steps (`multitoken.decoding.decode_step`) of each plan at a batch size, a few repeats each, on random
prompts (a fraction of a second for small models), and stores the medians in a JSON file keyed by
(machine, device, dtype, threads, torch version, model shape, batch size), so later runs start at once:

    ~/.cache/multitoken/step_costs.json   ($MULTITOKEN_CACHE_DIR or $XDG_CACHE_HOME/multitoken if set)

Delete the file to measure again. During decoding the driver reports each step's wall time
(`observe`), and the table follows the machine's load with an exponential moving average.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

CACHE_FILE_NAME = "step_costs.json"
CALIBRATION_REPEATS = 3
"""Timed steps per plan (after one warm-up step); the median is kept."""
SMOOTHING = 0.1
"""Weight of each observed step in the running cost estimate."""


def cache_dir() -> Path:
    """Where measured costs are kept: $MULTITOKEN_CACHE_DIR, else $XDG_CACHE_HOME/multitoken, else ~/.cache."""
    if os.environ.get("MULTITOKEN_CACHE_DIR"):
        return Path(os.environ["MULTITOKEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "multitoken"


def batch_bucket(batch_size: int) -> int:
    """Batch sizes share measurements by power-of-two bucket (rounded up)."""
    return 1 << max(batch_size - 1, 0).bit_length()


def machine_key(model) -> str:
    """What the costs depend on besides the batch: machine, device, dtype, threads, torch and model shape."""
    param = next(model.parameters())
    device = torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else platform.processor()
    shape = json.dumps(model.config.__dict__, sort_keys=True, default=str)
    parts = [
        platform.node(),
        device or platform.machine(),
        str(param.dtype),
        str(torch.get_num_threads()),
        torch.__version__,
        hashlib.sha1(shape.encode()).hexdigest()[:12],
    ]
    return "|".join(parts)


class StepCosts:
    """Seconds per decoding step, by plan name and batch bucket."""

    def __init__(self, table: dict[int, dict[str, float]] | None = None) -> None:
        self.table: dict[int, dict[str, float]] = table or {}

    def seconds(self, plan_name: str, batch_size: int) -> float | None:
        return self.table.get(batch_bucket(batch_size), {}).get(plan_name)

    def knows(self, plan_names: Sequence[str], batch_size: int) -> bool:
        return all(self.seconds(name, batch_size) is not None for name in plan_names)

    def observe(self, plan_name: str, batch_size: int, seconds: float) -> None:
        """Fold one measured step into the running estimate."""
        row = self.table.setdefault(batch_bucket(batch_size), {})
        old = row.get(plan_name)
        row[plan_name] = seconds if old is None else (1 - SMOOTHING) * old + SMOOTHING * seconds

    # ---- measuring ------------------------------------------------------------------------------

    def calibrate(self, model, batch_size: int, plans: Sequence, cache_len: int) -> float:
        """Time each plan's decoding step at this batch size; returns the seconds spent measuring."""
        from multitoken.decoding import DecodeBatch, decode_step, prefill

        started = time.perf_counter()
        B = batch_bucket(batch_size)
        extra = max((p.block for p in plans if p.tree is not None), default=0)
        batch = DecodeBatch(model, B, cache_len, extra_slots=extra)
        generator = torch.Generator().manual_seed(0)
        prompt_len = max(1, min(16, cache_len // 4))
        row = self.table.setdefault(B, {})
        try:
            for plan in plans:
                prompts = torch.randint(0, model.config.vocab_size, (B, prompt_len), generator=generator)
                prefill(batch, prompts.tolist())
                budget = [plan.block] * B
                times = []
                for _ in range(CALIBRATION_REPEATS + 1):
                    if max(batch.pos) + 2 * plan.block >= cache_len - 1:
                        prefill(batch, prompts.tolist())
                    t0 = time.perf_counter()
                    decode_step(batch, plan, budget)
                    times.append(time.perf_counter() - t0)
                row[plan.name] = statistics.median(times[1:])
        finally:
            batch.close()
        return time.perf_counter() - started

    # ---- the cache file -------------------------------------------------------------------------

    @classmethod
    def load(cls, model) -> StepCosts:
        """The costs measured earlier for this machine and model shape, or an empty table."""
        path = cache_dir() / CACHE_FILE_NAME
        try:
            saved = json.loads(path.read_text()).get(machine_key(model), {})
            return cls({int(b): {str(k): float(v) for k, v in row.items()} for b, row in saved.items()})
        except (OSError, ValueError, AttributeError, TypeError):
            return cls()  # no file yet, or one we cannot read: measure again

    def save(self, model) -> None:
        """Merge this table into the cache file (atomically; a failure to write only costs a re-measure)."""
        path = cache_dir() / CACHE_FILE_NAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                everything = json.loads(path.read_text())
                if not isinstance(everything, dict):
                    everything = {}
            except (OSError, ValueError):
                everything = {}
            everything[machine_key(model)] = {str(b): row for b, row in self.table.items()}
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(everything, indent=1) + "\n")
            os.replace(tmp, path)
        except OSError:
            pass


__all__ = ["StepCosts", "batch_bucket", "cache_dir", "machine_key"]
