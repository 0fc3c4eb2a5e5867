"""The HTTP layer: FastAPI routes in OpenAI's shapes over the scheduler, and the guard in front of them.

Routes: GET /health, /metrics, /v1/models; POST /v1/completions, /v1/chat/completions; and vLLM's
tokenizer routes (GET /tokenizer_info, POST /tokenize, /detokenize), which lm-eval's `local-completions`
uses to send token ids, so its loglikelihoods are exactly those of the in-process adapter.

The guard (plain ASGI, before FastAPI) gives every request an id (`x-request-id`), checks the API key
in constant time (every route but /health), refuses new work while draining (503), caps the body
(413) and counts requests by route and status. Errors are OpenAI's `{"error": {...}}`; an unexpected
one is logged with the request id and answered 500 without a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from multitoken.errors import UserError
from multitoken.sampling import SamplingParams
from multitoken.serve.chat import ChatRenderer
from multitoken.serve.engine import EngineProcess
from multitoken.serve.metrics import ServerMetrics
from multitoken.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    new_id,
    now,
    usage,
)
from multitoken.serve.scheduler import EngineStopped, QueueFull, Row, Scheduler, ScoreJob, TokenLogprobs
from multitoken.serve.text import IncrementalText

log = logging.getLogger("multitoken.serve")

ROUTES = frozenset(
    {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenizer_info",
        "/tokenize",
        "/detokenize",
    }
)
OPEN_ROUTES = frozenset({"/health"})
"""Routes that need no API key."""
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers: dict[str, str] = {}


def _error_response(status: int, message: str, type_: str, param=None, code=None, headers=None):
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


@dataclass
class ServerState:
    """What the routes share: the engine, tokenizer, names and limits."""

    engine: Scheduler | EngineProcess
    """The scheduler on a thread of this process, or in a process of its own (`--engine`)."""
    tokenizer: object
    chat: ChatRenderer
    model_name: str
    metrics: ServerMetrics
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0
    draining: bool = False
    in_flight: int = 0
    created: int = field(default_factory=now)
    notifier: LoopNotifier | None = None

    @property
    def context(self) -> int:
        return self.engine.context


# ---- the guard ---------------------------------------------------------------------------------------


class Guard:
    """ASGI middleware: request id, API key, draining, body cap, request metrics."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, path = self.state, scope["path"]
        request_id = new_id("req")
        scope.setdefault("state", {})["request_id"] = request_id
        status = [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                return await refusal(scope, receive, send_with_id)
            body = await self._read_body(scope, receive)
            if isinstance(body, Response):
                return await body(scope, receive, send_with_id)
            if body is None:  # the client left before sending its body
                status[0] = 499
                return None
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            state.in_flight += 1
            try:
                await self.app(scope, replay, send_with_id)
            finally:
                state.in_flight -= 1
        finally:
            endpoint = path if path in ROUTES else "other"
            state.metrics.requests.labels(endpoint, str(status[0])).inc()

    def _refusal(self, scope, path: str):
        state = self.state
        if state.api_key and path not in OPEN_ROUTES:
            given = dict(scope.get("headers", [])).get(b"authorization", b"")
            expected = f"Bearer {state.api_key}".encode()
            if not hmac.compare_digest(given, expected):
                return _error_response(
                    401,
                    "invalid or missing API key: send Authorization: Bearer KEY",
                    "authentication_error",
                    code="invalid_api_key",
                )
        if state.draining and path not in ("/health", "/metrics"):
            return _error_response(503, "the server is shutting down", "service_unavailable")
        return None

    async def _read_body(self, scope, receive):
        """The whole body, a 413 response when it exceeds the cap, or None if the client left."""
        cap = self.state.max_body_bytes
        too_large = _error_response(
            413,
            f"request body exceeds the limit of {cap} bytes",
            "invalid_request_error",
            code="body_too_large",
        )
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            return too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


# ---- requests to rows ----------------------------------------------------------------------------------


class LoopNotifier:
    """Wakes the event loop once for the events of many requests (one decoding step), not per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._dirty: set[asyncio.Event] = set()
        self._scheduled = False

    @classmethod
    def of(cls, state: ServerState, loop: asyncio.AbstractEventLoop) -> LoopNotifier:
        if state.notifier is None or state.notifier.loop is not loop:
            state.notifier = cls(loop)
        return state.notifier

    def mark(self, ready: asyncio.Event) -> None:
        """Called on the scheduler thread: set `ready` on the loop soon."""
        with self._lock:
            self._dirty.add(ready)
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # a closed loop (shutdown): nobody is waiting any more
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            dirty, self._dirty, self._scheduled = self._dirty, set(), False
        for ready in dirty:
            ready.set()


@dataclass
class Choice:
    """One choice's progress, as its events arrive."""

    text: IncrementalText
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    logprobs: TokenLogprobs = field(default_factory=lambda: TokenLogprobs([], []))
    """Of the generated tokens, as they arrive (rows that asked for log-probabilities)."""
    prompt_logprobs: TokenLogprobs | None = None
    """Of the prompt's tokens 1.., once the row is done (echo with logprobs)."""
    generated: int = 0
    streamed: int = 0
    """Generated tokens already covered by a streamed chunk."""
    text_offset: int = 0
    """Characters of text already streamed (for a chunk's logprobs text_offset)."""


class Pending:
    """A request's rows in the scheduler, and the queue their events come back on."""

    def __init__(self, state: ServerState, request_id: str) -> None:
        self.state, self.request_id = state, request_id
        self.loop = asyncio.get_running_loop()
        self.choices: list[Choice] = []
        self.jobs: list[Row | ScoreJob] = []
        self.deadline = time.monotonic() + state.request_timeout
        # The scheduler thread appends events here; the notifier wakes the loop once per step.
        self._inbox: collections.deque = collections.deque()
        self._ready = asyncio.Event()
        self._notifier = LoopNotifier.of(state, self.loop)

    def _sink(self, index: int, event: tuple) -> None:
        """Called on the scheduler thread."""
        self._inbox.append((index, event))
        self._notifier.mark(self._ready)

    def add_row(
        self,
        prompt: list[int],
        params: SamplingParams,
        max_tokens: int,
        stop,
        seed,
        logprobs: int | None,
        prompt_logprobs: bool = False,
    ) -> None:
        index = len(self.choices)
        self.choices.append(Choice(IncrementalText(self.state.tokenizer, stop), prompt))
        self.jobs.append(
            Row(
                prompt,
                params,
                max_tokens,
                functools.partial(self._sink, index),
                stop=list(stop),
                seed=seed,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        )

    def add_score(self, prompt: list[int], k: int) -> None:
        index = len(self.choices)
        self.choices.append(Choice(IncrementalText(self.state.tokenizer), prompt))
        self.jobs.append(ScoreJob(prompt, k, functools.partial(self._sink, index)))

    def add_echo_only(self, prompt: list[int]) -> None:
        """A choice with nothing to compute: max_tokens 0 and no log-probs."""
        self.choices.append(Choice(IncrementalText(self.state.tokenizer), prompt, reason="length"))

    def submit(self) -> None:
        rows = [j for j in self.jobs if isinstance(j, Row)]
        scores = [j for j in self.jobs if isinstance(j, ScoreJob)]
        try:
            self.state.engine.submit(rows, scores)
        except UserError as err:
            raise ApiError(400, str(err), "invalid_request_error", "n") from None
        except EngineStopped as err:
            raise ApiError(503, str(err), "service_unavailable") from None
        except QueueFull as err:
            error = ApiError(429, f"too many requests waiting: {err}; retry later", "rate_limit_exceeded")
            error.headers["Retry-After"] = str(RETRY_AFTER_S)
            raise error from None

    def cancel(self) -> None:
        self.state.engine.cancel(self.jobs)

    @property
    def open(self) -> int:
        return sum(c.reason is None for c in self.choices)

    async def events(self, stream: bool = True) -> AsyncIterator[tuple[int, str, range]]:
        """(choice, new text, generated tokens it covers) as tokens arrive, until every choice is done;
        applies events to choices.

        Events that arrived together are merged: one item per choice that has new text or just
        finished. Tokens whose text is held back (a possible stop string, half a character) are covered
        by the next item. Without `stream` the text is decoded once at the end, not as it grows.
        """
        while self.open:
            self._ready.clear()
            if not self._inbox:
                left = self.deadline - time.monotonic()
                try:
                    await asyncio.wait_for(self._ready.wait(), timeout=max(left, 0.0))
                except asyncio.TimeoutError:
                    self.cancel()
                    log.warning("request %s timed out; its rows are cancelled", self.request_id)
                    raise ApiError(
                        504, f"the request took longer than {self.state.request_timeout:g} s", "timeout"
                    ) from None
                continue
            new: dict[int, list[int]] = {}
            finished: list[int] = []
            while self._inbox:
                index, event = self._inbox.popleft()
                choice, kind = self.choices[index], event[0]
                if kind == "tokens":
                    _, ids, logprobs = event
                    choice.tokens.extend(ids)
                    new.setdefault(index, []).extend(ids)
                    if logprobs is not None:
                        choice.logprobs.chosen.extend(logprobs.chosen)
                        choice.logprobs.top.extend(logprobs.top)
                elif kind == "prompt":
                    choice.prompt_logprobs = event[1]
                elif kind == "done":
                    _, reason, scored = event
                    if scored is not None:  # a scoring job's
                        choice.prompt_logprobs = scored
                    choice.reason = "length" if reason in ("length", "score") else "stop"
                    choice.generated = len(choice.tokens) + (reason == "eos")
                    finished.append(index)
                else:
                    self.cancel()
                    log.error("request %s failed in the scheduler: %s", self.request_id, event[1])
                    raise ApiError(503, event[1], "service_unavailable")
            if not stream:
                for index, ids in new.items():
                    self.choices[index].text.ids.extend(ids)  # decoded once, at the end
                continue
            for index in sorted({*new, *finished}):
                text = self.choices[index].text
                delta = text.add(new[index]) if index in new else ""
                if index in finished:
                    delta += text.finish()
                if delta or index in finished:
                    choice = self.choices[index]
                    covered = range(choice.streamed, len(choice.tokens))
                    choice.streamed = len(choice.tokens)
                    yield index, delta, covered

    async def wait(self, request: Request) -> None:
        """Until every choice is done; the client leaving cancels the rows."""

        async def consume():
            async for _ in self.events(stream=False):
                pass

        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()
            self.cancel()
            raise ApiError(499, "client closed the request", "client_closed")
        work.result()

    def usage(self, prompts: list[list[int]]) -> dict:
        return usage(sum(len(p) for p in prompts), sum(c.generated for c in self.choices))


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sampling(req) -> SamplingParams:
    if req.temperature == 0:
        return SamplingParams()
    return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p)


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {state.model_name!r}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )


