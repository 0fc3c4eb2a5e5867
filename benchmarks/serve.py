"""Serving throughput and latency: N concurrent streaming clients against `multitoken serve`, beside
offline batched `generate()` at the same batch size, with and without self-speculative decoding.

    python benchmarks/serve.py --checkpoint runs/demo --clients 1,8,32 --requests 64
    python benchmarks/serve.py                                   # a random debug model, seconds
    python benchmarks/serve.py --checkpoint runs/demo --soak 10000 --clients 32 --speculative auto

For each --engine and --speculative mode a server starts on a free loopback port (--max-batch-size =
the largest client count). For each client count C, C clients send --requests greedy streaming
requests in all, each client one at a time; we record time to first token, request latency and usage
tokens. The offline figure decodes the same prompts with `generate()` in batches of C in this process
(the server idle), so `ratio` = served tokens/s / offline tokens/s. Served and offline runs alternate
--repeats times and the medians are reported (the ratio's range beside it). With --soak N, N more
requests run against the last server and its resident memory (VmRSS, the server's and its engine
process's) is read after the first tenth of them and at the end. Every loop is bounded by a count and
by --time-limit seconds. Prints markdown tables.

"scheduler-only ratio" runs the same closed loop of clients as threads straight on an in-process
`Scheduler` (no HTTP, no engine process): what continuous batching itself costs, apart from HTTP.

Besides wall-clock tokens/s, each side's tokens per CPU second: the server's CPU time (every thread
of the HTTP process and of its engine process) against this process's during the offline run. On a
machine shared with other jobs the CPU ratio is the fairer one: the server needs two processes (and
the clients a third) to make progress where the offline loop needs one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

import httpx
import torch
from common import machine_description, markdown_table, today

from multitoken.checkpoint import load_checkpoint, save_checkpoint
from multitoken.config import preset_config
from multitoken.generate import generate
from multitoken.model import MultiTokenLM
from multitoken.sampling import SamplingParams
from multitoken.serve.scheduler import Row, Scheduler
from multitoken.tokenizer import byte_tokenizer

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\ndef main():",
    "class Stack:\n    def __init__(self):",
    "def read_lines(path):",
    "def is_prime(n):",
    "    for i in range(len(items)):",
    "def merge_sort(values):",
    "from collections import defaultdict\n\ndef count_words(text):",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint or run directory; default: a random debug model")
    parser.add_argument("--n-future", type=int, default=4, help="heads of the random model")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, comma separated")
    parser.add_argument("--requests", type=int, default=64, help="requests per client count")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--speculative", default="off,auto", help="server modes to compare (off, on, auto)")
    parser.add_argument(
        "--engine", default="process", help="server engines to compare, comma separated (process, thread)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="served and offline runs alternated per row; medians reported"
    )
    parser.add_argument("--soak", type=int, default=0, help="requests of the memory soak (0: none)")
    parser.add_argument("--soak-max-tokens", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per phase at most")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads here and in the server (0: default)"
    )
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_checkpoint(directory: Path, n_future: int) -> Path:
    config = preset_config("debug", vocab_size=258, n_future=n_future, max_seq_len=512)
    torch.manual_seed(0)
    run = directory / "random-debug"
    save_checkpoint(run, 0, MultiTokenLM(config), byte_tokenizer())
    return run


def start_server(checkpoint: str, mode: str, batch: int, device: str, threads: int, engine: str = "process"):
    port = free_port()
    argv = [sys.executable, "-m", "multitoken", "serve", "--checkpoint", checkpoint, "--port", str(port)]
    argv += [
        "--engine",
        engine,
        "--speculative",
        mode,
        "--max-batch-size",
        str(batch),
        "--max-queue",
        str(4 * batch),
    ]
    argv += ["--device", device, "--log-level", "warning", "--served-model-name", "bench"]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(argv, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not become healthy in 300 s")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the server and its engine process), from /proc."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            with contextlib.suppress(OSError):
                pids += [int(k) for k in (task / "children").read_text().split()]
        i += 1
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children, every thread, from /proc."""
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children."""
    total = 0.0
    for p in process_tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) / 1024 for line in lines if line.startswith("VmRSS:"))
    return total


async def one_request(http: httpx.AsyncClient, base: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, last, done = None, None, False
    # A light client: the clients share this machine with the server, so only the usage chunk (the
    # last before [DONE]) is parsed; the first data line is the first token's chunk.
    async with http.stream("POST", f"{base}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"ok": False}
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            if first is None:
                first = time.perf_counter() - start
            if line.startswith('data: {"error"'):
                return {"ok": False}
            if line == "data: [DONE]":
                done = True
                break
            last = line
    end = time.perf_counter() - start
    usage = json.loads(last[5:]).get("usage") if last is not None else None
    tokens = usage["completion_tokens"] if usage else 0
    return {
        "ok": done and usage is not None,
        "ttft": first if first is not None else end,
        "latency": end,
        "tokens": tokens,
    }


async def run_clients(base: str, clients: int, n_requests: int, max_tokens: int, time_limit: float):
    """`clients` workers share `n_requests` requests; returns (results, wall seconds)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results = []
    stop_at = time.monotonic() + time_limit
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(http):
        while not queue.empty() and time.monotonic() < stop_at:
            prompt = queue.get_nowait()
            try:
                results.append(await one_request(http, base, prompt, max_tokens))
            except httpx.HTTPError:
                results.append({"ok": False})

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(clients)))
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def offline_tokens_per_s(
    model, tokenizer, clients: int, n_requests: int, max_tokens: int, mode: str
) -> tuple[float, float]:
    """generate() over the same prompts in batches of `clients`, greedy, same speculative mode:
    (tokens per wall second, tokens per CPU second of this process)."""
    speculative = {"off": False, "on": True, "auto": None}[mode]
    ids = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(n_requests)]
    tokens, seconds, cpu = 0, 0.0, 0.0
    for first in range(0, n_requests, clients):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = generate(
            model, ids[first : first + clients], max_tokens, speculative=speculative, eos_id=tokenizer.eos_id
        )
        seconds += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        tokens += result.stats.new_tokens
    return tokens / seconds, tokens / cpu


