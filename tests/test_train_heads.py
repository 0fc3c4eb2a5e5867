"""`train --init-from DIR --train heads`: extra heads learn on a frozen base whose next-token path stays bit-identical."""

import pytest
import torch

from multitoken.checkpoint import load_model, load_trainer_state, save_checkpoint
from multitoken.cli import main
from multitoken.config import preset_config
from multitoken.data.loader import TokenDataset
from multitoken.model import MultiTokenLM
from multitoken.tokenizer import train_bpe
from multitoken.train import train

from helpers import debug_config, make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("heads"))


def base_checkpoint(data, out, **model):
    """A random debug-size base with extra heads, saved with the data's tokenizer (as `import` would)."""
    dataset = TokenDataset(data, "train")
    torch.manual_seed(0)
    base = MultiTokenLM(preset_config("debug", vocab_size=dataset.vocab_size, **model))
    save_checkpoint(out, 0, base, tokenizer=dataset.tokenizer())
    return base


@pytest.mark.parametrize("style", ["linear", "transformer"])
def test_heads_train_and_the_next_token_path_stays_bitwise_the_base(data, tmp_path, style):
    base = base_checkpoint(data, tmp_path / "base", n_future=3, head_style=style)
    cfg = debug_config(data, tmp_path / "run", model={}, init_from=str(tmp_path / "base"), train="heads")
    cfg.max_steps = 4
    train(cfg)
    trained = load_model(tmp_path / "run")
    before, after = base.state_dict(), trained.state_dict()
    extra = [n for n in after if n.startswith("heads.") and not n.startswith("heads.0.")]
    for name in after:
        if name in extra:
            continue
        assert torch.equal(before[name], after[name]), f"{name} changed"
    assert any(not torch.equal(before[n], after[n]) for n in extra)  # the heads did learn
    tokens_BT = torch.randint(0, base.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(base.eval()(tokens_BT)[:, :, 0], trained(tokens_BT)[:, :, 0])
    optimizer = load_trainer_state(next((tmp_path / "run" / "checkpoints").glob("step_*")))["optimizer"]
    n_held = sum(len(group["params"]) for group in optimizer["param_groups"])
    assert n_held == len(extra)  # the optimizer holds head parameters only


def test_bad_input_is_refused_before_anything_is_written(data, tmp_path, capsys):
    base_checkpoint(data, tmp_path / "one", n_future=1)
    base_checkpoint(data, tmp_path / "two", n_future=2)
    other = train_bpe(
        ["some other text to learn merges from"] * 5, 270
    )  # 270 ids: fits the byte data's model
    torch.manual_seed(0)
    bpe_model = MultiTokenLM(preset_config("debug", vocab_size=270, n_future=2))
    save_checkpoint(tmp_path / "bpe", 0, bpe_model, tokenizer=other)
    (tmp_path / "empty").mkdir()
    common = [
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    cases = [
        (["--init-from", str(tmp_path / "one"), "--train", "heads"], "needs a model with extra heads"),
        (["--init-from", str(tmp_path / "empty")], "is incomplete"),
        (["--init-from", str(tmp_path / "two"), "--dim", "32"], "--init-from takes the model from"),
        (["--init-from", str(tmp_path / "bpe"), "--train", "heads"], "tokenized with another tokenizer"),
        (["--init-from", str(tmp_path / "two"), "--distill"], "add --train heads"),
        (["--init-from", str(tmp_path / "two"), "--head-style", "conditioned"], "add --train heads"),
        (
            ["--init-from", str(tmp_path / "two"), "--train", "heads", "--head-style", "linear"],
            "not transformer into linear",
        ),
    ]
    for extra, message in cases:
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "old, new", [("linear", "conditioned"), ("conditioned", "linear"), ("linear", "medusa")]
)
def test_new_heads_of_another_style_on_the_same_trunk(data, tmp_path, old, new):
    """--head-style with --train heads: the trunk and next-token path load unchanged; linear heads become
    conditioned ones computing what they computed (and back); other new heads start as the next-token head."""
    base = base_checkpoint(data, tmp_path / "base", n_future=3, head_style=old).eval()
    with torch.no_grad():
        for head in list(base.heads)[1:]:  # heads that differ from the next-token head and read the token
            head.proj.weight.normal_(0, 0.1)
    save_checkpoint(tmp_path / "base", 1, base)
    cfg = debug_config(data, tmp_path / "run", model={"head_style": new}, init_from=str(tmp_path / "base"))
    cfg.train, cfg.max_steps, cfg.lr = "heads", 1, 0.0  # one step that changes nothing: the loaded heads
    train(cfg)
    restyled = load_model(tmp_path / "run")
    assert restyled.config.head_style == new
    tokens_BT = torch.randint(0, base.config.vocab_size, (2, 24))
    with torch.no_grad():
        before_BTNV, after_BTNV = base(tokens_BT), restyled(tokens_BT)
    assert torch.equal(before_BTNV[:, :, 0], after_BTNV[:, :, 0])
    if new == "medusa":  # new heads: W zero, the next-token head's logits
        torch.testing.assert_close(after_BTNV[:, :, 1:], after_BTNV[:, :, :1].expand_as(after_BTNV[:, :, 1:]))
        return
    if old == "conditioned":  # the token's columns are dropped, the trunk's kept
        for before, after in zip(list(base.heads)[1:], list(restyled.heads)[1:], strict=True):
            assert torch.equal(after.proj.weight, before.proj.weight[:, : base.config.dim])
        return
    torch.testing.assert_close(after_BTNV, before_BTNV)
