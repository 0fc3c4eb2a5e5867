"""The lm-eval adapter: log-likelihoods equal our own forward's, rolling windows, generation, a local task."""

import json

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from multitoken import ModelConfig, MultiTokenLM  # noqa: E402
from multitoken.checkpoint import save_checkpoint  # noqa: E402
from multitoken.cli import main  # noqa: E402
from multitoken.evals.lm_eval_adapter import MultiTokenLMEval, score_windows  # noqa: E402
from multitoken.generate import generate  # noqa: E402
from multitoken.tokenizer import byte_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=258, dim=32, n_layers=3, n_heads=2, n_future=2, max_seq_len=64)
    return MultiTokenLM(config).eval()


@pytest.fixture(scope="module")
def lm(model):
    return MultiTokenLMEval(model=model, tokenizer=byte_tokenizer(), batch_size=3)


def _requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _direct(model, seq, n):
    """(sum of next-token log-probs of seq[-n:], all greedy) from model(tokens)[:, :, 0]."""
    with torch.no_grad():
        logprobs_TV = F.log_softmax(model(torch.tensor([seq[:-1]]))[0, :, 0].float(), dim=-1)
    positions = range(len(seq) - n - 1, len(seq) - 1)
    total = sum(float(logprobs_TV[t, seq[t + 1]]) for t in positions)
    greedy = all(int(logprobs_TV[t].argmax()) == seq[t + 1] for t in positions)
    return total, greedy


def _greedy_continuation(model, prompt_ids, n):
    return generate(model, [prompt_ids], n, speculative=False).tokens[0]


def test_score_windows_cover_each_token_once():
    seq = list(range(23))
    windows = list(score_windows(seq, 5, 8))
    assert sum(n for _, n in windows) == 18 and all(len(inp) <= 8 for inp, _ in windows)
    rolled = [w for w in score_windows([99, *range(20)], 1, 8)]
    expected = list(get_rolling_token_windows(list(range(20)), prefix_token=99, max_seq_len=8, context_len=1))
    assert [(inp, n) for inp, n in rolled] == [(inp, len(pred)) for inp, pred in expected]


def test_loglikelihood_equals_direct_forward(model, lm):
    tokenizer = byte_tokenizer()
    pairs = [("def add(a, b):", " return a + b"), ("def", "x"), ("", "hello"), ("a" * 80, " long context")]
    results = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (ctx, cont), (logprob, is_greedy) in zip(pairs, results, strict=True):
        ctx_ids = tokenizer.encode(ctx) or [tokenizer.eos_id]
        cont_ids = tokenizer.encode(cont)
        seq = (ctx_ids + cont_ids)[-(lm.max_length + 1) :]  # the context is cut from the left
        expected, expected_greedy = _direct(model, seq, len(cont_ids))
        assert logprob == pytest.approx(expected, abs=1e-5)
        assert is_greedy == expected_greedy


def test_a_context_that_encodes_to_nothing_is_scored_after_the_prefix_token(model, lm):
    """lm-eval moves trailing spaces into the continuation, so a context of spaces can encode to []."""
    (result,) = lm._loglikelihood_tokens([(None, [], [104, 105])])
    expected, _ = _direct(model, [lm.prefix_token_id, 104, 105], 2)
    assert result[0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("max_length", [0, -1])
def test_max_length_below_one_is_a_user_error(model, max_length):
    from multitoken.errors import UserError

    with pytest.raises(UserError, match="max_length must be at least 1 token"):
        MultiTokenLMEval(model=model, tokenizer=byte_tokenizer(), max_length=max_length)


def test_is_greedy_on_token_level_requests(model, lm):
    context = byte_tokenizer().encode("def add(a, b):")
    greedy = _greedy_continuation(model, context, 6)
    wrong = [*greedy[:-1], (greedy[-1] + 1) % 256]
    results = lm._loglikelihood_tokens([(None, context, greedy), (None, context, wrong)], disable_tqdm=True)
    assert [g for _, g in results] == [True, False]
    for (logprob, _), cont in zip(results, [greedy, wrong], strict=True):
        assert logprob == pytest.approx(_direct(model, context + cont, len(cont))[0], abs=1e-5)


def test_loglikelihood_rolling_fits_and_windows(model, lm):
    tokenizer = byte_tokenizer()
    short, long = "the cat sat on the mat", "the quick brown fox jumps over the lazy dog; " * 4
    assert len(tokenizer.encode(long)) > lm.max_length
    results = lm.loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(short,), (long,)]), disable_tqdm=True
    )
    ids = tokenizer.encode(short)
    assert results[0] == pytest.approx(_direct(model, [tokenizer.eos_id, *ids], len(ids))[0], abs=1e-5)
    # The long text: lm-eval's own rolling windows, each scored by a direct forward.
    ids = tokenizer.encode(long)
    expected = 0.0
    for window in get_rolling_token_windows(ids, tokenizer.eos_id, lm.max_length, 1):
        context, pred = make_disjoint_window(window)
        expected += _direct(model, context + pred, len(pred))[0]
    assert results[1] == pytest.approx(expected, abs=1e-4)


