"""Code benchmarks through the generator and the sandbox: sampling, stop sequences, scoring, failures."""

import pytest
import torch

from multitoken import ModelConfig, MultiTokenLM
from multitoken.errors import UserError
from multitoken.evals.code_tasks import CodeTask, load_humaneval
from multitoken.evals.codegen import (
    DecodeConfig,
    Sample,
    choose_ks,
    format_codegen,
    generate_samples,
    run_codegen,
    score_in_sandbox,
)
from multitoken.generate import generate
from multitoken.tokenizer import byte_tokenizer


def _model(max_seq_len: int = 1024) -> MultiTokenLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=258, dim=32, n_layers=3, n_heads=2, n_future=2, max_seq_len=max_seq_len)
    return MultiTokenLM(config).eval()


@pytest.fixture(scope="module")
def tasks():
    return load_humaneval()[:3]


def test_choose_ks():
    assert choose_ks(None, 1) == [1]
    assert choose_ks(None, 20) == [1, 10]
    assert choose_ks([10, 1], 10) == [1, 10]
    with pytest.raises(UserError, match="k=10"):
        choose_ks([1, 10], 5)


def test_greedy_samples_equal_plain_greedy_decoding(tasks):
    model, tokenizer = _model(), byte_tokenizer()
    decode = DecodeConfig(n_samples=2, max_new_tokens=8, batch_size=2)
    samples, stats = generate_samples(model, tokenizer, tasks[:2], decode, progress=False)
    assert [s.task_id for s in samples] == ["HumanEval/0", "HumanEval/0", "HumanEval/1", "HumanEval/1"]
    assert samples[0].completion == samples[1].completion  # greedy: one decode, copied
    plain = generate(
        model, [tokenizer.encode(tasks[0].prompt)], 8, speculative=False, eos_id=tokenizer.eos_id
    )
    expected = tokenizer.decode(plain.tokens[0])
    assert expected.startswith(samples[0].completion)  # equal up to the cut at a stop sequence
    assert stats.draft_offsets == [2] and stats.new_tokens > 0  # decoded speculatively with the +2 head


def test_sampled_completions_differ_and_are_cut_at_stops(tasks):
    model, tokenizer = _model(), byte_tokenizer()
    decode = DecodeConfig(n_samples=3, temperature=1.0, top_p=1.0, max_new_tokens=12, batch_size=4, seed=1)
    samples, _ = generate_samples(model, tokenizer, tasks[:1], decode, progress=False)
    assert len(samples) == 3 and len({s.completion for s in samples}) > 1
    for s in samples:
        assert not any(stop in s.completion for stop in tasks[0].stop_sequences)


def test_prompt_longer_than_context_gets_empty_completion(tasks):
    model = _model(max_seq_len=64)  # every HumanEval prompt is longer
    samples, _ = generate_samples(model, byte_tokenizer(), tasks[:1], DecodeConfig(), progress=False)
    assert samples == [Sample("HumanEval/0", "", "no_room")]


def test_run_codegen_random_model_fails_every_task(tmp_path, tasks):
    out = tmp_path / "samples.jsonl"
    report = run_codegen(
        _model(), byte_tokenizer(), "humaneval", tasks[:2], DecodeConfig(max_new_tokens=8), None, out,
        workers=2, progress=False,
    )  # fmt: skip
    assert report.pass_at_k == {1: 0.0} and report.n_samples == 2 and report.n_passed == 0
    assert len(out.read_text().splitlines()) == 2
    assert "pass@1" in format_codegen(report) and "tokens per forward" in format_codegen(report)


def test_sandbox_crash_or_hang_fails_only_that_sample():
    task = CodeTask(
        task_id="T/0",
        prompt="def f():\n",
        canonical_solution="    return 1\n",
        prefix="def f():\n",
        tests="\nassert f() == 1\n",
        stop_sequences=(),
    )
    samples = [
        Sample("T/0", "    return 1\n"),
        Sample("T/0", "    return 1\nimport os\nos._exit(3)\n"),  # the worker dies before the tests
        Sample("T/0", "    return 1\nwhile True:\n    pass\n"),  # hangs until the timeout
        Sample("T/0", "    return 2\n"),
    ]
    pass_k, n_passed = score_in_sandbox(
        samples, {"T/0": task}, [1, 4], workers=4, timeout_s=2.0, progress=False
    )
    assert [s.passed for s in samples] == [True, False, False, False]
    assert n_passed == 1 and pass_k == {1: pytest.approx(0.25), 4: 1.0}
    assert samples[0].result == "passed" and samples[2].result != "passed"
