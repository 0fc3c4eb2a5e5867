"""Decoding: cached == uncached, speculative greedy == greedy, stopping rules, bad input, the CLI."""

import json
import sys
import types

import pytest
import torch

import multitoken.generate_cli as generate_cli_module
from multitoken.decoding import DecodeBatch
from multitoken.errors import UserError
from multitoken.generate import generate
from multitoken.generate_cli import generate_cli
from multitoken.loss import multi_token_backward
from multitoken.row_output import RowOutput
from multitoken.tokenizer import byte_tokenizer

from conftest import HEAD_STYLES, tiny_model

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [12, 13]]


def agreeing_model(style: str, n: int, seed: int = 0, n_layers: int = 6):
    """A model whose drafting heads mostly agree with the next-token head, so blocks get accepted.

    Tied embeddings with strong residual blocks make greedy decoding repeat a token for a while and then
    switch; extra heads that copy the next-token head then draft correctly except at the switches.
    """
    model = tiny_model(seed, n_future=n, head_style=style, tie_embeddings=True, n_layers=n_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                param.mul_(30)
        for head in list(model.heads)[1:]:
            if style == "transformer":
                head.load_state_dict(model.heads[0].state_dict())
            elif style in (
                "linear",
                "medusa",
                "conditioned",
            ):  # x + SiLU(0) = x: the next-token head's output
                head.proj.weight.zero_()
                if head.proj.bias is not None:
                    head.proj.bias.zero_()
            else:  # read only the previous depth's state, through a block that passes it on
                dim = model.config.dim
                head.proj.weight.zero_()
                head.proj.weight[:, :dim] = torch.eye(dim)
                head.block.attn.wo.weight.zero_()
                head.block.mlp.w2.weight.zero_()
    return model.double().eval()


def first_repeat_free_token(tokens):
    """A token from the middle of a greedy output, to use as an EOS that cuts it there."""
    for t in tokens[len(tokens) // 2 :]:
        if tokens.index(t) >= len(tokens) // 3:
            return t
    return tokens[-1]


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("style", HEAD_STYLES)
def test_speculative_greedy_equals_greedy(style, n):
    n_layers = max(6, n)
    random = tiny_model(n, n_future=n, head_style=style, n_layers=n_layers).double().eval()
    agreeing = agreeing_model(style, n, n_layers=n_layers)
    for model in (random, agreeing):
        for prompts in (PROMPTS, PROMPTS[1:2]):
            plain = generate(model, prompts, 19, speculative=False)
            spec = generate(model, prompts, 19, speculative=True)
            assert spec.tokens == plain.tokens
            assert plain.stats.tokens_per_forward == 1.0
            assert len(spec.stats.acceptance_per_head) == n - 1
    assert spec.stats.tokens_per_forward > 1.5  # the agreeing model really accepts blocks
    # An EOS in the middle of accepted blocks ends each row where plain greedy ends it.
    eos = first_repeat_free_token(plain.tokens[0])
    plain = generate(agreeing, PROMPTS, 19, speculative=False, eos_id=eos)
    spec = generate(agreeing, PROMPTS, 19, speculative=True, eos_id=eos)
    assert spec.tokens == plain.tokens and spec.finish_reasons == plain.finish_reasons
    assert "eos" in spec.finish_reasons


@pytest.mark.parametrize("style", HEAD_STYLES)
def test_cached_decoding_logits_equal_full_forward(style):
    """The logits behind every generated token equal those of one full pass over the final sequence."""
    model = tiny_model(1, n_future=3, head_style=style).double().eval()
    for speculative in (False, True):
        out = generate(model, PROMPTS, 12, speculative=speculative, return_logits=True)
        for prompt, tokens, logits_TV in zip(PROMPTS, out.tokens, out.logits, strict=True):
            full_TV = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1, 0]
            torch.testing.assert_close(logits_TV, full_TV.float(), atol=1e-6, rtol=1e-6)
            assert tokens == full_TV.argmax(-1).tolist()  # greedy: each token is the argmax


def test_far_offsets_draft_with_contiguous_heads_only():
    model = tiny_model(0, n_future=4, head_offsets=[1, 2, 4, 8]).double().eval()
    auto = generate(model, PROMPTS, 10)
    assert auto.stats.draft_offsets == [2] and len(auto.stats.acceptance_per_head) == 1
    assert auto.tokens == generate(model, PROMPTS, 10, speculative=False).tokens
    assert generate(tiny_model(0), PROMPTS, 5).stats.draft_offsets == []


def test_full_context_and_zero_tokens():
    model = tiny_model(0, n_future=2, max_seq_len=16).eval()
    out = generate(model, [[1] * 6], 10)
    assert len(out.tokens[0]) == 10 and out.finish_reasons == ["length"]
    empty = generate(model, [[1, 2]], 0)
    assert empty.tokens == [[]] and empty.stats.new_tokens == 0


class CharTokenizer:
    """Token i is the letter chr(97 + i % 26)."""

    eos_id = 0

    def encode(self, text):
        return [ord(c) - 97 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.mark.parametrize("style", ["linear", "transformer"])
def test_rows_that_finish_leave_the_batch_and_the_rest_decode_as_alone(style, monkeypatch):
    """Rows ended by a stop string are dropped from the batch (caches moved) once half are done; every
    row's output is still what decoding it alone gives, plainly or speculatively."""
    model, tok = agreeing_model(style, 4), CharTokenizer()
    prompts = [[1 + (3 * b + i) % 40 for i in range(2 + b % 3)] for b in range(8)]
    alone = [generate(model, [p], 24, speculative=False).tokens[0] for p in prompts]
    stops = [tok.decode(row[3:5]) for row in alone[:6]]  # six rows end early, two may run on
    alone = [generate(model, [p], 24, speculative=False, stop_strings=stops, tokenizer=tok) for p in prompts]
    assert sum(row.finish_reasons[0] == "stop" for row in alone) >= 6
    kept = []
    keep_rows = DecodeBatch.keep_rows
    monkeypatch.setattr(
        DecodeBatch, "keep_rows", lambda self, keep: (kept.append(keep), keep_rows(self, keep))
    )
    for speculative in (False, True, None):
        out = generate(model, prompts, 24, speculative=speculative, stop_strings=stops, tokenizer=tok)
        assert out.tokens == [row.tokens[0] for row in alone]
        assert out.finish_reasons == [row.finish_reasons[0] for row in alone]
    assert kept  # rows did leave the batch


def test_stop_strings_and_streaming():
    model = agreeing_model("transformer", 4)
    tok = CharTokenizer()
    plain = generate(model, PROMPTS, 19, speculative=False, tokenizer=tok)
    stop = tok.decode(plain.tokens[0][7:9])
    streamed = {}
    out = generate(
        model,
        PROMPTS,
        19,
        stop_strings=[stop],
        tokenizer=tok,
        on_tokens=lambda row, ids: streamed.setdefault(row, []).extend(ids),
    )
    first = plain.text[0].index(stop) + len(stop)
    assert out.text[0] == plain.text[0][:first] and out.finish_reasons[0] == "stop"
    for row in range(len(PROMPTS)):
        assert streamed.get(row, []) == out.tokens[row]
        assert out.text[row] == tok.decode(out.tokens[row])
        assert plain.tokens[row][: len(out.tokens[row])] == out.tokens[row]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt_ids=[]), "no prompts"),
        (dict(prompt_ids=[[1], []]), "prompt 1 is empty"),
        (dict(prompt_ids=[[1, 500]]), "outside the vocabulary"),
        (
            dict(max_new_tokens=200),
            "prompt of 2 tokens + max_new_tokens=200 = 202 exceeds the model's context of 128",
        ),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (
            dict(speculative=True),
            "this model has one head; use --no-speculative or train with --n-future > 1",
        ),
        (dict(speculative="maybe"), "speculative must be None (adaptive), True or False"),
        (dict(stop_strings=["x"]), "tokenizer"),
        (dict(stop_strings=[""]), "stop string is empty"),
        (dict(stop_strings="ab"), "not one string"),
        (dict(temperature=float("nan")), "finite"),
        (dict(prompt_ids=[1, 2]), "prompt 0 is int, not a list of token ids"),
        (dict(prompt_ids=["def"]), "prompt 0 is str"),
        (dict(prompt_ids=torch.ones(1, 2, dtype=torch.long)), "not a tensor"),
        (dict(prompt_ids=[[1, 2.0]]), "other than integer token ids"),
    ],
)
def test_bad_input_raises_one_line_user_error(kwargs, message):
    model = tiny_model(0)
    args = dict(prompt_ids=[[1, 2]], max_new_tokens=4) | kwargs
    with pytest.raises(UserError) as info:
        generate(model, args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_speculative_true_needs_offset_two_head():
    model = tiny_model(0, n_future=2, head_offsets=[1, 3])
    with pytest.raises(UserError, match="one head"):
        generate(model, [[1]], 2, speculative=True)


def test_trained_model_accepts_drafts():
    """A model trained a little on a stream of repeated 4-token words drafts most of a word correctly."""
    torch.manual_seed(0)
    words = torch.randint(3, 97, (6, 4))
    stream = words[torch.randint(0, 6, (4000,))].flatten()
    model = tiny_model(0, n_future=3, head_style="sequential", dim=32, n_heads=2, n_kv_heads=1, n_layers=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        starts = torch.randint(0, len(stream) - 33, (8,))
        opt.zero_grad()
        multi_token_backward(model, torch.stack([stream[s : s + 32] for s in starts]))
        opt.step()
    model.eval()
    prompts = [stream[4 * i : 4 * i + 9].tolist() for i in range(4)]
    plain = generate(model, prompts, 24, speculative=False)
    spec = generate(model, prompts, 24, speculative=True)
    assert spec.tokens == plain.tokens
    assert spec.stats.tokens_per_forward > 1.5
    assert generate(model, prompts, 24).tokens == plain.tokens  # whatever plans the policy picks


def serve_as_checkpoint(monkeypatch, model) -> None:
    """Make generate_cli's load_checkpoint return `model` with a CharTokenizer, whatever the path."""
    fake = types.ModuleType("multitoken.checkpoint")
    fake.load_checkpoint = lambda path, device="cpu": (model, CharTokenizer())
    monkeypatch.setitem(sys.modules, "multitoken.checkpoint", fake)


def test_generate_cli_streams_and_writes_stats(tmp_path, monkeypatch, capsys):
    model = agreeing_model("linear", 3).float()
    serve_as_checkpoint(monkeypatch, model)
    stats_file = tmp_path / "stats.json"
    generate_cli(
        "ckpt",
        prompt="bcd",
        max_new_tokens=12,
        stats=True,
        stats_json=str(stats_file),
        device="cpu",
        compare_plain=True,
    )
    captured = capsys.readouterr()
    expected = CharTokenizer().decode(generate(model, [[1, 2, 3]], 12, eos_id=0).tokens[0])
    assert captured.out == "bcd" + expected + "\n"
    assert "tokens per forward" in captured.err and "outputs identical" in captured.err
    record = json.loads(stats_file.read_text())
    assert record["draft_offsets"] == [2, 3] and record["tokens_per_forward"] > 1
    assert record["identical_to_plain"] and record["plain"]["tokens_per_forward"] == 1.0

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("bcd\n\nfgh\nkl\n")
    generate_cli("ckpt", prompt_file=str(prompts), max_new_tokens=5, batch_size=2, device="cpu")
    assert capsys.readouterr().out.count("\n---\n") == 3
    with pytest.raises(UserError, match="exactly one"):
        generate_cli("ckpt", device="cpu")


def test_compare_plain_can_time_on_the_process_cpu_clock(tmp_path, monkeypatch):
    """--compare-clock cpu times each call on its clock (a fake one ticking 1 s per read)."""
    serve_as_checkpoint(monkeypatch, agreeing_model("linear", 3).float())
    ticks = iter(range(1000))
    monkeypatch.setitem(generate_cli_module.COMPARE_CLOCKS, "cpu", lambda: float(next(ticks)))
    stats_file = tmp_path / "stats.json"
    generate_cli("ckpt", prompt="bcd", max_new_tokens=12, device="cpu", compare_plain=True,
                 compare_clock="cpu", stats_json=str(stats_file))  # fmt: skip
    record = json.loads(stats_file.read_text())
    assert record["seconds"] == 1.0 and record["plain"]["seconds"] == 1.0 and record["speedups"] == [1.0]
    with pytest.raises(UserError, match="--compare-clock"):
        generate_cli("ckpt", prompt="bcd", device="cpu", compare_plain=True, compare_clock="gpu")


def test_compiled_decoding_step_matches_eager_and_is_reused():
    """torch.compile of the step (CPU inductor here): same tokens, and one graph serves other prompt lengths."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_model(3, n_future=2, head_style="linear", n_layers=2).eval()
    for prompts in (PROMPTS, [[7] * 9, [3, 1, 4, 1, 5], [2], [6, 6]]):
        eager = generate(model, prompts, 12, speculative=True)
        compiled = generate(model, prompts, 12, compile=True, speculative=True)
        assert compiled.tokens == eager.tokens
    assert counters["stats"]["unique_graphs"] == 1  # the cache length bucket kept the shapes static
    adaptive = generate(model, PROMPTS, 12, compile=True)  # plans of other block sizes: more graphs
    assert adaptive.tokens == generate(model, PROMPTS, 12, speculative=False).tokens


def _first_stop_reference(tokenizer, tokens: list[int], stops: list[str]) -> int | None:
    """Tokens kept by a whole-text search: the shortest prefix whose text contains a stop string."""
    for n in range(1, len(tokens) + 1):
        if any(s in tokenizer.decode(tokens[:n]) for s in stops):
            return n
    return None


@pytest.mark.parametrize("stops", [["b"], ["ll"], ["é"], ["🙂"], ["wörld,"], ["é", "🙂 a"], ["zz"]])
def test_stop_strings_found_from_the_text_tail_equal_a_whole_text_search(stops):
    tokenizer = byte_tokenizer()
    tokens = tokenizer.encode("hello wörld, é and 🙂 again ab " * 3)
    rng = torch.Generator().manual_seed(0)
    for run in range(5):
        row, at = RowOutput(len(tokens), stop_strings=stops, tokenizer=tokenizer), 0
        while not row.done and at < len(tokens):
            size = 1 if run == 0 else int(torch.randint(1, 5, (1,), generator=rng))
            row.add(tokens[at : at + size])
            at += size
        expected = _first_stop_reference(tokenizer, tokens, stops)
        assert len(row.tokens) == (expected if expected is not None else len(tokens))
        assert row.reason == ("stop" if expected is not None else "length")
