"""Training logs: metrics.jsonl, TensorBoard, and a progress bar with loss, tokens/s and ETA."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from multitoken.errors import UserError

METRICS = "metrics.jsonl"


def read_metrics(path: str | Path, warn: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A cut-off last line (a crash or a full disk during a write) is
    dropped, with a warning on stderr when `warn`; a damaged line before it is a UserError."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    records = []
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    for i, (n, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError
        except ValueError:
            if i == len(numbered) - 1:
                if warn:
                    print(f"multitoken: warning: {path} line {n} is cut off; dropping it", file=sys.stderr)
                break
            raise UserError(f"{path} line {n} is not a metrics record; fix or remove that line") from None
        records.append(record)
    return records


def check_metrics(run_dir: str | Path, warn: bool = True) -> None:
    """Refuse a run whose metrics.jsonl is damaged before its last line (read before anything is written)."""
    read_metrics(Path(run_dir) / METRICS, warn=warn)


def format_metric(name: str, value: float) -> str:
    """A metric as people read it: `tokens_per_s=32,410`, `lr=0.003`, `loss=4.1234`."""
    if name.startswith("tokens_per"):
        return f"{name}={value:,.0f}"
    if name == "lr":
        return f"{name}={value:.3g}"
    return f"{name}={value:.4f}"


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
        """Keep the records up to `step` (a resumed run logs the later ones again), replacing the file
        atomically."""
        from multitoken.checkpoint import write_text_atomic

        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

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
            print(f"step {step}: " + " ".join(format_metric(k, v) for k, v in metrics.items()), flush=True)

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
