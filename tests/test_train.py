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
    spec = generate(model, [prompt], 60, speculative=True)
    assert spec.tokens == plain.tokens
    assert spec.stats.tokens_per_forward > 1.2
    assert generate(model, [prompt], 60).tokens == plain.tokens  # the default, whatever it drafts


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
    # CPU gloo runs by design, also on a GPU machine (where rank 1 would ask for a second GPU).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
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


def test_a_validation_split_too_short_for_the_windows_fails_before_training(dataset, tmp_path):
    from multitoken.data.loader import TokenDataset
    from multitoken.errors import UserError

    val_tokens = TokenDataset(str(dataset), "val").n_tokens
    cfg = debug_config(
        dataset, tmp_path / "run", seq_len=val_tokens, model={"n_future": 2, "max_seq_len": val_tokens}
    )
    with pytest.raises(UserError, match=f"validation data has {val_tokens} tokens, too few"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_a_run_that_never_saved_can_start_over_but_not_as_another_run(dataset, tmp_path, monkeypatch):
    from multitoken.errors import UserError

    cfg = debug_config(dataset, tmp_path / "run", max_steps=4, save_every=0)
    monkeypatch.setattr(Trainer, "train_step", lambda self: 1 / 0)  # crashes before any checkpoint
    with pytest.raises(ZeroDivisionError):
        train(cfg)
    monkeypatch.undo()
    with pytest.raises(UserError, match="stopped before its first save: start it again without --resume"):
        Trainer(debug_config(dataset, tmp_path / "run", max_steps=4, resume=True))
    with pytest.raises(UserError, match=r"holds a different run \(differs in lr\)"):
        Trainer(debug_config(dataset, tmp_path / "run", max_steps=4, lr=1e-2))
    train(cfg)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_a_second_resume_keeps_the_first_resumes_max_steps(dataset, tmp_path, monkeypatch):
    from multitoken import checkpoint as ckpt_io
    from multitoken.train import resolve_cli_config

    out = tmp_path / "run"
    train(debug_config(dataset, out, max_steps=2))
    train(resolve_cli_config({"out": str(out), "resume": True, "max_steps": 4}))
    again = resolve_cli_config({"out": str(out), "resume": True})
    assert again.max_steps == 4 and again.resume
    saves = []
    monkeypatch.setattr(ckpt_io, "save_checkpoint", lambda *a, **k: saves.append(a))
    train(again)  # at max_steps already: nothing to train, and no second save of step 4
    assert saves == []


def test_a_diverged_step_is_refused_not_applied(dataset, tmp_path):
    import math

    import torch

    from multitoken.train import NonFiniteLoss

    trainer = Trainer(
        debug_config(dataset, tmp_path / "run", model={"n_future": 2, "loss_weights": [1.0, 0.0]})
    )
    assert math.isfinite(trainer.train_step()["loss"])  # the weight-0 head's NaN placeholder is dropped
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="non-finite at step 2"):
        trainer.train_step()
    assert trainer.step == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(micro_batch_size=-4), "micro_batch_size must be >= 0"),
        (dict(grad_clip=-1.0), "grad_clip must be >= 0"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
        (dict(min_lr_ratio=-1.0), r"min_lr_ratio must be in \[0, 1\]"),
        (dict(beta2=1.5), r"beta2 must be in \[0, 1\)"),
    ],
)
def test_out_of_range_settings_are_user_errors(dataset, tmp_path, overrides, message):
    from multitoken.errors import UserError

    with pytest.raises(UserError, match=message):
        debug_config(dataset, tmp_path / "run", **overrides)


def test_a_head_offset_past_every_window_is_a_user_error(dataset, tmp_path):
    from multitoken.errors import UserError

    cfg = debug_config(dataset, tmp_path / "run", seq_len=8, model={"n_future": 2, "head_offsets": [1, 16]})
    with pytest.raises(UserError, match="head offset 16 reaches past every window of seq_len=8"):
        Trainer(cfg)


def test_loss_after_trains_on_the_marked_targets_only(dataset, tmp_path):
    import torch

    from multitoken.loss import head_metrics

    cfg = debug_config(dataset, tmp_path / "run", max_steps=1, loss_after=" ")
    trainer = Trainer(cfg)
    space = trainer.tokenizer.encode(" ")[0]
    tokens_BT = trainer.train_data.batch_for(cfg.seed, 0, cfg.batch_size, cfg.seq_len, 0, cfg.batch_size)
    eos = trainer.train_data.eos_id
    with torch.no_grad():
        loss_N, _, count_N = head_metrics(trainer.model, tokens_BT, sep_id=eos, loss_after_id=space)
        _, _, all_N = head_metrics(trainer.model, tokens_BT, sep_id=eos)
    assert 0 < count_N[0] < all_N[0]  # the first word of every document is left out
    metrics = trainer.train_step()
    expected_N = (loss_N / count_N).tolist()
    assert [metrics["loss_head1"], metrics["loss_head2"]] == pytest.approx(expected_N, rel=1e-5)


def test_loss_after_must_be_one_token(dataset, tmp_path):
    from multitoken.errors import UserError

    with pytest.raises(UserError, match="must be one token"):
        Trainer(debug_config(dataset, tmp_path / "run", loss_after="=="))