class _RowSink:
    """A row's events: counts its tokens, and says when it has finished."""

    def __init__(self) -> None:
        self.tokens, self.finished = 0, threading.Event()

    def __call__(self, event: tuple) -> None:
        if event[0] == "tokens":
            self.tokens += len(event[1])
        elif event[0] in ("done", "error"):
            self.finished.set()


def scheduler_tokens_per_s(
    model, tokenizer, clients: int, n_requests: int, max_tokens: int, mode: str, batch: int
) -> float:
    """The same closed loop of `clients` straight on an in-process `Scheduler` (no HTTP, no second
    process): what continuous batching itself costs against offline batches."""
    ids = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(n_requests)]
    scheduler = Scheduler(model, tokenizer, max_batch_size=batch, max_queue=4 * batch, speculative=mode)
    scheduler.start()
    todo, lock, tokens = list(range(n_requests)), threading.Lock(), [0]

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            sink = _RowSink()
            scheduler.submit([Row(ids[i], SamplingParams(), max_tokens, sink)])
            sink.finished.wait()
            with lock:
                tokens[0] += sink.tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    scheduler.stop()
    return tokens[0] / seconds


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clients = args.clients_list = [int(c) for c in args.clients.split(",") if c]
    modes = [m for m in args.speculative.split(",") if m]
    engines = [e for e in args.engine.split(",") if e]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(random_checkpoint(Path(tmp), args.n_future))
        model, tokenizer = load_checkpoint(checkpoint, device=args.device)
        model.eval()
        rows, soak_row = [], None
        for engine in engines:
            for mode in modes:
                proc, base = start_server(checkpoint, mode, max(clients), args.device, args.threads, engine)
                try:
                    for c in clients:
                        rows.append(measure_row(proc, base, model, tokenizer, engine, mode, c, args))
                        print(markdown_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
                    if args.soak and (engine, mode) == (engines[-1], modes[-1]):
                        soak_row = soak(proc, base, max(clients), args)
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
    print(
        f"\n{today()}, {machine_description(args.device)}; checkpoint {args.checkpoint or 'random debug'}, "
        f"{args.requests} greedy streaming requests of {args.max_tokens} tokens per row\n"
    )
    print(markdown_table(HEADERS, rows))
    if soak_row is not None:
        print()
        print(markdown_table(SOAK_HEADERS, [soak_row]))


def measure_row(proc, base: str, model, tokenizer, engine: str, mode: str, c: int, args) -> list:
    """`args.repeats` served runs alternated with offline runs at `c` clients: medians of each."""
    asyncio.run(run_clients(base, c, min(c, args.requests), args.max_tokens, 60))  # warm-up
    served, served_cpu, offline, offline_cpu, ratio, cpu_ratio, results = [], [], [], [], [], [], []
    scheduler_ratio = []
    for _ in range(args.repeats):
        cpu_start = cpu_seconds(proc.pid)
        run, wall = asyncio.run(run_clients(base, c, args.requests, args.max_tokens, args.time_limit))
        tokens = sum(r["tokens"] for r in run if r["ok"])
        served.append(tokens / wall)
        served_cpu.append(tokens / (cpu_seconds(proc.pid) - cpu_start))
        results += run
        wall_rate, cpu_rate = offline_tokens_per_s(model, tokenizer, c, args.requests, args.max_tokens, mode)
        scheduled = scheduler_tokens_per_s(
            model, tokenizer, c, args.requests, args.max_tokens, mode, max(args.clients_list)
        )
        scheduler_ratio.append(scheduled / wall_rate)
        offline.append(wall_rate)
        offline_cpu.append(cpu_rate)
        ratio.append(served[-1] / offline[-1])
        cpu_ratio.append(served_cpu[-1] / offline_cpu[-1])
    ok = [r for r in results if r["ok"]]
    ttft, latency = [r["ttft"] for r in ok], [r["latency"] for r in ok]
    expected = args.requests * args.repeats
    return [
        engine,
        mode,
        c,
        len(results),
        len(results) - len(ok) + (expected - len(results)),
        f"{median(served):.0f}",
        f"{median(offline):.0f}",
        f"{median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f})",
        f"{median(served_cpu):.0f}",
        f"{median(offline_cpu):.0f}",
        f"{median(cpu_ratio):.2f}",
        f"{median(scheduler_ratio):.2f}",
        f"{median(ttft) * 1e3:.0f} / {percentile(ttft, 0.99) * 1e3:.0f}",
        f"{median(latency) * 1e3:.0f} / {percentile(latency, 0.99) * 1e3:.0f}",
    ]


HEADERS = [
    "engine",
    "speculative",
    "clients",
    "requests",
    "failed",
    "served tok/s",
    "offline tok/s",
    "wall ratio (min-max)",
    "served tok/CPU-s",
    "offline tok/CPU-s",
    "CPU ratio",
    "scheduler-only ratio",
    "TTFT p50/p99 ms",
    "latency p50/p99 ms",
]
SOAK_HEADERS = ["requests", "failed", "RSS after 10% (MiB)", "RSS at end (MiB)", "growth", "seconds"]


def soak(proc, base: str, clients: int, args) -> list:
    """`args.soak` short requests; the server's RSS after the first tenth and at the end."""
    start = time.perf_counter()
    warm = max(1, args.soak // 10)
    first, _ = asyncio.run(run_clients(base, clients, warm, args.soak_max_tokens, args.time_limit))
    rss_start = rss_mib(proc.pid)
    rest, _ = asyncio.run(run_clients(base, clients, args.soak - warm, args.soak_max_tokens, args.time_limit))
    rss_end = rss_mib(proc.pid)
    results = first + rest
    failed = sum(not r["ok"] for r in results) + (args.soak - len(results))
    return [
        len(results),
        failed,
        f"{rss_start:.0f}",
        f"{rss_end:.0f}",
        f"{(rss_end / rss_start - 1) * 100:+.1f}%",
        f"{time.perf_counter() - start:.0f}",
    ]


if __name__ == "__main__":
    main()
