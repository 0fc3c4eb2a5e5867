"""Continuous batching: one thread owns the model and drives the decoding steps for rows that come and go.

Every request choice is one row of a `multitoken.decoding.DecodeBatch`, whose cache row it keeps while
it lives. The thread loops:

  1. drop rows that finished or were cancelled (`DecodeBatch.keep_rows` compacts the cache rows, so the
     freed rows are reused by the next arrivals), and size the cache for the rows it holds
     (`DecodeBatch.resize` to a power of two covering the longest prompt + max_tokens: attention reads
     every cache position, so a batch of short requests must not pay for the model's whole context);
  2. admit waiting rows into free cache rows, and prefill prompts in chunks of at most `prefill_chunk`
     tokens per iteration (a long prompt takes several iterations; running rows keep decoding between);
  3. run one `decode_step` over the batch under the draft plan the `DraftPolicy` chooses (or the fixed
     plan of `--speculative on/off`); rows still prefilling get no budget and stay unchanged;
  4. hand each row its committed tokens (`RowOutput` cuts at EOS, stop strings and max_tokens), with
     their log-probabilities when the row asked for them (from the step's own next-token logits, so
     they stream with the tokens), after scoring the row's prompt if it asked for that (`echo`);
and between iterations it runs scoring jobs: one plain forward pass of the next-token head over a
sequence, for `echo` + `logprobs` with nothing to generate (lm-eval's loglikelihood requests).

Every row carries its own sampling settings (`RowSampling`), so greedy and sampled requests share a
batch; a greedy row's tokens are those of plain greedy decoding whatever else runs beside it (up to
floating-point ties), as in `generate()`. A seeded request that starts into an empty batch reseeds the
batch's generator and starts a fresh policy (no acceptance statistics from earlier requests), so the
same request alone gives the same tokens every time.

Events go back to the caller through each row's `sink`, called on this thread: ("prompt", logprobs)
first if the row asked for its prompt scored, ("tokens", ids, logprobs or None) as they are kept, then
("done", reason, None) or ("error", message). A scoring job answers ("done", "score", logprobs).

Dimension letters: T positions, V vocabulary, K top alternatives.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from multitoken.decoding import DecodeBatch, DraftPlan, decode_step, prefill
from multitoken.draft_policy import DraftPolicy
from multitoken.errors import UserError
from multitoken.generate import CALIBRATION_CACHE_LEN, adaptive_policy
from multitoken.row_output import RowOutput
from multitoken.sampling import RowSampling, SamplingParams
from multitoken.speculative import draft_depth
from multitoken.step_costs import batch_bucket

log = logging.getLogger("multitoken.serve")

PREFILL_CHUNK = 512
"""Prompt tokens prefilled per scheduler iteration, over all joining rows."""
MIN_CACHE_LEN = 128
"""Fewest cache positions per row; the batch's cache grows by powers of two as its rows need."""

Sink = Callable[[tuple], None]


@dataclass
class TokenLogprobs:
    """Log-probabilities of a sequence's tokens under the next-token head, from position 1 on."""

    chosen: list[float]
    """log p(ids[t] | ids[:t]) for t = 1 .. len(ids) - 1."""
    top: list[list[tuple[int, float]]]
    """The `k` most likely tokens at each of those positions, (id, log-prob), best first."""


def token_logprobs(logits_TV: torch.Tensor, targets: Sequence[int], k: int) -> TokenLogprobs:
    """log p(targets[t]) under logits_TV[t], with the `k` most likely tokens at each position."""
    logprobs_TV = F.log_softmax(logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32)), dim=-1)
    target_T = torch.tensor(list(targets), device=logits_TV.device)
    chosen_T = logprobs_TV.gather(1, target_T[:, None])[:, 0]
    top: list[list[tuple[int, float]]] = [[] for _ in targets]
    if k > 0:
        values_TK, index_TK = logprobs_TV.topk(min(k, logprobs_TV.shape[-1]), dim=-1)
        top = [
            list(zip(i, v, strict=True)) for i, v in zip(index_TK.tolist(), values_TK.tolist(), strict=True)
        ]
    return TokenLogprobs(chosen_T.tolist(), top)


