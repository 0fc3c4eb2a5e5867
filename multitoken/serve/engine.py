"""The decoding engine in a process of its own, so that HTTP work never waits for the model's lock.

In one process, the event loop (parsing requests, detokenizing, writing server-sent events) and the
scheduler thread share Python's interpreter lock: every token streamed costs the decoding steps time,
and at 32 streaming clients the server reached about half of offline `generate()`. vLLM splits its
engine core into a process for the same reason. Here the API process keeps the tokenizer and the
model's config; the engine process loads the weights and runs the same `Scheduler` (the same decoding
steps and draft policy) as the in-process mode, `--engine thread`.

Two pipes, pickled messages:
  API -> engine:  ("submit", [(id, Row)], [(id, ScoreJob)])  rows and jobs without their sinks
                  ("cancel", [id, ...])
                  ("stop", None)                            finish: rows left get an error event
  engine -> API:  ("ready", None) or ("failed", message)    once, after loading
                  ("events", [(id, event)], [metric call], (running, waiting))
                                                            once per scheduler iteration
The engine process ignores SIGINT and SIGTERM (they reach the whole process group; the API process
drains first, then sends "stop") and exits when the API process's end of the command pipe closes, so
it never outlives the server. If the engine
process dies, every open row gets an error event and `dead` is set; the server then exits non-zero.

Admission (429, and 400 for a request larger than batch + queue) is decided here in the API process,
with the same rule as the in-process scheduler (`scheduler.check_room`), over the rows it has sent
and not yet seen finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

from multitoken.errors import UserError
from multitoken.serve.scheduler import EngineStopped, Row, Scheduler, ScoreJob, check_room

log = logging.getLogger("multitoken.serve")

ENGINE_QUEUE_SLACK = 2
"""The engine's own queue holds this many times batch + queue rows, so that it never refuses what
the API process admitted (cancelled rows leave the engine up to a step after the API counts them)."""


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process needs to load the model and run the scheduler."""

    checkpoint: str
    device: str
    dtype: str
    max_batch_size: int
    max_queue: int
    speculative: str
    compile: bool


