"""The engine in its own process: what happens when it dies, when the server is killed, and that the
thread engine serves the same tokens; the metrics it relays equal the scheduler's own calls."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
import torch

pytest.importorskip("fastapi")

from serving import alive, engine_pid, start_server, wait_until

from multitoken.checkpoint import save_checkpoint
from multitoken.serve.engine import MetricsRelay, replay
from multitoken.serve.metrics import ServerMetrics
from multitoken.tokenizer import byte_tokenizer

from conftest import tiny_model

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads child processes from /proc")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("engine") / "tiny"
    save_checkpoint(run, 1, tiny_model(3, vocab_size=258, n_future=3, max_seq_len=512), byte_tokenizer())
    return run


def _complete(base: str, prompt: str, max_tokens: int) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=60)


def test_engine_death_fails_requests_and_the_server_exits_nonzero(checkpoint):
    proc, base = start_server(checkpoint)
    try:
        engine = engine_pid(proc.pid)
        assert _complete(base, "ab", 4).status_code == 200
        with httpx.Client(timeout=60) as http:
            body = {"prompt": "x", "max_tokens": 400, "temperature": 0, "stream": True}
            with http.stream("POST", f"{base}/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                next(line for line in lines if line.startswith("data:"))  # decoding has started
                os.kill(engine, signal.SIGKILL)
                rest = [line for line in lines if line.startswith("data:")]
        assert '"error"' in rest[-2] and "engine" in rest[-2]  # the open stream ends with an error
        assert proc.wait(timeout=30) == 1
        output = proc.stdout.read()
        assert "the decoding engine died" in output and "Traceback" not in output
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_killed_server_leaves_no_engine_behind(checkpoint):
    proc, _ = start_server(checkpoint)
    engine = engine_pid(proc.pid)
    proc.kill()
    proc.wait()
    assert wait_until(lambda: not alive(engine), 15)


def test_thread_engine_serves_the_same_tokens(checkpoint):
    texts = []
    for engine in ("process", "thread"):
        proc, base = start_server(checkpoint, "--engine", engine, "--speculative", "on")
        try:
            response = _complete(base, "def f(x):", 24)
            assert response.status_code == 200
            texts.append(response.json()["choices"][0]["text"])
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0
    assert texts[0] == texts[1] and len(texts[0]) > 0


def test_relayed_metrics_equal_direct_calls():
    direct, relayed, relay = ServerMetrics(), ServerMetrics(), MetricsRelay()
    for metrics in (direct, relay):
        metrics.record_step(3, 7, {2: 3, 3: 2}, {2: 2, 3: 1})
        metrics.ttft.observe(0.02)
        metrics.inter_token.observe(0.004)
        metrics.prompt_tokens.inc(11)
        metrics.queue_depth.set(5)
        metrics.batch_occupancy.set(3)
    replay(relayed, relay.take())
    assert relay.take() == []
    values = [
        {(s.name, tuple(sorted(s.labels.items()))): s.value for m in x.registry.collect() for s in m.samples}
        for x in (direct, relayed)
    ]
    values = [{k: v for k, v in d.items() if not k[0].endswith("_created")} for d in values]
    assert values[0] == values[1]
    assert values[0][("multitoken_acceptance", (("offset", "2"),))] == pytest.approx(2 / 3)
    assert torch.isclose(torch.tensor(values[0][("multitoken_prompt_tokens_total", ())]), torch.tensor(11.0))
