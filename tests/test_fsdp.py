"""FSDP2 training on two gloo processes: the losses, grad norms, validation and checkpoints of one process.

All sharded runs share one torchrun launch (`fsdp_runs.py`); the references run in this process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from multitoken import checkpoint as ckpt_io
from multitoken import load_checkpoint
from multitoken.cli import main
from multitoken.train import train

from helpers import debug_config, make_dataset, read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
N1 = {"n_future": 1}
N4 = {"n_future": 4, "n_layers": 6}  # a trunk of 2 blocks and 4 transformer heads
N4_TIED = {**N4, "tie_embeddings": True}
METRICS = ("loss", "grad_norm", "loss_head1", "val_loss", "val_acc_head1")


def run_config(dataset, out, model, **overrides):
    # seq_len 64 leaves 33 validation windows: rank 0 scores one batch more, so rank 1 pads.
    values = dict(max_steps=STEPS, seq_len=64, val_every=2, val_batches=9, model=model)
    return debug_config(dataset, out, **{**values, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):
    """Reference runs in this single process, by name."""
    root = tmp_path_factory.mktemp("one")
    for name, model in {"n1": N1, "n4": N4, "n4_tied": N4_TIED}.items():
        train(run_config(dataset, root / name, model))
    return root


@pytest.fixture(scope="module")
def sharded(dataset, tmp_path_factory):
    """FSDP runs on two gloo processes, by name."""
    root = tmp_path_factory.mktemp("fsdp_runs")

    def entry(name, model, stop_at=None, **overrides):
        config = run_config(dataset, root / name, model, fsdp=True, **overrides)
        return {"config": config.to_dict(), "stop_at": stop_at}

    cli = ["train", "--data", str(dataset), "--preset", "debug", "--n-future", "4", "--n-layers", "6"]
    cli += ["--batch-size", "4", "--seq-len", "64", "--max-steps", str(STEPS), "--warmup-steps", "2"]
    cli += ["--lr", "3e-3", "--log-every", "1", "--val-every", "2", "--val-batches", "9"]
    cli += ["--no-tensorboard", "--no-progress", "--fsdp", "--out", str(root / "cli_n4")]
    runs = [
        entry("n1", N1),
        entry("n4_tied_micro", N4_TIED, micro_batch_size=1),
        entry("n4_naive", N4, memory_efficient=False),
        entry("split", N4_TIED, stop_at=2, micro_batch_size=1),
        entry("split", N4_TIED, micro_batch_size=1, resume=True),
        entry("half", N4_TIED, stop_at=2, micro_batch_size=1),
        {"cli": cli},
    ]
    spec = root / "spec.json"
    spec.write_text(json.dumps(runs))
    # CPU gloo runs by design, also on a GPU machine (where rank 1 would ask for a second GPU).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launcher, str(REPO / "tests" / "fsdp_runs.py"), str(spec)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("n1", "n1"),
        ("cli_n4", "n4"),  # the memory-efficient loss, through `multitoken train --fsdp`
        ("n4_naive", "n4"),  # the naive loss has the memory-efficient one's gradients
        ("n4_tied_micro", "n4_tied"),  # tied embeddings, and 2 micro-batches per rank equal one big batch
    ],
)
def test_two_sharded_processes_match_one_process(sharded, one_process, name, reference):
    mine, theirs = read_metrics(sharded / name), read_metrics(one_process / reference)
    assert [m["step"] for m in mine] == list(range(1, STEPS + 1))
    for a, b in zip(mine, theirs, strict=True):
        assert a.keys() == b.keys()
        for key in METRICS:
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (a["step"], key)


def test_sharded_checkpoint_is_the_one_process_format_and_model(sharded, one_process):
    mine = ckpt_io.resolve_checkpoint(sharded / "n4_tied_micro")
    theirs = ckpt_io.resolve_checkpoint(one_process / "n4_tied")
    with safe_open(mine / ckpt_io.WEIGHTS, "pt") as a, safe_open(theirs / ckpt_io.WEIGHTS, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert a.metadata() == b.metadata()  # the tied unembedding stored once, as one process stores it
    state, reference_state = ckpt_io.load_trainer_state(mine), ckpt_io.load_trainer_state(theirs)
    assert state["step"] == reference_state["step"] == STEPS
    assert state["optimizer"]["param_groups"] == reference_state["optimizer"]["param_groups"]
    assert state["optimizer"]["state"].keys() == reference_state["optimizer"]["state"].keys()

    model, _ = load_checkpoint(sharded / "n4_tied_micro")
    reference, _ = load_checkpoint(one_process / "n4_tied")
    assert model.output.weight is model.tok_embeddings.weight
    tokens_BT = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens_BT), reference(tokens_BT), atol=1e-4, rtol=1e-4)


def test_interrupted_then_resumed_sharded_run_matches_an_uninterrupted_one(sharded):
    whole, split = read_metrics(sharded / "n4_tied_micro"), read_metrics(sharded / "split")
    assert [m["step"] for m in split] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in split] == [m["loss"] for m in whole]


def test_sharded_checkpoint_resumes_in_one_process(dataset, sharded, one_process):
    half = sharded / "half"
    assert [m["step"] for m in read_metrics(half)] == [1, 2]
    train(run_config(dataset, half, N4_TIED, micro_batch_size=1, resume=True))
    resumed, reference = read_metrics(half), read_metrics(one_process / "n4_tied")
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed[2:], reference[2:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_fsdp_in_one_process_is_a_one_line_user_error(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(dataset), "--preset", "debug", "--fsdp", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "torchrun" in err
    assert not out.exists()
