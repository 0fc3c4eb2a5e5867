"""Nothing lost: kill -9 at any moment, a full disk, a second Ctrl-C, a loss that goes NaN, a longer resume."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from multitoken import checkpoint as ckpt_io
from multitoken.cli import main
from multitoken.train import Trainer, train

from helpers import debug_config, make_dataset, read_metrics

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--no-tensorboard", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("crash"))


def cli_train(dataset: Path, out: Path, *extra: str) -> list[str]:
    args = ["--data", str(dataset), "--out", str(out), "--preset", "debug", "--n-future", "2"]
    args += [
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--warmup-steps",
        "2",
        "--lr",
        "3e-3",
        "--log-every",
        "1",
    ]
    args += ["--val-every", "0", "--val-batches", "1", *QUIET]
    return [sys.executable, "-m", "multitoken", "train", *args, *extra]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        time.sleep(0.005)


def interrupt(dataset: Path, out: Path, steps: int, after_lines: int, *signals: int) -> tuple[int, str]:
    """Start (or resume) the run in a child process, send `signals` once `after_lines` metrics are logged."""
    resume = ["--resume"] if (out / "checkpoints").exists() else []
    process = subprocess.Popen(
        cli_train(dataset, out, "--max-steps", str(steps), "--save-every", "2", *resume),
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_lines(out / "metrics.jsonl", after_lines, process)
    assert process.poll() is None, "the run ended before it could be interrupted"
    for sig in signals:
        process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def test_killed_and_doubly_interrupted_runs_resume_to_the_uninterrupted_losses(dataset, tmp_path, capsys):
    """A second signal stops the run at once; a kill -9 stops it wherever it was (a step, a log write, a
    save). Each time it resumes, and every loss equals that of a run that was never interrupted."""
    steps = 12
    reference = tmp_path / "reference"
    train(debug_config(dataset, reference, max_steps=steps, save_every=2))
    expected = {m["step"]: m["loss"] for m in read_metrics(reference)}

    out = tmp_path / "interrupted"
    # Ctrl-C asks for a save at the end of the step; a SIGTERM right behind it stops at once. (Two SIGINTs
    # sent back to back would merge into one.)
    code, err = interrupt(dataset, out, steps, 3, signal.SIGINT, signal.SIGTERM)
    lines = err.strip().splitlines()
    assert code == 130 and len(lines) == 1, err
    assert "stopped at once by a second SIGTERM" in lines[0] and "the last checkpoint is" in lines[0], err
    code, err = interrupt(dataset, out, steps, 7, signal.SIGKILL)
    assert code == -signal.SIGKILL and "Traceback" not in err, err
    assert main(["train", "--out", str(out), "--resume", "--max-steps", str(steps), *QUIET]) == 0
    got = {m["step"]: m["loss"] for m in read_metrics(out)}
    assert got == expected
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_a_full_disk_during_a_save_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = ckpt_io.save_safetensors
    saves = []

    def fills_the_disk(model, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"\0" * 100)  # a partly written file, then no space
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_io, "save_safetensors", fills_the_disk)
    argv = ["train", "--data", str(dataset), "--out", str(out), "--preset", "debug", "--batch-size", "2"]
    argv += ["--seq-len", "16", "--max-steps", "6", "--save-every", "2", "--val-every", "0", *QUIET]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "could not save checkpoint step_000004" in lines[0] and "No space left on device" in lines[0]
    assert "the last good checkpoint step_000002 is intact" in lines[0]
    root = out / "checkpoints"
    assert ckpt_io.find_latest(out) == root / "step_000002"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no .tmp-* left behind
    monkeypatch.undo()
    ckpt_io.load_model(out)  # the survivor loads


def test_a_full_disk_when_writing_json_leaves_no_temporary_file(dataset, tmp_path, monkeypatch, capsys):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_io.os, "fsync", no_space)
    out = tmp_path / "run"
    argv = ["train", "--data", str(dataset), "--out", str(out), "--preset", "debug", "--batch-size", "2"]
    assert main([*argv, "--seq-len", "16", "--max-steps", "1", *QUIET]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train_config.json: No space left on device" in err
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_a_full_disk_during_prepare_leaves_nothing(tmp_path, monkeypatch, capsys):
    from multitoken.data import shards

    from helpers import make_corpus

    def no_space(self, ids_N):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards._ShardWriter, "write", no_space)
    corpus = make_corpus(tmp_path / "corpus", 4)
    argv = ["prepare", "--source", str(corpus), "--tokenizer", "byte", "--out", str(tmp_path / "d")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device; nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_a_loss_that_goes_non_finite_stops_and_keeps_the_last_good_checkpoint(
    dataset, tmp_path, monkeypatch, capsys
):
    real_step = Trainer.train_step

    def diverges_at_step_5(self):
        if self.step == 4:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", diverges_at_step_5)
    out = tmp_path / "run"
    argv = ["train", "--data", str(dataset), "--out", str(out), "--preset", "debug", "--batch-size", "2"]
    argv += [
        "--seq-len",
        "16",
        "--max-steps",
        "8",
        "--save-every",
        "2",
        "--val-every",
        "0",
        "--log-every",
        "1",
    ]
    assert main([*argv, *QUIET]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "non-finite at step 5" in lines[0], lines
    assert "the last checkpoint is" in lines[0] and "step_000004" in lines[0]
    assert ckpt_io.find_latest(out).name == "step_000004"
    weights = ckpt_io.read_weights(ckpt_io.find_latest(out))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]


def test_extending_max_steps_on_resume_keeps_the_schedule_and_says_so(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train(debug_config(dataset, out, max_steps=4, warmup_steps=1, min_lr_ratio=0.1))
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "6", *QUIET]) == 0
    said = capsys.readouterr().out
    assert "max_steps 4 -> 6: the learning rate keeps this run's schedule" in said
    assert "--decay-steps 6" in said
    lrs = {m["step"]: m["lr"] for m in read_metrics(out)}
    floor = 3e-3 * 0.1
    assert lrs[5] == pytest.approx(floor) and lrs[6] == pytest.approx(floor)
    assert json.loads((out / "train_config.json").read_text())["decay_steps"] == 4
    # Asked for, the schedule is stretched instead: steps past 4 continue the cosine over 8 steps.
    assert (
        main(["train", "--out", str(out), "--resume", "--max-steps", "8", "--decay-steps", "8", *QUIET]) == 0
    )
    lrs = {m["step"]: m["lr"] for m in read_metrics(out)}
    expected = floor + 0.5 * (3e-3 - floor) * (1 + math.cos(math.pi * (7 - 1) / (8 - 1)))
    assert lrs[8] == pytest.approx(expected)
