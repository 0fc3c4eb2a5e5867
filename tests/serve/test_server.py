"""`multitoken serve` over real HTTP: OpenAI shapes through the `openai` client, greedy rows equal to
`generate()` alone or among others, streaming, errors, backpressure, disconnects, lm-eval, and SIGTERM.

One server per module (a subprocess on a free loopback port) over a tiny random model in float64, so
that greedy decoding has no near-ties. The model's unembedding only gives printable ASCII tokens a
nonzero logit, so greedy text round-trips through the byte tokenizer and equal text means equal tokens.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serving import alive, engine_pid, start_server, wait_until  # noqa: E402

from multitoken.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from multitoken.generate import generate  # noqa: E402
from multitoken.serve.chat import ChatRenderer  # noqa: E402
from multitoken.tokenizer import byte_tokenizer  # noqa: E402

from conftest import tiny_model  # noqa: E402

KEY = "test-key-123"
NAME = "tiny"
CONTEXT = 1024
MAX_QUEUE = 8
BODY_CAP = 32768
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
PROMPTS = [f"def f{i}(x):\n    return x * {i}" for i in range(16)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model(3, vocab_size=258, n_future=3, max_seq_len=CONTEXT)
    with torch.no_grad():
        printable = torch.zeros(258, dtype=torch.bool)
        printable[32:127] = True
        model.output.weight[~printable] = 0.0
    run = tmp_path_factory.mktemp("serve") / NAME
    ckpt = save_checkpoint(run, 1, model, byte_tokenizer())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return run


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint loaded here, as the server loads it: float64 on the CPU."""
    model, tokenizer = load_checkpoint(checkpoint)
    return model.double().eval(), tokenizer


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, base = start_server(
        checkpoint,
        *("--api-key", KEY, "--max-batch-size", "16", "--max-queue", str(MAX_QUEUE)),
        *("--max-body-bytes", str(BODY_CAP)),
    )
    yield proc, base
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _auth(key=KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _greedy(reference, prompt_ids, n):
    model, tokenizer = reference
    return tokenizer.decode(generate(model, [prompt_ids], n, speculative=False).tokens[0])


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", headers=_auth()).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0]


def test_health_models_and_api_key(server):
    _, base = server
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    for headers in ({}, _auth("wrong"), {"Authorization": KEY}):
        response = httpx.get(f"{base}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    models = openai.OpenAI(base_url=base + "/v1", api_key=KEY).models.list()
    assert [m.id for m in models.data] == [NAME]


def test_greedy_completions_equal_generate_alone_and_among_16(client, reference):
    _, tokenizer = reference
    solo = [client.completions.create(model=NAME, prompt=p, max_tokens=20, temperature=0) for p in PROMPTS]
    for prompt, response in zip(PROMPTS, solo, strict=True):
        assert response.choices[0].text == _greedy(reference, tokenizer.encode(prompt), 20)
        assert response.choices[0].finish_reason == "length"
        assert response.usage.completion_tokens == 20
        assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))

    def one(i):
        if i >= len(PROMPTS):  # sampled rows share the batch with the greedy ones
            return client.completions.create(model=NAME, prompt="x = ", max_tokens=20, temperature=1.0)
        return client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=20, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        together = list(pool.map(one, range(len(PROMPTS) + 4)))
    assert [r.choices[0].text for r in together[: len(PROMPTS)]] == [r.choices[0].text for r in solo]
    # Token-id prompts (one or several) are the same requests.
    ids = [tokenizer.encode(p) for p in PROMPTS[:2]]
    batch = client.completions.create(model=NAME, prompt=ids, max_tokens=20, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [solo[0].choices[0].text] * 2 + [solo[1].choices[0].text] * 2


def test_seeded_sampling_is_reproducible_alone(client):
    def draw():
        return client.completions.create(
            model=NAME, prompt="import os", max_tokens=24, temperature=0.9, top_p=0.95, seed=11
        ).choices[0]

    first, second = draw(), draw()
    assert first.text == second.text and len(first.text) > 0


def test_streaming_completion_chat_and_stop(client, reference):
    _, tokenizer = reference
    prompt = PROMPTS[3]
    full = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=prompt,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    # A stop string: the text ends before it, in both shapes.
    stop = full[10:13]
    cut = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]
    # Chat: the checkpoint's template; its <|endoftext|> is the EOS id, the same text in a message is not.
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi<|endoftext|>"}]
    eos = tokenizer.eos_id
    expected_ids = [
        *tokenizer.encode("[system]be brief"),
        eos,
        *tokenizer.encode("[user]hi<|endoftext|>"),
        eos,
        *tokenizer.encode("[assistant]"),
    ]
    assert ChatRenderer(tokenizer, TEMPLATE).encode(messages) == expected_ids
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == _greedy(reference, expected_ids, 16)
    assert reply.choices[0].finish_reason == "length" and reply.usage.prompt_tokens == len(expected_ids)
    deltas = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=16, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta for c in deltas]
    assert pieces[0].role == "assistant"
    assert "".join(d.content or "" for d in pieces) == reply.choices[0].message.content