@dataclass
class Row:
    """One choice of one request: a prompt to continue, and where its tokens go."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    sink: Sink
    eos_id: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    """Give each generated token's log-probability, with this many alternatives."""
    prompt_logprobs: bool = False
    """Also score the prompt's tokens (with `logprobs` alternatives), before the first token."""
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    output: RowOutput | None = None
    prefilled: int = 0
    deferred: bool = False
    """Kept waiting one step so that it shares a prefill pass with rows arriving just after it."""
    first_token_at: float | None = None
    last_token_at: float | None = None

    def cancel(self) -> None:
        """Free the row's slot at the scheduler's next iteration (callable from any thread)."""
        self.cancelled = True


@dataclass
class ScoreJob:
    """Score `ids` (no decoding): log-probs of ids[1:] with `k` alternatives each."""

    ids: list[int]
    k: int
    sink: Sink
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class QueueFull(Exception):
    """The waiting queue cannot take the rows of a request now."""


class EngineStopped(Exception):
    """The scheduler is shutting down or its thread has ended."""


def check_room(live_rows: int, new_rows: int, capacity: int, max_queue: int) -> None:
    """Admit `new_rows` beside `live_rows` (running or waiting), or raise: UserError when the request
    alone exceeds batch + queue, QueueFull when there is no room for it now."""
    if new_rows > capacity + max_queue:
        raise UserError(
            f"the request needs {new_rows} rows (prompts x n) but the server holds at most "
            f"{capacity + max_queue} ({capacity} in the batch, {max_queue} waiting)"
        )
    if live_rows + new_rows > capacity + max_queue:
        waiting = max(live_rows - capacity, 0)
        raise QueueFull(
            f"{waiting} rows are waiting for the batch (limit {max_queue} beyond its {capacity} rows)"
        )