def test_generate_until_matches_greedy_generation(model, lm):
    tokenizer = byte_tokenizer()
    prompts = ["def f(x):", "hello"]
    args = [(p, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}) for p in prompts]
    out = lm.generate_until(_requests("generate_until", args), disable_tqdm=True)
    for prompt, text in zip(prompts, out, strict=True):
        ids = _greedy_continuation(model, tokenizer.encode(prompt), 12)
        full = tokenizer.decode([i for i in ids if i != tokenizer.eos_id])
        assert full.split("\n\n")[0] == text


def _task_dir(tmp_path):
    rows = [
        {"question": f"what is {i} plus one?", "choices": [f" {i + 1}", f" {i + 2}", " a cat"], "answer": 0}
        for i in range(4)
    ]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(
        "task: toy_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf_cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}\\nA:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks


def test_simple_evaluate_on_a_local_task_by_registered_name(tmp_path, model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run = tmp_path / "run"
    save_checkpoint(run, 1, model, byte_tokenizer())
    assert get_model("multitoken") is MultiTokenLMEval
    results = lm_eval.simple_evaluate(
        model="multitoken",
        model_args=f"checkpoint={run},device=cpu,batch_size=4,max_length=48",
        tasks=["toy_mc"],
        batch_size=1,  # as lm_eval's command line always sends; model_args win
        task_manager=TaskManager(include_path=str(_task_dir(tmp_path)), include_defaults=False),
        log_samples=False,
    )
    acc = results["results"]["toy_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0


def test_eval_lm_eval_cli(tmp_path, model, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run = tmp_path / "run"
    save_checkpoint(run, 1, model, byte_tokenizer())
    tasks = _task_dir(tmp_path)
    out = tmp_path / "results.json"
    argv = ["eval", "lm-eval", "--checkpoint", str(run), "--tasks", "toy_mc", "--include-path", str(tasks)]
    assert main([*argv, "--no-builtin-tasks", "--device", "cpu", "--json", str(out)]) == 0
    assert "toy_mc" in capsys.readouterr().out
    assert "acc,none" in json.loads(out.read_text())["results"]["toy_mc"]
    assert main([*argv[:-2], "--tasks", "nope", "--no-builtin-tasks"]) == 2
    assert "unknown lm-eval task(s): nope" in capsys.readouterr().err


def test_the_device_defaults_to_auto_not_lm_evals_cuda():
    from multitoken.evals.lm_eval_adapter import with_default_device

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=258, dim=32, n_layers=2, n_heads=2, max_seq_len=16)
    lm = MultiTokenLMEval(model=MultiTokenLM(config), tokenizer=byte_tokenizer())
    assert lm._device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    run = ["--model", "multitoken", "--model_args", "checkpoint=r", "--tasks", "t"]
    assert with_default_device(run) == [*run, "--device", "auto"]
    assert with_default_device([*run, "--device", "cpu"]) == [*run, "--device", "cpu"]
    assert with_default_device(["ls", "tasks"]) == ["ls", "tasks"]
