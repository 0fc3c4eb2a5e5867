"""Several training runs in one torchrun launch, since process start-up dominates small CPU runs.

    torchrun --standalone --nproc_per_node 2 tests/fsdp_runs.py SPEC.json

SPEC is a JSON list of runs, done in order: {"config": TrainConfig fields, "stop_at": step or null}, where
`stop_at` interrupts the run after that step as SIGINT does, or {"cli": argv} for `multitoken` itself. A
CLI run ends the process group, so it comes last. Each config run also checks that ranks other than 0
built the model on the meta device only, and that a resumed run built no full model on any rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as torch_dist

from multitoken.cli import main
from multitoken.model import MultiTokenLM
from multitoken.train import TrainConfig, Trainer

BUILT_ON: list[str] = []  # the device of every MultiTokenLM built in this process, in order
_init = MultiTokenLM.__init__


def _recording_init(self, config) -> None:
    _init(self, config)
    BUILT_ON.append(self.output.weight.device.type)


MultiTokenLM.__init__ = _recording_init


def run(config: dict, stop_at: int | None) -> None:
    BUILT_ON.clear()
    trainer = Trainer(TrainConfig.from_dict(config))
    # Only rank 0 builds the full model, for a new run; a resumed one reads the checkpoint's tensors.
    if trainer.dist.rank > 0 or trainer.step > 0:
        assert set(BUILT_ON) == {"meta"}, BUILT_ON  # (the checkpoint's shapes are checked on a meta copy)
    if stop_at is not None:
        take_step = trainer.train_step

        def step_then_interrupt() -> dict[str, float]:
            metrics = take_step()
            if trainer.step == stop_at:
                trainer._request_stop(None, None)
            return metrics

        trainer.train_step = step_then_interrupt
    trainer.fit()


if __name__ == "__main__":
    for entry in json.loads(Path(sys.argv[1]).read_text()):
        if "cli" in entry:
            status = main(entry["cli"])
            if status:
                sys.exit(status)
        else:
            run(entry["config"], entry.get("stop_at"))
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
