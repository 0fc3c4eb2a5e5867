import pytest
import torch

from multitoken import checkpoint as ckpt_io
from multitoken.errors import UserError
from multitoken.tokenizer import byte_tokenizer

from conftest import tiny_model


def test_save_and_load_round_trip_with_tokenizer(tmp_path):
    model = tiny_model(n_future=2, tie_embeddings=True)
    ckpt_io.save_checkpoint(tmp_path, 5, model, byte_tokenizer(), {"step": 5})
    loaded, tokenizer = ckpt_io.load_checkpoint(tmp_path)
    tokens_BT = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(loaded(tokens_BT), model.eval()(tokens_BT))
    assert loaded.output.weight.data_ptr() == loaded.tok_embeddings.weight.data_ptr()
    assert tokenizer.decode(tokenizer.encode("héllo")) == "héllo"


def test_weights_are_plain_module_keys_even_when_compiled(tmp_path):
    model = tiny_model()
    for block in model.trunk:
        block.compile()
    keys = set(model.state_dict())
    path = ckpt_io.save_checkpoint(tmp_path, 1, model)
    from safetensors import safe_open

    with safe_open(path / ckpt_io.WEIGHTS, "pt") as f:
        saved = set(f.keys())
    assert saved == keys and not any("_orig_mod" in k for k in saved)


def test_a_failed_save_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    ckpt_io.save_checkpoint(tmp_path, 1, model)
    before = ckpt_io.find_latest(tmp_path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_io, "save_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint(tmp_path, 2, model)
    assert ckpt_io.find_latest(tmp_path) == before
    loaded = ckpt_io.load_model(tmp_path)
    torch.testing.assert_close(loaded.output.weight, model.output.weight)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # an interrupted save cleans up
    (tmp_path / "checkpoints" / ".tmp-step_000002-999").mkdir()  # what a kill -9 mid-save leaves
    monkeypatch.undo()
    ckpt_io.save_checkpoint(tmp_path, 3, model)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # cleared by the next save


def test_keep_prunes_old_checkpoints(tmp_path):
    model = tiny_model()
    for step in range(1, 6):
        ckpt_io.save_checkpoint(tmp_path, step, model, keep=2)
    remaining = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert remaining == ["step_000004", "step_000005"]
    assert ckpt_io.find_latest(tmp_path).name == "step_000005"


def test_mismatched_config_and_missing_or_incomplete_checkpoints_are_user_errors(tmp_path):
    ckpt_io.save_checkpoint(tmp_path, 1, tiny_model(n_future=2))
    with pytest.raises(UserError, match="does not match the model: n_future 2 vs 3"):
        ckpt_io.load_weights(tiny_model(n_future=3), ckpt_io.find_latest(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        ckpt_io.load_checkpoint(tmp_path / "nope")
    (ckpt_io.find_latest(tmp_path) / ckpt_io.WEIGHTS).unlink()
    with pytest.raises(UserError, match=r"incomplete: missing model\.safetensors"):
        ckpt_io.load_checkpoint(tmp_path)


def test_pruning_orders_steps_by_number_not_by_name(tmp_path):
    model = tiny_model()
    for step in (999_000, 999_500, 1_000_000, 1_000_500):
        ckpt_io.save_checkpoint(tmp_path, step, model, keep=2)
    remaining = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert remaining == ["step_1000000", "step_1000500"]


def test_a_dangling_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    """A crash between the two renames of a re-save leaves `latest` naming a directory that is gone."""
    model = tiny_model()
    for step in (1, 2, 3):
        ckpt_io.save_checkpoint(tmp_path, step, model)
    root = tmp_path / "checkpoints"
    (root / "step_000003").rename(root / ".old-step_000003-1")
    (root / "step_000002" / ckpt_io.WEIGHTS).unlink()  # an incomplete one is skipped too
    assert ckpt_io.find_latest(tmp_path).name == "step_000001"
    assert ckpt_io.resolve_checkpoint(tmp_path).name == "step_000001"


@pytest.mark.parametrize("tied", [False, True])
def test_read_weights_is_the_state_dict_without_a_model(tmp_path, tied):
    model = tiny_model(tie_embeddings=tied)
    ckpt_io.save_checkpoint(tmp_path, 1, model)
    state = ckpt_io.read_weights(ckpt_io.find_latest(tmp_path))
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    if tied:
        assert state["output.weight"] is state["tok_embeddings.weight"]


def test_checkpoint_steps_ascend_by_number_and_skip_incomplete(tmp_path):
    """The studies list a run's checkpoints through this (they once sorted step names as strings)."""
    for step in (999000, 1000000, 5, 40):
        path = tmp_path / ckpt_io.CHECKPOINTS / f"step_{step}"
        path.mkdir(parents=True)
        (path / ckpt_io.CONFIG).write_text("{}")
    (tmp_path / ckpt_io.CHECKPOINTS / "step_7").mkdir()  # being written: no config yet
    found = ckpt_io.checkpoint_steps(tmp_path)
    assert [s for s, _ in found] == [5, 40, 999000, 1000000]
    assert all(p.name == f"step_{s}" for s, p in found)
