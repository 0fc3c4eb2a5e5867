"""`prepare --source chats.jsonl:messages`: conversations rendered with the tokenizer's chat template."""

import json

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from multitoken.cli import main
from multitoken.tokenizer import load_tokenizer

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tokenizer_dir(path, chat_template):
    """A byte-level BPE tokenizer.json with chat specials, and a tokenizer_config.json as transformers writes."""
    path.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["user: hello there", "assistant: general kenobi"] * 10, trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", **({"chat_template": chat_template} if chat_template else {})}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def conversations(n):
    return [
        [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i * 7}."}]
        for i in range(n)
    ]


def test_chats_are_rendered_with_the_template_and_tokenized(tmp_path):
    chats = conversations(12)
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps({"messages": c, "id": i}) + "\n" for i, c in enumerate(chats)))
    tok_dir = tokenizer_dir(tmp_path / "tok", TEMPLATE)
    out = tmp_path / "data"
    argv = ["prepare", "--source", f"{source}:messages", "--tokenizer", str(tok_dir), "--out", str(out)]
    assert main([*argv, "--val-fraction", "0.2"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    tokenizer = load_tokenizer(out)
    documents = []
    for split in ("train", "val"):
        ids = np.concatenate(
            [np.fromfile(out / s["file"], dtype="<u2") for s in meta["splits"][split]["shards"]]
        )
        documents += tokenizer.decode(ids.tolist()).split("<|endoftext|>")[:-1]
        # The template's specials are single tokens, one <|im_start|> per message.
        assert (
            int((ids == tokenizer.hf.token_to_id("<|im_start|>")).sum())
            == 2 * meta["splits"][split]["documents"]
        )
    # The template by hand: one line per message.
    expected = ["".join(f"<|im_start|>{m['role']}: {m['content']}<|im_end|>\n" for m in c) for c in chats]
    assert sorted(documents) == sorted(expected)


def test_chats_without_a_chat_template_are_one_line_and_nothing_is_written(tmp_path, capsys):
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(3)))
    for tokenizer in [str(tokenizer_dir(tmp_path / "plain", None)), "byte"]:
        argv = [
            "prepare",
            "--source",
            f"{source}:messages",
            "--tokenizer",
            tokenizer,
            "--out",
            str(tmp_path / "o"),
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert (
            "holds chat messages" in err and "no chat template" in err and len(err.strip().splitlines()) == 1
        )
        assert not (tmp_path / "o").exists()