class MetricsRelay:
    """Stands in for `ServerMetrics` in the engine process: records each call the scheduler makes
    (`ttft.observe(x)`, `record_step(...)`, ...) so that the API process can replay it on its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[tuple[str, str | None, tuple]] = []

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return _RecordedMetric(self, name)

    def record_step(self, *args) -> None:
        self._record(("record_step", None, args))

    def _record(self, call: tuple) -> None:
        with self._lock:
            self._calls.append(call)

    def take(self) -> list[tuple[str, str | None, tuple]]:
        with self._lock:
            calls, self._calls = self._calls, []
        return calls


@dataclass
class _RecordedMetric:
    relay: MetricsRelay
    name: str

    def __getattr__(self, method: str):
        return lambda *args: self.relay._record((self.name, method, args))


def replay(metrics, calls: Sequence[tuple[str, str | None, tuple]]) -> None:
    """Apply calls recorded by a `MetricsRelay` to a `ServerMetrics`."""
    for name, method, args in calls:
        target = getattr(metrics, name)
        (target if method is None else getattr(target, method))(*args)


# ---- the engine process ------------------------------------------------------------------------------


def engine_main(spec: EngineSpec, commands: Connection, events: Connection) -> None:
    """The engine process: load the model, run the scheduler, relay events until told to stop or the
    API process goes away."""
    # Ctrl-C (and a service manager's SIGTERM) reach the whole process group: the API process drains
    # first, then sends "stop"; if it dies instead, the closed pipe ends this process.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s (engine): %(message)s")
    try:
        scheduler, relay = _start_scheduler(spec)
    except UserError as err:
        events.send(("failed", str(err)))
        return
    except Exception as err:  # reported to the API process, which exits with it
        log.exception("the engine could not start")
        events.send(("failed", f"the decoding engine could not start: {type(err).__name__}: {err}"))
        return
    outbox = _Outbox(events, relay, scheduler)
    scheduler.on_iteration = outbox.flush
    events.send(("ready", None))
    _serve_commands(scheduler, commands, outbox)
    scheduler.stop(timeout=30)
    outbox.flush()  # the error events of rows the stop ended


def _start_scheduler(spec: EngineSpec) -> tuple[Scheduler, MetricsRelay]:
    from multitoken.checkpoint import load_checkpoint
    from multitoken.serve.server import resolve_dtype

    model, tokenizer = load_checkpoint(spec.checkpoint, device=spec.device)
    cast = resolve_dtype(spec.dtype, spec.device)
    if cast is not None:
        model = model.to(cast)
    relay = MetricsRelay()
    scheduler = Scheduler(
        model.eval(),
        tokenizer,
        max_batch_size=spec.max_batch_size,
        max_queue=ENGINE_QUEUE_SLACK * (spec.max_batch_size + spec.max_queue),
        speculative=spec.speculative,
        compile=spec.compile,
        metrics=relay,
    )
    scheduler.start()
    return scheduler, relay


class _Outbox:
    """Events of the rows, gathered on the scheduler thread and sent once per iteration."""

    def __init__(self, events: Connection, relay: MetricsRelay, scheduler: Scheduler) -> None:
        self.events, self.relay, self.scheduler = events, relay, scheduler
        self._lock = threading.Lock()
        self._pending: list[tuple[int, tuple]] = []

    def sink(self, job_id: int, event: tuple) -> None:
        with self._lock:
            self._pending.append((job_id, event))

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        calls = self.relay.take()
        if pending or calls:
            # If the API process is gone, the command loop ends the engine.
            with contextlib.suppress(BrokenPipeError, EOFError, OSError):
                self.events.send(("events", pending, calls, self.scheduler.load()))


def _serve_commands(scheduler: Scheduler, commands: Connection, outbox: _Outbox) -> None:
    live: dict[int, Row | ScoreJob] = {}
    while True:
        try:
            if not commands.poll(1.0):
                if not scheduler.ready:  # the scheduler thread failed: end, so the server notices
                    raise SystemExit(1)
                continue
            kind, payload = commands.recv()
        except (EOFError, OSError):
            log.warning("the server process is gone; the engine stops")
            return
        if kind == "stop":
            return
        if kind == "cancel":
            for job_id in payload:
                job = live.pop(job_id, None)
                if job is not None:
                    job.cancel()
            continue
        rows, jobs = payload
        for job_id, job in [*rows, *jobs]:
            job.sink = functools.partial(outbox.sink, job_id)
            live[job_id] = job
        try:
            scheduler.submit([row for _, row in rows], [job for _, job in jobs])
        except Exception as err:  # cannot happen while the API admits by the same rule; never silent
            for job_id, _ in [*rows, *jobs]:
                live.pop(job_id, None)
                outbox.sink(job_id, ("error", f"the decoding engine refused the request: {err}"))
            outbox.flush()
        # Finished rows leave `live` lazily: drop those the scheduler is done with.
        if len(live) > 4 * (scheduler.capacity + scheduler.max_queue):
            for job_id in [i for i, job in live.items() if _finished(job)]:
                del live[job_id]


def _finished(job: Row | ScoreJob) -> bool:
    if isinstance(job, Row):
        return job.cancelled or (job.output is not None and job.output.done)
    return job.cancelled


# ---- the API process's side ---------------------------------------------------------------------------


class EngineProcess:
    """The scheduler's interface (`start`, `submit`, `cancel`, `load`, `stop`, `ready`) over an engine
    in a child process; events come back on a reader thread and go to each row's sink."""

    def __init__(self, spec: EngineSpec, *, context: int, vocab_size: int, metrics=None) -> None:
        self.spec, self.context, self.vocab_size, self.metrics = spec, context, vocab_size, metrics
        self.capacity, self.max_queue = spec.max_batch_size, spec.max_queue
        self.dead = False
        self.exit_code: int | None = None
        self._lock = threading.Lock()
        self._live: dict[int, Row | ScoreJob] = {}
        self._rows_live = 0
        self._next_id = 0
        self._load = (0, 0)
        self._ready = False
        self._stopping = False
        context_ = multiprocessing.get_context("spawn")
        self._commands, engine_commands = context_.Pipe(duplex=False)[::-1]
        engine_events, self._events = context_.Pipe(duplex=False)[::-1]
        self._process = context_.Process(
            target=engine_main,
            args=(spec, engine_commands, engine_events),
            name="multitoken-engine",
            daemon=True,
        )
        self._engine_ends = (engine_commands, engine_events)
        self._reader = threading.Thread(target=self._read, name="multitoken-engine-events", daemon=True)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self, timeout: float | None = None) -> None:
        """Start the engine and wait until it has loaded the model; its load error is raised here."""
        self._process.start()
        for end in self._engine_ends:
            end.close()  # the child holds them now: our copies would hide its death
        if not self._events.poll(timeout):
            self._process.kill()
            raise UserError(f"the decoding engine did not start within {timeout:g} s")
        try:
            kind, payload = self._events.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise UserError(
                f"the decoding engine exited while loading (exit code {self._process.exitcode})"
            ) from None
        if kind == "failed":
            self._process.join(5)
            raise UserError(payload)
        self._ready = True
        self._reader.start()

    @property
    def ready(self) -> bool:
        return self._ready and not self.dead and self._process.is_alive()

    def submit(self, rows: Sequence[Row], scores: Sequence[ScoreJob] = ()) -> None:
        """Send a request's rows and jobs to the engine, or raise (UserError, QueueFull, EngineStopped)
        with nothing sent."""
        with self._lock:
            if self.dead or not self._ready:
                raise EngineStopped("the decoding engine is not running")
            check_room(self._rows_live, len(rows), self.capacity, self.max_queue)
            sent_rows, sent_jobs = [], []
            for job in [*rows, *scores]:
                job_id, self._next_id = self._next_id, self._next_id + 1
                self._live[job_id] = job
                job.engine_id = job_id
                bare = dataclasses.replace(job, sink=None)
                (sent_rows if isinstance(job, Row) else sent_jobs).append((job_id, bare))
            self._rows_live += len(rows)
            try:
                self._commands.send(("submit", (sent_rows, sent_jobs)))
            except (BrokenPipeError, OSError):
                for job_id, _ in [*sent_rows, *sent_jobs]:
                    del self._live[job_id]
                self._rows_live -= len(rows)
                raise EngineStopped("the decoding engine is not running") from None

    def cancel(self, jobs: Sequence[Row | ScoreJob]) -> None:
        """Cancel rows and jobs: their slots are free for admission now, in the engine at its next step."""
        ids = []
        with self._lock:
            for job in jobs:
                job.cancel()
                job_id = getattr(job, "engine_id", None)
                if job_id is not None and self._forget(job_id):
                    ids.append(job_id)
            if ids and not self.dead:
                with contextlib.suppress(BrokenPipeError, OSError):
                    self._commands.send(("cancel", ids))

    def _forget(self, job_id: int) -> bool:
        job = self._live.pop(job_id, None)
        if job is None:
            return False
        if isinstance(job, Row):
            self._rows_live -= 1
        return True

    def load(self) -> tuple[int, int]:
        """(rows in the batch, rows waiting), as the engine last reported."""
        return self._load

    def stop(self, timeout: float | None = None) -> None:
        """Stop the engine (rows still open get an error event) and wait for it to exit."""
        with self._lock:
            self._stopping = True
            if self._process.is_alive():
                with contextlib.suppress(BrokenPipeError, OSError):
                    self._commands.send(("stop", None))
        if self._process.pid is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        if self._reader.is_alive():
            self._reader.join(5)
        self._commands.close()

    def _read(self) -> None:
        while True:
            try:
                _kind, *payload = self._events.recv()
            except (EOFError, OSError):
                break
            events, calls, load = payload
            self._load = load
            if self.metrics is not None and calls:
                replay(self.metrics, calls)
            for job_id, event in events:
                with self._lock:
                    job = self._live.get(job_id)
                    if job is not None and event[0] in ("done", "error"):
                        self._forget(job_id)
                if job is not None:
                    job.sink(event)
        self._process.join(10)
        self.exit_code = self._process.exitcode
        with self._lock:
            stopped_by_us = self._stopping
            orphans = list(self._live.values())
            self._live.clear()
            self._rows_live = 0
            self.dead = True
        if orphans or not stopped_by_us:
            log.error("the decoding engine stopped (exit code %s)", self.exit_code)
        for job in orphans:
            job.sink(("error", f"the decoding engine stopped (exit code {self.exit_code})"))