class Scheduler:
    """Owns the model on one background thread; `submit` rows and scoring jobs from any thread."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        speculative: str = "auto",
        compile: bool = False,
        metrics=None,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        if speculative not in ("auto", "on", "off"):
            raise UserError(f"--speculative takes auto, on or off, got {speculative!r}")
        if max_batch_size < 1 or max_queue < 1:
            raise UserError("--max-batch-size and --max-queue must be at least 1")
        config = model.config
        if config.head_offsets[0] != 1:
            raise UserError(f"this model has no next-token head (head_offsets {config.head_offsets})")
        if speculative == "on" and draft_depth(config) < 2:
            raise UserError("--speculative on: this model has one head; use auto or off")
        self.model, self.tokenizer = model, tokenizer
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.capacity, self.max_queue = max_batch_size, max_queue
        self.speculative, self.compile, self.metrics = speculative, compile, metrics
        self.prefill_chunk = prefill_chunk
        self.context = config.max_seq_len
        self.device = next(model.parameters()).device
        self.n_heads = draft_depth(config) - 1 if speculative != "off" else 0
        self.fixed: DraftPlan | None = None
        if self.n_heads == 0:
            self.fixed = DraftPlan.chain(0)
        elif speculative == "on":
            self.fixed = DraftPlan.chain(self.n_heads)
        self.policy: DraftPolicy | None = None
        self._cv = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._scores: deque[ScoreJob] = deque()
        self._rows: list[Row] = []
        self._stopping = False
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._sampling_stale = True
        self._extra_slots = 0
        self.batch: DecodeBatch | None = None
        self.on_iteration: Callable[[], None] | None = None
        """Called on the thread after each iteration, once its events are out (the engine process
        sends them to the server then)."""
        self._thread = threading.Thread(target=self._run, name="multitoken-scheduler", daemon=True)

    # ---- the caller's side ---------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Start the thread and wait until it is ready to decode (step costs calibrated, caches set up)."""
        self._thread.start()
        self._ready.wait(timeout)
        if self._failed is not None:
            raise self._failed

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._failed is None and self._thread.is_alive()

    def submit(self, rows: Sequence[Row], scores: Sequence[ScoreJob] = ()) -> None:
        """Queue a request's rows and scoring jobs together, or raise (QueueFull, EngineStopped, or a
        UserError when the request alone exceeds batch + queue); nothing is queued then."""
        with self._cv:
            if self._stopping or self._failed is not None or not self._thread.is_alive():
                raise EngineStopped("the decoding engine is not running")
            if any(row.cancelled for row in self._waiting):
                self._waiting = deque(row for row in self._waiting if not row.cancelled)
            running = sum(not (row.cancelled or row.output.done) for row in self._rows)
            check_room(running + len(self._waiting), len(rows), self.capacity, self.max_queue)
            for row in rows:
                row.output = RowOutput(row.max_tokens, self.eos_id, row.stop, self.tokenizer)
                self._waiting.append(row)
            self._scores.extend(scores)
            self._gauge()
            self._cv.notify()

    def cancel(self, jobs: Sequence[Row | ScoreJob]) -> None:
        """Cancel rows and jobs; their slots are freed at the next iteration."""
        for job in jobs:
            job.cancel()

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread; rows still running get an error event."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def load(self) -> tuple[int, int]:
        """(rows in the batch, rows waiting)."""
        with self._cv:
            return len(self._rows), len(self._waiting)

    # ---- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._setup()
                self._ready.set()
                self._loop()
        except BaseException as err:  # report to whoever waits, then end the thread
            self._failed = err
            self._ready.set()
            log.exception("scheduler thread failed")
            self._fail_all(f"the decoding engine failed: {type(err).__name__}")
        finally:
            if self.batch is not None:
                self.batch.close()

    def _setup(self) -> None:
        candidates: list[DraftPlan] = []
        if self.fixed is None:
            self.policy = adaptive_policy(self.model, 1)
            candidates = self.policy.candidate_plans()
            # Calibrate every batch bucket the server can reach, once (the costs are cached on disk).
            costs, names = self.policy.costs, [p.name for p in candidates]
            bucket, measured = 1, False
            while True:
                if not costs.knows(names, bucket):
                    cache_len = min(CALIBRATION_CACHE_LEN, self.context)
                    self.policy.calibration_seconds += costs.calibrate(
                        self.model, bucket, candidates, cache_len
                    )
                    measured = True
                if bucket >= self.capacity:
                    break
                bucket = batch_bucket(bucket + 1)
            if measured:
                costs.save(self.model)
        self._extra_slots = max([p.block for p in candidates if p.tree is not None], default=0)
        self._new_batch()

    def _new_batch(self) -> None:
        """The batch that keeps its cache rows for the server's lifetime (made again after a failure)."""
        if self.batch is not None:
            self.batch.close()
        self.batch = DecodeBatch(
            self.model,
            self.capacity,
            self._cache_len(0),
            extra_slots=self._extra_slots,
            compile=self.compile,
            generator=torch.Generator(device=self.device),
        )
        # As generate(): the adaptive mode lets cached drafting heads catch up when they first draft.
        self.batch.prefill_heads = self.fixed is not None and self.n_heads > 0
        self.batch.track_ranks = self.policy is not None and self.policy.trees
        self._rows, self._sampling_stale = [], True

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._scores or self._rows or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    break
                scores = list(self._scores)
                self._scores.clear()
                self._drop_finished()
                admitted = self._admissions()
                self._gauge(len(self._rows) + len(admitted))
            try:
                self._iterate(scores, admitted)
            except Exception:
                # Fail what was in hand, start from an empty batch, keep serving the others.
                log.exception("decoding failed; failing %d rows and starting a fresh batch", len(self._rows))
                for row in {id(r): r for r in [*self._rows, *admitted]}.values():
                    if not row.output.done:
                        row.output.done = True
                        row.sink(("error", "the decoding engine failed on this batch"))
                for job in scores:
                    if not job.cancelled:
                        job.sink(("error", "the decoding engine failed on this batch"))
                self._new_batch()
            if self.on_iteration is not None:
                self.on_iteration()
        self._fail_all("the server is shutting down")

    def _admissions(self) -> list[Row]:
        """The waiting rows that join the batch this iteration (called holding the lock).

        While rows are decoding, rows that just arrived wait one step, once, unless they fill the
        batch: rows arriving within a step of each other then share one prefill pass instead of each
        paying for its own (a forward pass costs about the same for one short prompt as for many).
        A row's first token comes at most one step later.
        """
        self._waiting = deque(row for row in self._waiting if not row.cancelled)
        free = self.capacity - len(self._rows)
        joining = list(itertools.islice(self._waiting, free))
        decoding = any(row.prefilled == len(row.prompt) for row in self._rows)
        if decoding and len(joining) < free and not any(row.deferred for row in joining):
            for row in joining:
                row.deferred = True
            return []
        for _ in joining:
            self._waiting.popleft()
        return joining

    def _iterate(self, scores: list[ScoreJob], admitted: list[Row]) -> None:
        for job in scores:
            if not job.cancelled:
                job.sink(("done", "score", self._score(job.ids, job.k)))
                job.cancelled = True  # answered
        if admitted:
            self._admit(admitted)
        self._prefill()
        self._step()

    def _gauge(self, occupancy: int | None = None) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))
            if occupancy is not None:
                self.metrics.batch_occupancy.set(occupancy)

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not (row.cancelled or row.output.done)]
        if len(keep) < len(self._rows):
            self.batch.keep_rows(keep)
            self._rows = [self._rows[i] for i in keep]
            self._sampling_stale = True

    def _admit(self, admitted: list[Row]) -> None:
        if not self._rows and admitted[0].seed is not None:
            # A seeded request alone: same generator state and same plan choices on every run.
            self.batch.generator.manual_seed(admitted[0].seed)
            if self.policy is not None:
                self.policy = self._fresh_policy()
        self._rows.extend(admitted)
        self._sampling_stale = True

    def _fresh_policy(self) -> DraftPolicy:
        return DraftPolicy(
            self.policy.n_heads,
            self.policy.costs,
            trees=self.policy.trees,
            device=self.device,
            vocab_size=self.model.config.vocab_size,
        )

    def _cache_len(self, needed: int) -> int:
        """Cache positions for rows needing `needed` (prompt + max_tokens): a power of two, at least
        MIN_CACHE_LEN, at most the context; attention reads them all, so shorter is faster."""
        return min(self.context, max(MIN_CACHE_LEN, 1 << max(needed - 1, 0).bit_length()))

    def _sync_sampling(self) -> None:
        if self._sampling_stale:
            wanted = self._cache_len(max((len(r.prompt) + r.max_tokens for r in self._rows), default=0))
            # Grow at once; shrink only to half or less, so a batch does not resize back and forth.
            if wanted > self.batch.cache_len or 2 * wanted <= self.batch.cache_len:
                self.batch.resize(wanted)
            self.batch.sampling = RowSampling.build([row.params for row in self._rows], self.device)
            self.batch.n_rows = len(self._rows)
            if self.policy is not None:  # as generate(): probe in plain steps where that is exact
                self.policy.shadow_probes = self.batch.shadow_probes_exact(len(self._rows))
            self._sampling_stale = False

    def _prefill(self) -> None:
        """Prefill joining rows, at most prefill_chunk prompt tokens this iteration."""
        self._sync_sampling()
        left = self.prefill_chunk
        work = []  # (row index, chunk, start, final)
        for i, row in enumerate(self._rows):
            remaining = len(row.prompt) - row.prefilled
            if remaining <= 0 or row.cancelled:
                continue
            if left <= 0:
                break
            take = min(remaining, left)
            work.append(
                (i, row.prompt[row.prefilled : row.prefilled + take], row.prefilled, take == remaining)
            )
            left -= take
        # One prefill call per run of consecutive rows that all finish (or all continue) their prompts.
        run: list[tuple] = []
        for item in [*work, None]:
            if run and (item is None or item[0] != run[-1][0] + 1 or item[3] != run[-1][3]):
                self._prefill_run(run)
                run = []
            if item is not None:
                run.append(item)

    def _prefill_run(self, run: list[tuple]) -> None:
        first = run[0][0]
        final = run[0][3]
        keep_logits = any(self._rows[i].logprobs is not None for i, *_ in run)
        record = prefill(
            self.batch,
            [chunk for _, chunk, _, _ in run],
            first_row=first,
            start=[s for _, _, s, _ in run],
            final=final,
            keep_logits=keep_logits,
        )
        for i, chunk, start, _ in run:
            self._rows[i].prefilled = start + len(chunk)
        if record is not None:
            for b, ((i, *_), tokens) in enumerate(zip(run, record.tokens, strict=True)):
                self._deliver(self._rows[i], tokens, record.logits_BTV[b] if keep_logits else None)

    def _step(self) -> None:
        rows = self._rows
        budget = [
            row.output.budget if row.prefilled == len(row.prompt) and not row.cancelled else 0 for row in rows
        ]
        if not any(budget):
            return
        n = len(rows)
        plan = self.fixed if self.fixed is not None else self.policy.choose(n)
        keep_logits = any(row.logprobs is not None for row in rows)
        record = decode_step(self.batch, plan, budget, keep_logits=keep_logits)
        if self.fixed is None:
            self.policy.observe(record, n)
        if self.metrics is not None:
            offsets = range(2, len(record.reached_J) + 2)
            drafts = not plan.shadow  # a shadow probe's guesses are not drafts
            self.metrics.record_step(
                sum(b > 0 for b in budget),
                sum(len(t) for t in record.tokens),
                dict(zip(offsets, record.reached_J, strict=True)) if drafts else {},
                dict(zip(offsets, record.accepted_J, strict=True)) if drafts else {},
            )
        for b, (row, tokens) in enumerate(zip(rows, record.tokens, strict=True)):
            if tokens:
                self._deliver(row, tokens, record.logits_BTV[b] if keep_logits else None)

    def _deliver(self, row: Row, tokens: list[int], logits_TV: torch.Tensor | None = None) -> None:
        """Hand a row the tokens a step committed for it; `logits_TV` are the logits behind them."""
        if row.cancelled or row.output.done:
            return
        kept = row.output.add(tokens)
        now = time.perf_counter()
        if self.metrics is not None:
            if row.first_token_at is None:
                self.metrics.ttft.observe(now - row.arrival)
            elif kept:
                self.metrics.inter_token.observe((now - row.last_token_at) / len(kept))
        if row.first_token_at is None:
            row.first_token_at = now
            if row.prompt_logprobs:  # before the first tokens, so a stream's first chunk can echo it
                row.sink(("prompt", self._score(row.prompt, row.logprobs or 0)))
        row.last_token_at = now
        if kept:
            logprobs = None
            if row.logprobs is not None:
                logprobs = token_logprobs(logits_TV[: len(kept)], kept, row.logprobs)
            row.sink(("tokens", kept, logprobs))
        if row.output.done:
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(row.prompt))
            row.sink(("done", row.output.reason, None))

    def _score(self, ids: list[int], k: int) -> TokenLogprobs:
        """Log-probs of ids[1:] from one plain forward pass of the trunk and next-token head."""
        if len(ids) < 2:
            return TokenLogprobs([], [])
        tokens_1T = torch.tensor([ids[:-1]], dtype=torch.long, device=self.device)
        return token_logprobs(self.model.next_token_logits(tokens_1T)[0], ids[1:], k)

    def _fail_all(self, message: str) -> None:
        with self._cv:
            pending = [*self._rows, *self._waiting]
            scores = list(self._scores)
            self._rows, self._scores = [], deque()
            self._waiting.clear()
        for row in pending:
            if row.output is None or not row.output.done:
                row.sink(("error", message))
        for job in scores:
            job.sink(("error", message))
        if self.on_iteration is not None:
            self.on_iteration()
