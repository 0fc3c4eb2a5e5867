"""What a decoding step costs on this machine, per draft plan and batch size: measured, cached, refined.

Whether drafting pays depends on the machine as much as on the model: on a GPU verifying 4 positions
costs about as much as verifying 1, on a CPU it does not. `StepCosts.calibrate` times real decoding
steps (`multitoken.decoding.decode_step`) of each plan at a batch size, a few repeats each, on random
prompts (a fraction of a second for small models), and stores the medians in a JSON file keyed by
(machine, device, dtype, threads, torch version, model shape, batch size), so later runs start at once:

    ~/.cache/multitoken/step_costs.json   ($MULTITOKEN_CACHE_DIR or $XDG_CACHE_HOME/multitoken if set)

Delete the file to measure again. The plans are timed in turns, round after round; a plan's cost
is its median ratio to the plain step of the same round (which cancels drift: a shared machine
slows every plan of a round alike) times the plain step's fastest time. On a CPU with one torch
thread the clock is this process's CPU time, which other processes competing for the cores do not
inflate; otherwise it is the wall clock (`step_clock`).
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
CALIBRATION_REPEATS = 5
"""Most timed rounds (after one warm-up round); each round times every plan once, in turns."""
STEPS_PER_TIMING = 3
"""Consecutive steps of a plan in one timing, after one untimed step of it."""
CALIBRATION_BUDGET_S = 0.4
"""After two timed rounds, further rounds run only while the measurement has taken less than this."""


def cache_dir() -> Path:
    """Where measured costs are kept: $MULTITOKEN_CACHE_DIR, else $XDG_CACHE_HOME/multitoken, else ~/.cache."""
    if os.environ.get("MULTITOKEN_CACHE_DIR"):
        return Path(os.environ["MULTITOKEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "multitoken"


def batch_bucket(batch_size: int) -> int:
    """Batch sizes share measurements by power-of-two bucket (rounded up)."""
    return 1 << max(batch_size - 1, 0).bit_length()


COST_MODEL_VERSION = 5
"""Bumped when decoding steps change cost or the way they are timed (2: attention over the cache
slots in use; 3: the wall clock with several CPU threads; 4: oneDNN for blocks of rows on a CPU;
5: the drafting heads in one matmul, and each plan timed warm), so that costs cached by an earlier
version are measured again."""


def step_clock(device: torch.device):
    """The clock that times decoding steps: this process's CPU time on a CPU running one torch thread
    (other jobs on the machine do not inflate it); the wall clock otherwise. With several threads,
    CPU time adds up every thread's work, spin-waits included, so it overstates the steps that
    parallelise (the wider ones); on a GPU each step ends with a device-to-host copy, so the wall
    clock covers the GPU's work."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def machine_key(model) -> str:
    """What the costs depend on besides the batch: machine, device, dtype, threads, torch, model shape
    and the version of the decoding steps."""
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
        f"v{COST_MODEL_VERSION}",
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

    # ---- measuring ------------------------------------------------------------------------------

    def calibrate(self, model, batch_size: int, plans: Sequence, cache_len: int) -> float:
        """Time each plan's decoding step at this batch size; returns the seconds spent measuring."""
        from multitoken.decoding import DecodeBatch, DraftPlan, decode_step, prefill

        plans = [DraftPlan(), *(p for p in plans if p.block > 1)]  # the plain step anchors the rest

        started = time.perf_counter()
        clock = step_clock(next(model.parameters()).device)
        B = batch_bucket(batch_size)
        extra = max((p.block for p in plans if p.tree is not None), default=0)
        batch = DecodeBatch(model, B, cache_len, extra_slots=extra)
        batch.track_ranks = extra > 0  # as a policy that considers trees decodes
        generator = torch.Generator().manual_seed(0)
        prompt_len = max(1, min(16, cache_len // 4))
        row = self.table.setdefault(B, {})
        prompts = torch.randint(0, model.config.vocab_size, (B, prompt_len), generator=generator).tolist()
        times: dict[str, list[float]] = {plan.name: [] for plan in plans}
        try:
            for repeat in range(CALIBRATION_REPEATS + 1):
                if repeat > 2 and time.perf_counter() - started > CALIBRATION_BUDGET_S:
                    break
                for plan in plans:
                    if repeat == 0 or max(batch.pos) + (STEPS_PER_TIMING + 2) * plan.block >= cache_len - 1:
                        prefill(batch, prompts)
                    # Generation runs a plan for streaks of steps: time it warm, not just after another
                    # plan has evicted part of its weights (a plain step then costs ~20% more on a CPU).
                    decode_step(batch, plan, [plan.block] * B)
                    t0 = clock()
                    for _ in range(STEPS_PER_TIMING):
                        decode_step(batch, plan, [plan.block] * B)
                    if repeat:  # the first round warms up
                        times[plan.name].append((clock() - t0) / STEPS_PER_TIMING)
            # Ratios to the plain step of the same round cancel drift; the plain step's best time
            # anchors them.
            plain = times[DraftPlan().name]
            for plan in plans:
                ratio = statistics.median(t / p for t, p in zip(times[plan.name], plain, strict=True))
                row[plan.name] = ratio * min(plain)
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


__all__ = ["StepCosts", "batch_bucket", "cache_dir", "machine_key", "step_clock"]
