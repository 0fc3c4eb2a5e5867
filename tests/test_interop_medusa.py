"""`export --format medusa`: heads of the medusa style, read back exactly the way vLLM's Medusa runs them."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_interop_cli import write_llama_dir

from multitoken.checkpoint import load_checkpoint, save_checkpoint
from multitoken.cli import main


def vllm_medusa_logits(config: dict, weights: dict, x_BTD):
    """vLLM's Medusa (model_executor/models/medusa.py) on the base's final normed hidden states:
    ResidualBlock per head (x = x + SiLU(layer(x)) per layer, bias iff medusa_fc_bias), then its lm_head.
    """
    assert config["truncated_vocab_size"] == config["vocab_size"]  # no token_map
    logits = []
    for h in range(config["num_heads"]):
        y_BTD = x_BTD
        for layer in range(config["num_hidden_layers"]):
            prefix = f"blocks.{h}.layers.{layer}."
            bias = weights[prefix + "bias"] if config.get("medusa_fc_bias", False) else None
            y_BTD = y_BTD + F.silu(F.linear(y_BTD, weights[prefix + "weight"], bias))
        logits.append(F.linear(y_BTD, weights[f"lm_heads.{h}.weight"]) * config.get("logit_scale", 1.0))
    return torch.stack(logits, dim=2)


def test_exported_medusa_heads_give_our_heads_logits_in_vllms_computation(tmp_path):
    hf, _ = write_llama_dir(tmp_path / "llama")
    run = tmp_path / "run"
    argv = ["import", str(tmp_path / "llama"), "--out", str(run), "--n-future", "2", "--head-style", "medusa"]
    assert main(argv) == 0
    model, tokenizer = load_checkpoint(run)
    tokens_BT = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        logits_BTNV = model(tokens_BT)
        for i in (1,):  # imported heads start as the next-token head
            assert torch.equal(logits_BTNV[:, :, i], logits_BTNV[:, :, 0])
        for head in model.heads[1:]:  # as if trained
            head.proj.weight.normal_(0, 0.2)
            head.proj.bias.normal_(0, 0.2)
        logits_BTNV = model(tokens_BT)
    save_checkpoint(tmp_path / "trained", 1, model, tokenizer=tokenizer)

    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "trained"),
                "--format",
                "medusa",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["num_heads"] == 1 and config["num_hidden_layers"] == 1
    assert (config["hidden_size"], config["vocab_size"]) == (64, 300)
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert set(weights) == {
        f"{kind}.{h}.{name}"
        for h in range(1)
        for kind, name in [("blocks", "layers.0.weight"), ("blocks", "layers.0.bias"), ("lm_heads", "weight")]
    }
    with torch.no_grad():
        x_BTD = hf.model(tokens_BT).last_hidden_state  # transformers' final normed hidden state
        theirs_BTNV = vllm_medusa_logits(config, weights, x_BTD)
    torch.testing.assert_close(theirs_BTNV, logits_BTNV[:, :, 1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"n_future": 3, "head_style": "linear"}, "needs heads of --head-style medusa"),
        ({"n_future": 1, "head_style": "medusa"}, "needs extra heads"),
        ({"n_future": 3, "head_style": "medusa", "head_offsets": [1, 2, 4]}, "consecutive tokens"),
    ],
)
def test_heads_vllm_cannot_run_are_refused_and_nothing_is_written(tmp_path, capsys, model, message):
    from multitoken.config import preset_config
    from multitoken.model import MultiTokenLM

    save_checkpoint(tmp_path / "run", 0, MultiTokenLM(preset_config("debug", vocab_size=50, **model)))
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "run"),
                "--format",
                "medusa",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_several_medusa_heads_map_in_order():
    """Medusa head h is our heads[h + 1] (offset h + 2), each with its own block and the base's lm_head."""
    from multitoken.config import preset_config
    from multitoken.interop_medusa import to_medusa
    from multitoken.model import MultiTokenLM

    torch.manual_seed(0)
    model = MultiTokenLM(preset_config("debug", vocab_size=50, n_future=4, head_style="medusa")).eval()
    with torch.no_grad():
        for head in model.heads[1:]:
            head.proj.bias.normal_(0, 0.2)
    config, weights = to_medusa(model)
    assert config["num_heads"] == 3
    tokens_BT = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        rope = model.rope_context(tokens_BT, None)
        x_BTD = model.norm(model.trunk_forward(tokens_BT, rope))
        torch.testing.assert_close(vllm_medusa_logits(config, weights, x_BTD), model(tokens_BT)[:, :, 1:])