def test_logprobs_streamed_equal_returned_and_a_full_forward(client, reference):
    model, tokenizer = reference
    prompt = "def g(x):"
    args = {"model": NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 3, "echo": True}
    whole = client.completions.create(**args).choices[0]
    chunks = list(client.completions.create(**args, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [t for lp in streamed for t in lp.tokens] == whole.logprobs.tokens
    assert [o for lp in streamed for o in lp.text_offset] == whole.logprobs.text_offset
    streamed_values = [v for lp in streamed for v in lp.token_logprobs]
    assert streamed_values[0] is None and whole.logprobs.token_logprobs[0] is None
    assert streamed_values[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-9)
    # Each log-prob is the next-token head's, over the prompt and the output, in one plain pass.
    ids = tokenizer.encode(whole.text)
    assert len(ids) == len(whole.logprobs.tokens) == len(tokenizer.encode(prompt)) + 12
    with torch.no_grad():
        logprobs_TV = torch.log_softmax(model.next_token_logits(torch.tensor([ids[:-1]]))[0], -1)
    expected = logprobs_TV.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert whole.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-9)
    for top, value in zip(whole.logprobs.top_logprobs[1:], expected, strict=True):
        assert len(top) <= 4 and max(top.values()) >= value - 1e-9

    messages = [{"role": "user", "content": "hi"}]
    chat = {"model": NAME, "messages": messages, "max_tokens": 8, "temperature": 0}
    chat |= {"logprobs": True, "top_logprobs": 2}
    whole_chat = client.chat.completions.create(**chat).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**chat, stream=True))
    streamed_chat = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed_chat] == [e.token for e in whole_chat] and len(whole_chat) == 8
    assert [e.logprob for e in streamed_chat] == pytest.approx([e.logprob for e in whole_chat], abs=1e-9)
    assert all(len(e.top_logprobs) == 2 for e in whole_chat)


def test_errors_in_openai_shape(server):
    _, base = server
    url = f"{base}/v1/completions"

    def post(status, **kwargs):
        response = httpx.post(url, headers={**_auth(), **kwargs.pop("headers", {})}, **kwargs)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
        return error

    error = post(400, json={"model": NAME, "prompt": "hi", "max_tokens": CONTEXT})
    assert str(CONTEXT) in error["message"] and error["code"] == "context_length_exceeded"
    post(400, content=b"{not json", headers={"Content-Type": "application/json"})
    post(400, json={"model": NAME, "prompt": [999], "max_tokens": 1})
    post(401, json={"model": NAME, "prompt": "hi"}, headers=_auth("nope"))
    post(404, json={"model": "other", "prompt": "hi"})
    post(413, json={"model": NAME, "prompt": "x" * BODY_CAP})
    assert post(422, json={"model": NAME, "prompt": "hi", "temperature": "hot"})["param"] == "temperature"
    post(422, json={"model": NAME, "prompt": "hi", "n": 0})
    post(422, json={"model": NAME})
    post(400, json={"model": NAME, "prompt": ["a"] * 16, "n": 2})  # more rows than batch + queue


def _wait_until_idle(base: str) -> None:
    deadline = time.monotonic() + 10
    while _metric(base, "multitoken_batch_occupancy") > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _metric(base, "multitoken_batch_occupancy") == 0
    assert _metric(base, "multitoken_queue_depth") == 0


