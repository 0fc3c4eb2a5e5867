import pytest

from multitoken.config import PRESETS, ModelConfig, preset_config
from multitoken.errors import UserError


def test_defaults_derive_offsets_weights_and_width():
    config = ModelConfig(vocab_size=97, dim=64, n_layers=6, n_heads=4, n_future=4)
    assert config.head_offsets == [1, 2, 3, 4]
    assert config.loss_weights == [1.0] * 4
    assert config.n_kv_heads == 4
    assert config.ffn_hidden % config.multiple_of == 0 and config.ffn_hidden >= 8 * 64 // 3


@pytest.mark.parametrize(
    ("style", "matched", "trunk"),
    [
        ("transformer", True, 2),
        ("transformer", False, 5),
        ("sequential", True, 3),
        ("sequential", False, 6),
        ("linear", True, 6),
    ],
)
def test_trunk_depth_keeps_parameter_matching(style, matched, trunk):
    config = ModelConfig(
        vocab_size=97, dim=64, n_layers=6, n_heads=4, n_future=4, head_style=style, param_matched=matched
    )
    assert config.n_trunk_layers == trunk


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_future=0), "n_future must be at least 1"),
        (dict(n_future=7), "at least as many layers"),
        (dict(head_style="tree"), "head_style must be one of"),
        (dict(n_future=2, head_offsets=[2, 1]), "increasing positive"),
        (dict(n_future=2, head_offsets=[1, 3], head_style="sequential"), "consecutive"),
        (dict(n_future=2, loss_weights=[0, 0]), "at least one positive"),
        (dict(n_kv_heads=3), "divisible by n_kv_heads"),
    ],
)
def test_bad_fields_raise_one_line_user_errors(overrides, message):
    values = dict(vocab_size=97, dim=64, n_layers=6, n_heads=4) | overrides
    with pytest.raises(UserError, match=message) as info:
        ModelConfig(**values)
    assert "\n" not in str(info.value)


def test_presets_build_and_unknowns_are_rejected():
    for name in PRESETS:
        assert preset_config(name, vocab_size=300).vocab_size == 300
    with pytest.raises(UserError, match="unknown preset"):
        preset_config("huge")
    with pytest.raises(UserError, match="unknown model config field"):
        ModelConfig.from_dict({"vocab_size": 10, "dimm": 3})


def test_json_round_trip(tmp_path):
    config = ModelConfig(vocab_size=97, dim=64, n_layers=6, n_heads=4, n_future=2, head_offsets=[1, 4])
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config


def test_yaml_strings_become_numbers_for_numeric_fields():
    """PyYAML reads `1e-3` (no dot) as a string; numeric fields take it as the number it spells."""
    from multitoken.config import dataclass_from_dict
    from multitoken.train import TrainConfig

    cfg = dataclass_from_dict(TrainConfig, {"lr": "1e-3", "batch_size": "16", "micro_batch_size": 4.0})
    assert cfg.lr == 0.001 and cfg.batch_size == 16 and cfg.micro_batch_size == 4
    assert isinstance(cfg.micro_batch_size, int)
    assert dataclass_from_dict(TrainConfig, {"lr": 1}).lr == 1.0
    for values, message in [
        ({"lr": "fast"}, "config field lr must be float, got 'fast'"),
        ({"batch_size": 2.5}, "config field batch_size must be int, got 2.5"),
        ({"batch_size": True}, "config field batch_size must be int, got True"),
        ({"lr": [1]}, "config field lr must be float"),
    ]:
        with pytest.raises(UserError, match=message.replace("[", r"\[")):
            dataclass_from_dict(TrainConfig, values)
