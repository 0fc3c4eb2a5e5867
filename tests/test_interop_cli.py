"""`multitoken import` / `export`: a transformers directory in, a checkpoint that generates, and back out."""

import json
import shutil

import huggingface_hub.constants as hub_constants
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from multitoken.checkpoint import load_checkpoint
from multitoken.cli import main
from multitoken.data.loader import TokenDataset

from helpers import make_corpus

TEXT = ["the quick brown fox jumps over the lazy dog", "def add(a, b):\n    return a + b\n"] * 20
EOS = 3  # `</s>`, named only by the generation config: the tokenizer has no <|endoftext|>


def write_llama_dir(path):
    """A small random Llama with a byte-level BPE tokenizer.json and a generation config, as HF writes them."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=EOS,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "<pad>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer)
    assert tok.token_to_id("</s>") == EOS
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": "{{ x }}"}))
    return hf, tok


def greedy(hf, ids, n):
    """transformers' greedy continuation of `ids`, stopping after EOS."""
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            token = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token == EOS:
            break
    return ids


def test_imported_directory_generates_what_transformers_generates(tmp_path, capsys):
    hf, tok = write_llama_dir(tmp_path / "llama")
    out = tmp_path / "run"
    assert main(["import", str(tmp_path / "llama"), "--out", str(out), "--n-future", "2"]) == 0
    model, tokenizer = load_checkpoint(out)
    assert tokenizer.eos_id == EOS
    ckpt = next((out / "checkpoints").glob("step_*"))
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"] == "{{ x }}"
    prompt = "def add(a, b):"
    ids = tokenizer.encode(prompt)
    assert ids == tok.encode(prompt).ids
    with torch.no_grad():
        torch.testing.assert_close(
            model(torch.tensor([ids]))[0, :, 0], hf(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4
        )
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    expected = tok.decode(greedy(hf, ids, 12)[len(ids) :], skip_special_tokens=False)
    assert expected.strip() and expected in capsys.readouterr().out

    # A corpus prepared with the run's tokenizer keeps its EOS id, so heads can be trained on it.
    corpus = make_corpus(tmp_path / "corpus", 4)
    assert (
        main(["prepare", "--source", str(corpus), "--tokenizer", str(out), "--out", str(tmp_path / "data")])
        == 0
    )
    data_tokenizer = TokenDataset(tmp_path / "data", "train").tokenizer()
    assert data_tokenizer.eos_id == EOS and data_tokenizer.fingerprint() == tokenizer.fingerprint()


def test_exported_directory_loads_in_transformers_with_the_same_logits(tmp_path):
    hf, _ = write_llama_dir(tmp_path / "llama")
    assert main(["import", str(tmp_path / "llama"), "--out", str(tmp_path / "run")]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    tokens_BT = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens_BT).logits, hf(tokens_BT).logits, atol=1e-5, rtol=1e-5)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    cases = [
        (
            ["import", str(moe), "--out", str(tmp_path / "a")],
            "architecture MixtralForCausalLM is not supported",
        ),
        (["import", str(moe), "--out", str(taken)], "already holds something"),
        (["export", "--checkpoint", str(taken), "--out", str(tmp_path / "b")], "is incomplete"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "taken"]
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_hf_names_import_offline_from_a_filled_hub_cache(tmp_path, monkeypatch, capsys):
    """`import hf:ORG/NAME` goes through huggingface_hub's cache: offline, a cached snapshot is enough."""
    source = tmp_path / "source"
    hf, _ = write_llama_dir(source)
    cache = tmp_path / "hub"
    revision = "0" * 40  # the layout huggingface_hub writes: refs/main names the snapshot
    snapshot = cache / "models--org--tiny-llama" / "snapshots" / revision
    shutil.copytree(source, snapshot)
    (cache / "models--org--tiny-llama" / "refs").mkdir()
    (cache / "models--org--tiny-llama" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert main(["import", "hf:org/tiny-llama", "--out", str(tmp_path / "run")]) == 0
    model, _ = load_checkpoint(tmp_path / "run")
    tokens_BT = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens_BT)[:, :, 0], hf(tokens_BT).logits, atol=1e-4, rtol=1e-4)
    assert main(["import", "hf:org/not-cached", "--out", str(tmp_path / "other")]) == 2
    assert "cannot fetch org/not-cached" in capsys.readouterr().err and not (tmp_path / "other").exists()
