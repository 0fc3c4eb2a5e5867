"""The scheduler without HTTP: rows that join a running batch, wait in the queue, prefill in chunks,
resize the cache and leave early decode exactly as `generate()` decodes each alone; a failing step
fails only its batch."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from multitoken.decoding import DecodeBatch
from multitoken.generate import generate
from multitoken.sampling import SamplingParams
from multitoken.serve import scheduler as scheduler_module
from multitoken.serve.metrics import ServerMetrics
from multitoken.serve.scheduler import Row, Scheduler

from conftest import tiny_model


class Collect:
    """A row's sink: tokens as they come, then the final event."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.end: tuple | None = None
        self.first = threading.Event()
        self.finished = threading.Event()

    def __call__(self, event: tuple) -> None:
        if event[0] == "tokens":
            self.tokens.extend(event[1])
            self.first.set()
        else:
            self.end = event
            self.finished.set()


@pytest.fixture(scope="module")
def model():
    return tiny_model(5, n_future=3, max_seq_len=256).double().eval()


def _row(prompt, max_tokens, sink, **kwargs):
    return Row(list(prompt), SamplingParams(), max_tokens, sink, **kwargs)


@pytest.mark.parametrize("speculative", ["off", "on", "auto"])
def test_rows_joining_and_leaving_equal_generate_alone(model, speculative, monkeypatch):
    # Small caches, so the batch grows when the long prompt joins and shrinks after it leaves.
    monkeypatch.setattr(scheduler_module, "MIN_CACHE_LEN", 16)
    sizes = []
    resize = DecodeBatch.resize
    monkeypatch.setattr(DecodeBatch, "resize", lambda batch, n: sizes.append(n) or resize(batch, n))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 9, 3, 60, 4, 12)]
    budgets = [30, 12, 25, 20, 30, 8]
    scheduler = Scheduler(
        model, None, max_batch_size=4, max_queue=8, speculative=speculative, prefill_chunk=7
    )
    scheduler.start()
    try:
        sinks = [Collect() for _ in prompts]
        scheduler.submit([_row(prompts[i], budgets[i], sinks[i]) for i in range(3)])
        assert sinks[0].first.wait(30)  # the batch is running: the next rows join it, one waits
        scheduler.submit([_row(prompts[i], budgets[i], sinks[i]) for i in range(3, 6)])
        for sink in sinks:
            assert sink.finished.wait(60)
    finally:
        scheduler.stop()
    assert 128 in sizes and sizes[-1] < 128  # grown for the 60-token prompt, shrunk after it
    for prompt, budget, sink in zip(prompts, budgets, sinks, strict=True):
        expected = generate(model, [prompt], budget, speculative=False).tokens[0]
        assert sink.tokens == expected and sink.end[:2] == ("done", "length")