def _budget(state: ServerState, prompt: list[int], max_tokens: int | None) -> int:
    """max_tokens checked against the context (None: whatever the context leaves)."""
    limit = state.context
    if max_tokens is None:
        max_tokens = limit - len(prompt)
    if len(prompt) + max_tokens > limit or max_tokens < 0:
        raise ApiError(
            400,
            f"this model's maximum context length is {limit} tokens; the request asks for "
            f"{len(prompt) + max_tokens} ({len(prompt)} in the prompt, {max_tokens} to generate)",
            "invalid_request_error",
            "max_tokens",
            "context_length_exceeded",
        )
    return max_tokens


def _prompt_ids(state: ServerState, prompt) -> list[list[int]]:
    """The request's prompts as token-id lists (strings encoded), each checked against the vocabulary."""
    prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)
    vocab = state.engine.vocab_size
    out = []
    for p in prompts:
        ids = state.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(
                400, "a prompt is empty: give at least one token", "invalid_request_error", "prompt"
            )
        if max(ids) >= vocab:
            raise ApiError(
                400,
                f"token id {max(ids)} is outside the vocabulary 0..{vocab - 1}",
                "invalid_request_error",
                "prompt",
            )
        out.append(ids)
    return out


def _token_str(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


Entry = tuple[int, float | None, list[tuple[int, float]] | None]
"""A token with its log-prob and top alternatives (None for a prompt's first token)."""


def _logprob_entries(choice: Choice, echo: bool, covered: range) -> list[Entry]:
    """The echoed prompt's tokens (when `echo`), then the generated tokens in `covered`."""
    entries: list[Entry] = []
    if echo:
        scored = choice.prompt_logprobs
        entries.append((choice.prompt[0], None, None))
        entries += [(token, scored.chosen[t], scored.top[t]) for t, token in enumerate(choice.prompt[1:])]
    generated = choice.logprobs
    entries += [(choice.tokens[j], generated.chosen[j], generated.top[j]) for j in covered]
    return entries


def _completion_logprobs(tokenizer, entries: list[Entry], k: int, start_offset: int) -> dict:
    """OpenAI's legacy completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, chosen, tops, offsets = [], [], [], []
    at = start_offset
    for token, logprob, top in entries:
        text = _token_str(tokenizer, token)
        tokens.append(text)
        chosen.append(logprob)
        offsets.append(at)
        at += len(text)
        alternatives = None
        if top is not None:
            alternatives = {_token_str(tokenizer, i): v for i, v in top[:k]}
            alternatives.setdefault(text, logprob)
        tops.append(alternatives)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(tokenizer, entries: list[Entry], k: int) -> dict:
    """OpenAI's chat logprobs: content, a list of {token, logprob, bytes, top_logprobs}."""

    def item(token: int, logprob: float) -> dict:
        text = _token_str(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [
        {**item(token, logprob), "top_logprobs": [item(i, v) for i, v in top[:k]]}
        for token, logprob, top in entries
    ]
    return {"content": content}


def _envelope(object_: str, cid: str, created: int, model: str, choices: list, **extra) -> dict:
    """The fields every completion response and chunk carries around its choices."""
    return {"id": cid, "object": object_, "created": created, "model": model, "choices": choices, **extra}


def _event_stream(pending: Pending, opening: list[dict], chunk_for, closing) -> EventSourceResponse:
    """Server-sent events: the `opening` chunks, one chunk per item of `pending.events()` that has
    text, log-probs or an end (`chunk_for(index, delta, covered, reason)`), the `closing()` chunk if
    any, then [DONE]; an error ends the stream in OpenAI's error shape. Leaving cancels the rows."""

    async def stream():
        try:
            for chunk in opening:
                yield json.dumps(chunk)
            async for index, delta, covered in pending.events():
                reason = pending.choices[index].reason
                if delta or covered or reason is not None:
                    yield json.dumps(chunk_for(index, delta, covered, reason))
            last = closing()
            if last is not None:
                yield json.dumps(last)
            yield "[DONE]"
        except ApiError as err:
            yield json.dumps(error_body(err.message, err.type, err.param, err.code))
            yield "[DONE]"
        finally:
            pending.cancel()

    return EventSourceResponse(stream(), ping=15, sep="\n")


# ---- the app -------------------------------------------------------------------------------------------


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application over a started scheduler, wrapped in the guard."""
    app = FastAPI(title="multitoken", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return _error_response(err.status, err.message, err.type, err.param, err.code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error_response(400, "the body is not valid JSON", "invalid_request_error")
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = (
            f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid body")
        )
        return _error_response(422, message, "invalid_request_error", where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return _error_response(err.status_code, str(err.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        request_id = request.scope.get("state", {}).get("request_id")
        log.exception("request %s failed", request_id)
        return _error_response(500, f"internal error (request id {request_id})", "server_error")

    @app.get("/health")
    async def health():
        if state.draining:
            return _error_response(503, "the server is shutting down", "service_unavailable")
        if not state.engine.ready:
            return _error_response(503, "the model is not ready", "service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        running, waiting = state.engine.load()
        state.metrics.queue_depth.set(waiting)
        state.metrics.batch_occupancy.set(running)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "multitoken",
            "max_model_len": state.context,
        }
        return {"object": "list", "data": [card]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = state.tokenizer
        eos = tok.decode([tok.eos_id]) if getattr(tok, "eos_id", None) is not None else None
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": eos,
            "bos_token": None,
            "pad_token": None,
            "chat_template": state.chat.template if state.chat.has_own_template else None,
            "model_max_length": state.context,
        }

    @app.post("/tokenize")
    async def tokenize(body: dict):
        text = body.get("prompt")
        if not isinstance(text, str):
            raise ApiError(400, "tokenize takes {'prompt': str}", "invalid_request_error", "prompt")
        eos = state.tokenizer.decode([state.tokenizer.eos_id])
        # The end-of-text token by itself is its id (lm-eval asks for it so); other text is plain text.
        ids = [state.tokenizer.eos_id] if text == eos else state.tokenizer.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.context}

    @app.post("/detokenize")
    async def detokenize(body: dict):
        ids = body.get("tokens")
        vocab = state.engine.vocab_size
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
            raise ApiError(
                400, "detokenize takes {'tokens': [ids in the vocabulary]}", "invalid_request_error"
            )
        return {"prompt": state.tokenizer.decode(ids)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_model(state, req.model)
        prompts = _prompt_ids(state, req.prompt)
        budgets = [_budget(state, p, req.max_tokens) for p in prompts]
        pending = Pending(state, request.scope["state"]["request_id"])
        params, stop, k = _sampling(req), req.stop_list(), req.logprobs
        for prompt, budget in zip(prompts, budgets, strict=True):
            for _ in range(req.n):
                if budget > 0:
                    pending.add_row(prompt, params, budget, stop, req.seed, k, req.echo and k is not None)
                elif k is not None:
                    pending.add_score(prompt, k)
                else:
                    pending.add_echo_only(prompt)
        pending.submit()
        name, created, cid = state.model_name, now(), new_id("cmpl")
        echoes = [state.tokenizer.decode(c.prompt) if req.echo else "" for c in pending.choices]

        def chunk(index: int, text: str, reason: str | None, logprobs=None) -> dict:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
            return _envelope("text_completion", cid, created, name, [choice])

        if req.stream:
            started: set[int] = set()

            def chunk_for(index: int, delta: str, covered: range, reason: str | None) -> dict:
                choice, echo = pending.choices[index], req.echo and index not in started
                if echo:  # the echoed prompt leads the choice's first chunk
                    delta = echoes[index] + delta
                    started.add(index)
                logprobs = None
                if k is not None:
                    entries = _logprob_entries(choice, echo, covered)
                    logprobs = _completion_logprobs(state.tokenizer, entries, k, choice.text_offset)
                    choice.text_offset += sum(len(t) for t in logprobs["tokens"])
                return chunk(index, delta, reason, logprobs)

            opening = [  # choices with nothing to generate
                chunk_for(index, "", range(0), choice.reason)
                for index, choice in enumerate(pending.choices)
                if choice.reason is not None
            ]

            def closing():
                if not req.include_usage:
                    return None
                return {**chunk(0, "", None), "choices": [], "usage": pending.usage(prompts)}

            return _event_stream(pending, opening, chunk_for, closing)

        await pending.wait(request)
        choices = []
        for index, choice in enumerate(pending.choices):
            text = echoes[index] + choice.text.text()
            logprobs = None
            if k is not None:
                entries = _logprob_entries(choice, req.echo, range(len(choice.tokens)))
                logprobs = _completion_logprobs(state.tokenizer, entries, k, 0)
            choices.append(
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": choice.reason}
            )
        return _envelope("text_completion", cid, created, name, choices, usage=pending.usage(prompts))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        _check_model(state, req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = state.chat.encode(messages)
        except Exception as err:  # a template's raise_exception, or a jinja error
            raise ApiError(
                400, f"cannot render the chat template: {err}", "invalid_request_error", "messages"
            ) from None
        if not prompt:
            raise ApiError(400, "the messages render to an empty prompt", "invalid_request_error", "messages")
        budget = _budget(state, prompt, req.token_limit)
        pending = Pending(state, request.scope["state"]["request_id"])
        k = (req.top_logprobs or 0) if req.logprobs else None
        for _ in range(req.n):
            if budget > 0:
                pending.add_row(prompt, _sampling(req), budget, req.stop_list(), req.seed, k)
            else:
                pending.add_echo_only(prompt)
        pending.submit()
        name, created, cid = state.model_name, now(), new_id("chatcmpl")

        def chunk(index: int, delta: dict, reason: str | None, logprobs=None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return _envelope("chat.completion.chunk", cid, created, name, [choice])

        if req.stream:

            def chunk_for(index: int, delta: str, covered: range, reason: str | None) -> dict:
                logprobs = None
                if k is not None:
                    entries = _logprob_entries(pending.choices[index], False, covered)
                    logprobs = _chat_logprobs(state.tokenizer, entries, k)
                return chunk(index, {"content": delta} if delta else {}, reason, logprobs)

            opening = [
                chunk(index, {"role": "assistant", "content": ""}, choice.reason)
                for index, choice in enumerate(pending.choices)
            ]

            def closing():
                if not req.include_usage:
                    return None
                return {**chunk(0, {}, None), "choices": [], "usage": pending.usage([prompt])}

            return _event_stream(pending, opening, chunk_for, closing)

        await pending.wait(request)
        choices = []
        for index, choice in enumerate(pending.choices):
            logprobs = None
            if k is not None:
                entries = _logprob_entries(choice, False, range(len(choice.tokens)))
                logprobs = _chat_logprobs(state.tokenizer, entries, k)
            message = {"role": "assistant", "content": choice.text.text()}
            choices.append(
                {"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.reason}
            )
        return _envelope("chat.completion", cid, created, name, choices, usage=pending.usage([prompt]))

    return Guard(app, state)
