"""The training progress bar shows the next-token loss, the quantity that validation reports."""

from types import SimpleNamespace

from multitoken.train_log import TrainLogger


def test_progress_bar_shows_next_token_loss(tmp_path):
    cfg = SimpleNamespace(tensorboard=False, progress=True, max_steps=3, log_every=1)
    logger = TrainLogger(tmp_path, cfg, start_step=0)
    logger.log(1, {"loss": 22.0, "loss_head1": 4.5, "loss_head2": 5.5, "tokens_per_s": 100.0, "lr": 1e-3})
    assert "loss=4.500" in logger.bar.postfix and "22" not in logger.bar.postfix
    logger.log(2, {"loss": 3.25, "tokens_per_s": 100.0, "lr": 1e-3})  # one head: the loss itself
    assert "loss=3.250" in logger.bar.postfix
    logger.close()
    assert '"loss": 22.0' in (tmp_path / "metrics.jsonl").read_text()  # the file keeps the sum