def _stream_lines(http, base, body):
    return http.stream("POST", f"{base}/v1/completions", json={"model": NAME, "stream": True, **body})


def test_disconnect_frees_the_slot_and_full_queue_gets_429(server, client):
    _, base = server
    generated_before = _metric(base, "multitoken_generated_tokens_total")
    long = {"prompt": "a", "max_tokens": CONTEXT - 1, "temperature": 0}  # greedy: never EOS
    with httpx.Client(headers=_auth(), timeout=30) as http:
        with _stream_lines(http, base, long) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # The client is gone: its row leaves the batch at the next step.
        _wait_until_idle(base)
        generated = _metric(base, "multitoken_generated_tokens_total") - generated_before
        assert generated < CONTEXT - 1
        # Fill the batch (16 rows), then the queue (MAX_QUEUE rows); one more row gets 429.
        with _stream_lines(http, base, {**long, "n": 16}) as first:
            first_lines = first.iter_lines()  # kept: closing the iterator would close the stream
            assert next(line for line in first_lines if line.startswith("data:"))
            with _stream_lines(http, base, {**long, "n": MAX_QUEUE}) as second:
                assert second.status_code == 200
                refused = http.post(f"{base}/v1/completions", json={"model": NAME, "prompt": "b"})
                assert refused.status_code == 429 and refused.headers["Retry-After"]
                assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    # The clients left: their rows are freed, and the server still serves.
    _wait_until_idle(base)
    assert client.completions.create(model=NAME, prompt="ok", max_tokens=3, temperature=0).choices[0].text


def test_metrics(server):
    _, base = server
    text = httpx.get(f"{base}/metrics", headers=_auth()).text
    for name in (
        'multitoken_requests_total{endpoint="/v1/completions",status="200"}',
        'multitoken_requests_total{endpoint="/v1/completions",status="429"}',
        "multitoken_prompt_tokens_total",
        "multitoken_queue_depth",
        "multitoken_batch_occupancy",
        "multitoken_tokens_per_forward",
        "multitoken_time_to_first_token_seconds_bucket",
        "multitoken_inter_token_latency_seconds_bucket",
    ):
        assert name in text, name
    assert _metric(base, "multitoken_tokens_per_forward") >= 1.0


def test_lm_eval_local_completions_equals_the_adapter(server, checkpoint, reference, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    from multitoken.evals.lm_eval_adapter import MultiTokenLMEval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    rows = [
        {"question": f"{i} + 1 =", "choices": [f" {i + 1}", f" {i + 2}", " cat"], "answer": 0}
        for i in range(3)
    ]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.yaml").write_text(
        "task: toy_serve\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    model, tokenizer = reference

    def loglikelihoods(lm):
        out = lm_eval.simple_evaluate(model=lm, tasks=["toy_serve"], task_manager=manager, log_samples=True)
        return [resp[0][0] for sample in out["samples"]["toy_serve"] for resp in sample["resps"]]

    served = LocalCompletionsAPI(
        base_url=f"{server[1]}/v1/completions",
        model=NAME,
        tokenizer_backend="remote",
        auth_token=KEY,
        max_length=CONTEXT,
        num_concurrent=1,
        max_retries=1,
    )
    local = MultiTokenLMEval(model=model, tokenizer=tokenizer, batch_size=4, max_length=CONTEXT)
    ours, theirs = loglikelihoods(served), loglikelihoods(local)
    assert len(ours) == 9
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_sigterm_drains_then_exits_zero_and_leaves_no_engine(server, client):
    """Last: the module's server stops here."""
    proc, base = server
    engine = engine_pid(proc.pid)
    with httpx.Client(headers=_auth(), timeout=30) as http:
        body = {"prompt": "z", "max_tokens": 600, "temperature": 0}  # still running after the signal
        with _stream_lines(http, base, body) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)  # the signal handler runs
            refused = http.post(f"{base}/v1/completions", json={"model": NAME, "prompt": "b"})
            assert refused.status_code == 503
            assert http.get(f"{base}/health").status_code == 503  # load balancers stop sending
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][5:])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(timeout=30) == 0
    assert wait_until(lambda: not alive(engine), 10)