def test_a_cancelled_row_leaves_and_a_failed_step_fails_only_its_batch(model, monkeypatch):
    # generate() sets up the model's caches itself: run it before the scheduler owns the model.
    expected = {
        (4, 5): generate(model, [[4, 5]], 10).tokens[0],
        (7, 8, 9): generate(model, [[7, 8, 9]], 5).tokens[0],
    }
    scheduler = Scheduler(model, None, max_batch_size=2, max_queue=4, speculative="on")
    scheduler.start()
    try:
        cancelled, kept = Collect(), Collect()
        doomed = _row([1, 2, 3], 80, cancelled)
        scheduler.submit([doomed, _row([4, 5], 10, kept)])
        assert cancelled.first.wait(30)
        doomed.cancel()
        assert kept.finished.wait(30) and kept.tokens == expected[4, 5]
        assert len(cancelled.tokens) < 80 and cancelled.end is None
        real_step = scheduler_module.decode_step
        calls = {"n": 0}

        def failing_once(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated device error")
            return real_step(*args, **kwargs)

        monkeypatch.setattr(scheduler_module, "decode_step", failing_once)
        failed = Collect()
        scheduler.submit([_row([7, 8, 9], 5, failed)])
        assert failed.finished.wait(30) and failed.end[0] == "error"
        after = Collect()
        scheduler.submit([_row([7, 8, 9], 5, after)])
        assert after.finished.wait(30) and after.tokens == expected[7, 8, 9]
    finally:
        scheduler.stop()


def test_auto_probes_in_plain_steps_only_while_every_row_is_greedy(monkeypatch):
    model = tiny_model(6, n_future=3, head_style="linear", max_seq_len=256).double().eval()
    prompts = [[3, 4, 5], [9, 8]]
    expected = [generate(model, [p], 40, speculative=False).tokens[0] for p in prompts]
    steps = []  # (shadow probe?, every row in the batch greedy?)
    real_step = scheduler_module.decode_step

    def recording(batch, plan, budget, **kwargs):
        steps.append((plan.shadow, all(batch.row_greedy[: batch.n_rows])))
        return real_step(batch, plan, budget, **kwargs)

    monkeypatch.setattr(scheduler_module, "decode_step", recording)
    metrics = ServerMetrics()  # a shadow step's record reaches the metrics too
    scheduler = Scheduler(model, None, max_batch_size=4, max_queue=4, speculative="auto", metrics=metrics)
    scheduler.start()
    try:
        greedy = [Collect() for _ in prompts]
        scheduler.submit([_row(p, 40, sink) for p, sink in zip(prompts, greedy, strict=True)])
        assert all(sink.finished.wait(60) for sink in greedy)
        assert [sink.tokens for sink in greedy] == expected
        assert any(shadow for shadow, _ in steps)  # probed in plain steps
        steps.clear()
        mixed = [Collect(), Collect()]
        sampled = Row([1, 2], SamplingParams(temperature=1.0), 40, mixed[1])
        scheduler.submit([_row(prompts[0], 40, mixed[0]), sampled])
        assert all(sink.finished.wait(60) for sink in mixed)
        assert mixed[0].tokens == expected[0]
    finally:
        scheduler.stop()
    assert any(not all_greedy for _, all_greedy in steps)
    assert not any(shadow and not all_greedy for shadow, all_greedy in steps)  # never inexact


def test_rows_arriving_a_step_apart_share_one_prefill(model, monkeypatch):
    prompts = {"running": [5, 6, 7], "a": [1, 2, 3, 4], "b": [9, 8]}
    expected = {k: generate(model, [p], 6, speculative=False).tokens[0] for k, p in prompts.items()}
    prefilled_rows = []
    real_prefill, real_step = scheduler_module.prefill, scheduler_module.decode_step

    def recording_prefill(batch, chunks, **kwargs):
        prefilled_rows.append(len(chunks))
        return real_prefill(batch, chunks, **kwargs)

    def slow_step(*args, **kwargs):
        time.sleep(0.05)  # room to submit the second row while the first one waits its step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(scheduler_module, "prefill", recording_prefill)
    monkeypatch.setattr(scheduler_module, "decode_step", slow_step)
    scheduler = Scheduler(model, None, max_batch_size=8, max_queue=8, speculative="off")
    scheduler.start()
    try:
        sinks = {k: Collect() for k in prompts}
        scheduler.submit([_row(prompts["running"], 6, sinks["running"])])
        assert sinks["running"].first.wait(30)  # decoding
        a = _row(prompts["a"], 6, sinks["a"])
        scheduler.submit([a])
        deadline = time.monotonic() + 30
        while not a.deferred and time.monotonic() < deadline:
            time.sleep(0.001)
        assert a.deferred and a.prefilled == 0  # kept waiting one step
        scheduler.submit([_row(prompts["b"], 6, sinks["b"])])
        assert all(sink.finished.wait(30) for sink in sinks.values())
    finally:
        scheduler.stop()
    assert prefilled_rows == [1, 2]  # the two late rows shared one prefill pass
    assert {k: sink.tokens for k, sink in sinks.items()} == expected
