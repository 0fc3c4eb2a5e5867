"""Training logs: metrics.jsonl, TensorBoard, and a progress bar with loss, tokens/s and ETA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METRICS = "metrics.jsonl"


class TrainLogger:
    """Writes one JSON object per logged step; on resume, drops lines past the resumed step."""

    def __init__(self, run_dir: str | Path, cfg: Any, start_step: int, enabled: bool = True) -> None:
        self.cfg, self.enabled = cfg, enabled
        self.path = Path(run_dir) / METRICS
        self.writer = None
        self.bar = None
        if not enabled:
            return
        self._truncate_after(start_step)
        self.file = open(self.path, "a")  # noqa: SIM115 -- closed in close()
        if cfg.tensorboard:
            self.writer = _tensorboard_writer(Path(run_dir) / "tb")
        if cfg.progress:
            self.bar = tqdm(
                total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float], force: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            # The next-token loss, the quantity `val` measures; the sum over heads stays in metrics.jsonl.
            next_token = metrics.get("loss_head1", metrics["loss"])
            shown = {"loss": f"{next_token:.3f}", "tok/s": f"{metrics['tokens_per_s']:,.0f}"}
            if "val_loss" in metrics:
                shown["val"] = f"{metrics['val_loss']:.3f}"
            self.bar.set_postfix(shown, refresh=False)
        if step % self.cfg.log_every and not force:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        if self.bar is None:
            print(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)

    def write(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))
