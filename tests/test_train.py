import os
import subprocess
import sys
from pathlib import Path

import pytest

from multitoken import generate, load_checkpoint
from multitoken.train import Trainer, lr_at, train

from helpers import STORY, debug_config, make_dataset, read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train"))


def test_debug_preset_learns_a_repetitive_corpus(dataset, tmp_path):
    cfg = debug_config(
        dataset, tmp_path / "run", max_steps=150, warmup_steps=10, batch_size=8, seq_len=64, val_every=150
    )
    last = train(cfg)
    first = read_metrics(tmp_path / "run")[0]
    assert first["loss"] > 2 * 4.0  # two heads near ln(258) each at the start
    assert last["loss_head1"] < 0.35 * first["loss_head1"]
    assert last["val_loss"] < 1.5

    # The trained checkpoint drafts its own tokens on the text it learned, without changing the output.
    model, tokenizer = load_checkpoint(tmp_path / "run")
    prompt = tokenizer.encode(STORY[:20])
    plain = generate(model, [prompt], 60, speculative=False)
    spec = generate(model, [prompt], 60)
    assert spec.tokens == plain.tokens
    assert spec.stats.tokens_per_forward > 1.2


def test_metrics_lines_have_the_contract_fields(dataset, tmp_path):
    train(debug_config(dataset, tmp_path / "run", max_steps=4, val_every=2))
    lines = read_metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for m in lines:
        assert {"step", "loss", "lr", "tokens_per_s", "loss_head1", "loss_head2"} <= m.keys()
    assert "val_loss" in lines[1] and "val_acc_head2" in lines[3] and "val_loss" not in lines[0]


def test_same_seed_gives_same_losses(dataset, tmp_path):
    train(debug_config(dataset, tmp_path / "a"))
    train(debug_config(dataset, tmp_path / "b"))
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [
        m["loss"] for m in read_metrics(tmp_path / "b")
    ]


def test_interrupted_then_resumed_run_matches_an_uninterrupted_one(dataset, tmp_path):
    train(debug_config(dataset, tmp_path / "whole", max_steps=10))

    trainer = Trainer(debug_config(dataset, tmp_path / "split", max_steps=10))
    original_step = trainer.train_step

    def step_then_interrupt():
        metrics = original_step()
        if trainer.step == 6:
            trainer._request_stop(None, None)  # what SIGINT does
        return metrics

    trainer.train_step = step_then_interrupt
    trainer.fit()
    assert [m["step"] for m in read_metrics(tmp_path / "split")][-1] == 6
    train(debug_config(dataset, tmp_path / "split", max_steps=10, resume=True))

    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [m["step"] for m in split] == list(range(1, 11))
    assert [m["loss"] for m in split] == [m["loss"] for m in whole]


def test_gradient_accumulation_matches_one_big_batch(dataset, tmp_path):
    train(debug_config(dataset, tmp_path / "big"))
    train(debug_config(dataset, tmp_path / "micro", micro_batch_size=1))
    for big, micro in zip(read_metrics(tmp_path / "big"), read_metrics(tmp_path / "micro"), strict=True):
        assert micro["loss"] == pytest.approx(big["loss"], abs=1e-5)


def test_lr_schedule_warms_up_then_decays_to_the_floor(dataset, tmp_path):
    cfg = debug_config(dataset, tmp_path, lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(40, cfg) > lr_at(60, cfg)


def test_two_gloo_processes_match_one_process(dataset, tmp_path):
    steps = 5
    args = [
        "train",
        "--data",
        str(dataset),
        "--preset",
        "debug",
        "--n-future",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--max-steps",
        str(steps),
        "--warmup-steps",
        "2",
        "--log-every",
        "1",
        "--val-every",
        "0",
        "--no-tensorboard",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "multitoken", *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = subprocess.run(
        [*launcher, "-m", "multitoken", *args, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == steps
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
