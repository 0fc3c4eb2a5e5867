"""`multitoken serve`: load a checkpoint, start the scheduler, serve HTTP with uvicorn until a signal.

SIGTERM or SIGINT starts a drain: new requests get 503, the ones in flight may finish for up to
`--grace-period` seconds, then the server exits with status 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Literal

import torch

from multitoken.devices import resolve_device
from multitoken.errors import UserError

log = logging.getLogger("multitoken.serve")

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
SERVE_EXTRA_HINT = "serving needs its extra: pip install 'multitoken[serve]'"


def _require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise UserError(f"{SERVE_EXTRA_HINT} ({err.name} is missing)") from None


def resolve_dtype(dtype: str, device: str) -> torch.dtype | None:
    """The dtype to cast the model to: auto is bfloat16 on CUDA and the checkpoint's own elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else None
    if dtype not in DTYPES:
        raise UserError(f"--dtype takes auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def build_state(
    checkpoint: str,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_batch_size: int = 32,
    max_queue: int = 256,
    speculative: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
    max_body_bytes: int = 1 << 20,
    request_timeout: float = 600.0,
    engine: str = "process",
):
    """Tokenizer, chat template and a started engine, as the app's ServerState. With `engine`
    "process" the model lives in the engine process only; "thread" loads it here."""
    from multitoken.checkpoint import CONFIG, load_checkpoint, resolve_checkpoint
    from multitoken.config import ModelConfig
    from multitoken.serve.app import ServerState
    from multitoken.serve.chat import ChatRenderer
    from multitoken.serve.engine import EngineProcess, EngineSpec
    from multitoken.serve.metrics import ServerMetrics
    from multitoken.serve.scheduler import Scheduler
    from multitoken.tokenizer import load_tokenizer

    if engine not in ("process", "thread"):
        raise UserError(f"--engine takes process or thread, got {engine!r}")
    device = resolve_device(device)
    cast = resolve_dtype(dtype, device)
    ckpt = resolve_checkpoint(checkpoint)
    if not any((ckpt / name).exists() for name in ("tokenizer.json", "tokenizer.tiktoken")):
        raise UserError(f"checkpoint {checkpoint} has no tokenizer, so text cannot be encoded")
    metrics = ServerMetrics()
    metrics.batch_capacity.set(max_batch_size)
    if engine == "process":
        config = ModelConfig.load(ckpt / CONFIG)
        tokenizer = load_tokenizer(ckpt)
        spec = EngineSpec(str(ckpt), device, dtype, max_batch_size, max_queue, speculative, compile)
        runner = EngineProcess(
            spec, context=config.max_seq_len, vocab_size=config.vocab_size, metrics=metrics
        )
    else:
        model, tokenizer = load_checkpoint(ckpt, device=device)
        if cast is not None:
            model = model.to(cast)
        runner = Scheduler(
            model.eval(),
            tokenizer,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            speculative=speculative,
            compile=compile,
            metrics=metrics,
        )
    runner.start()
    name = served_model_name or Path(checkpoint).resolve().name
    return ServerState(
        engine=runner,
        tokenizer=tokenizer,
        chat=ChatRenderer.from_checkpoint(ckpt, tokenizer),
        model_name=name,
        metrics=metrics,
        api_key=api_key or None,
        max_body_bytes=max_body_bytes,
        request_timeout=request_timeout,
    )


def _draining_server(grace_period: float):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but the first SIGTERM/SIGINT drains (503 for new requests) before exiting."""

        state = None
        drain_started: float | None = None

        def handle_exit(self, sig, frame) -> None:
            if self.drain_started is None and self.state is not None:
                log.info("signal %s: draining (grace period %.0f s)", signal.Signals(sig).name, grace_period)
                self.state.draining = True
                self.drain_started = time.monotonic()
                return
            self.should_exit = self.force_exit = True

        async def on_tick(self, counter: int) -> bool:
            if getattr(self.state.engine, "dead", False) and not self.should_exit:
                log.error("the decoding engine died: the server exits")
                self.should_exit = True
            if self.drain_started is not None and not self.should_exit:
                idle = self.state.in_flight == 0
                if idle or time.monotonic() - self.drain_started > grace_period:
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer


def serve_cli(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_batch_size: int = 32,
    max_queue: int = 256,
    speculative: Literal["auto", "on", "off"] = "auto",
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto",
    compile: bool = False,
    max_body_bytes: int = 1 << 20,
    request_timeout: float = 600.0,
    grace_period: float = 30.0,
    log_level: str = "info",
    engine: Literal["process", "thread"] = "process",
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API, with continuous batching.

    Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics (Prometheus), and
    /tokenize, /detokenize, /tokenizer_info for lm-eval's local-completions. Requests join the running
    batch between decoding steps; models with extra heads decode self-speculatively. SIGTERM or SIGINT
    drains: new requests get 503, running ones finish within --grace-period, then the server exits 0.

    Args:
        checkpoint: checkpoint or run directory.
        host: address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every interface.
        port: TCP port.
        api_key: require Authorization: Bearer KEY on every endpoint but /health (default: the
            MULTITOKEN_API_KEY environment variable; none when neither is set).
        served_model_name: the model name clients use (default: the checkpoint directory's name).
        max_batch_size: rows decoded together (each request choice is one row).
        max_queue: rows that may wait for a batch slot; beyond it requests get 429.
        speculative: auto (draft when it pays, step by step), on (always draft with every head) or
            off (plain decoding).
        device: cpu, cuda, cuda:N, mps or auto.
        dtype: auto (bfloat16 on CUDA, the checkpoint's dtype elsewhere), float32, bfloat16, float16,
            float64.
        compile: compile the verification pass with torch.compile (slow first steps, faster later).
        max_body_bytes: largest request body accepted; larger gets 413.
        request_timeout: seconds a request may take before it is cancelled (504).
        grace_period: seconds in-flight requests may take to finish after SIGTERM/SIGINT.
        log_level: uvicorn's log level (critical, error, warning, info, debug).
        engine: process (the model decodes in a process of its own, so HTTP work and decoding run
            in parallel) or thread (one process; for debugging, or where processes cannot start).
    """
    _require_extra()
    import uvicorn

    from multitoken.serve.app import create_app

    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    api_key = api_key or os.environ.get("MULTITOKEN_API_KEY") or None
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s"
    )
    state = build_state(
        checkpoint,
        served_model_name=served_model_name,
        api_key=api_key,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        speculative=speculative,
        device=device,
        dtype=dtype,
        compile=compile,
        max_body_bytes=max_body_bytes,
        request_timeout=request_timeout,
        engine=engine,
    )
    try:
        config = uvicorn.Config(
            create_app(state), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5
        )
        server = _draining_server(grace_period)(config)
        server.state = state
        log.info("serving %s as %r on http://%s:%d", checkpoint, state.model_name, host, port)
        server.run()
        if getattr(server, "started", True) is False:
            raise UserError(f"cannot serve on {host}:{port} (address in use or not available)")
    finally:
        state.engine.stop(timeout=10)
    if getattr(state.engine, "dead", False) and not state.draining:
        print(
            f"multitoken serve: the decoding engine died (exit code {state.engine.exit_code}); see the log",
            file=sys.stderr,
        )
        raise SystemExit(1)
