"""lm-evaluation-harness model "multitoken": any lm-eval task on a multitoken checkpoint.

Scoring uses the next-token head only; generation goes through `multitoken.generate.generate`, so a
model with draft heads decodes self-speculatively (same greedy output, fewer forward passes).

lm-eval finds models through its registry, which this module fills when imported. Two ways in:

    multitoken eval lm-eval --checkpoint RUN --tasks hellaswag --include-path my_tasks/
    python -m multitoken.evals.lm_eval_adapter --model multitoken \\
        --model_args checkpoint=RUN,device=cpu,batch_size=8 --tasks hellaswag

The second is the `lm_eval` command line itself (every lm_eval flag works) with this module imported
first; a plain `lm_eval --model multitoken` does not know the name. In Python, import this module
and pass `MultiTokenLMEval(checkpoint=...)` (or `model="multitoken"`) to `lm_eval.simple_evaluate`.

Dimension letters: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from multitoken.devices import resolve_device
from multitoken.errors import UserError
from multitoken.generate import generate

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def score_windows(seq: Sequence[int], first_scored: int, max_length: int) -> Iterator[tuple[list[int], int]]:
    """Windows `(input_ids, n_scored)` that score `seq[first_scored:]` once each, with the most context.

    Each input holds at most `max_length` tokens; its last `n_scored` predictions are the scored tokens.
    With `seq = [prefix] + tokens` and `first_scored = 1` these are lm-eval's rolling windows.
    """
    if first_scored < 1:
        raise ValueError("the first scored token needs at least one token of context")
    pos = first_scored
    while pos < len(seq):
        end = min(pos + max_length, len(seq))
        start = max(0, end - 1 - max_length)
        yield list(seq[start : end - 1]), end - pos
        pos = end


class MultiTokenLMEval(TemplateLM):
    """A multitoken checkpoint as an lm-eval `LM` (loglikelihood, loglikelihood_rolling, generate_until)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str | None = "auto",
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        speculative: bool | None = None,
        seed: int = 0,
        model=None,
        tokenizer=None,
        **unused: Any,
    ) -> None:
        """Load `checkpoint` (or wrap an in-memory `model` and `tokenizer`).

        `max_length` caps the context (default: the model's); `batch_size` is rows per forward pass
        ("auto" means the default); `max_gen_toks` is the generation budget when a task sets none.
        """
        super().__init__()
        device = resolve_device(device)
        if model is None:
            if checkpoint is None:
                raise UserError("the multitoken lm-eval model needs checkpoint=DIR")
            from multitoken.checkpoint import load_checkpoint

            model, tokenizer = load_checkpoint(checkpoint, device=device)
            if tokenizer is None:
                raise UserError(f"checkpoint {checkpoint} has no tokenizer; lm-eval tasks are text")
        elif tokenizer is None:
            raise UserError("pass a tokenizer with the model")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self._device = torch.device(device)
        context = model.config.max_seq_len
        if max_length is not None and int(max_length) < 1:
            raise UserError(f"max_length must be at least 1 token, got {max_length}")
        self.max_length = min(int(max_length), context) if max_length else context
        self.batch_size = _parse_batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.speculative = speculative
        self.seed = int(seed)
        if 1 not in model.config.head_offsets:
            raise UserError(f"model has no next-token head (head_offsets {model.config.head_offsets})")
        self.next_head = model.config.head_offsets.index(1)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None):
        """Build from model_args; they win over lm_eval's own flags (its --batch_size is always sent)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """Build from a `key=value,...` model_args string."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- tokenization (TemplateLM turns (context, continuation) strings into token pairs) ----

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        config = self.model.config
        return {"model_num_parameters": self.model.num_params(), "n_future": config.n_future}

    # ---- scoring ----

    @torch.no_grad()
    def _next_token_logprobs(self, inputs: list[list[int]]) -> list[torch.Tensor]:
        """log_softmax of the next-token head at every position of each input, (len(input), V) each."""
        model = self.model
        B, T = len(inputs), max(len(x) for x in inputs)
        tokens_BT = torch.zeros(B, T, dtype=torch.long)
        for b, ids in enumerate(inputs):
            tokens_BT[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)  # right padding: causal, harmless
        tokens_BT = tokens_BT.to(self._device)
        rope = model.rope_context(tokens_BT, None)
        h_BTD = model.trunk_forward(tokens_BT, rope)
        logits_BTV = model.logits(model.head_forward(self.next_head, h_BTD, rope))
        logprobs_BTV = F.log_softmax(logits_BTV.float(), dim=-1)
        return [logprobs_BTV[b, : len(ids)] for b, ids in enumerate(inputs)]

    def _score(self, jobs: list[tuple[list[int], int]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(sum of log-probs of the last n targets, all of them greedy) for each (sequence, n) job.

        A job's targets are `seq[-n:]`, scored through `score_windows` when the sequence is too long.
        """
        windows = []  # (job index, input ids, target ids)
        for j, (seq, n) in enumerate(jobs):
            pos = len(seq) - n
            for inp, k in score_windows(seq, pos, self.max_length):
                windows.append((j, inp, seq[pos : pos + k]))
                pos += k
        order = sorted(range(len(windows)), key=lambda w: -len(windows[w][1]))
        totals = [0.0] * len(jobs)
        greedy = [True] * len(jobs)
        bar = tqdm(total=len(order), desc="scoring", disable=disable_tqdm)
        for first in range(0, len(order), self.batch_size):
            batch = order[first : first + self.batch_size]
            logprobs = self._next_token_logprobs([windows[w][1] for w in batch])
            for w, logprobs_TV in zip(batch, logprobs, strict=True):
                j, _, target = windows[w]
                target_K = torch.tensor(target, device=logprobs_TV.device)
                logprobs_KV = logprobs_TV[-len(target) :]
                totals[j] += float(logprobs_KV.gather(1, target_K[:, None]).sum())
                greedy[j] &= bool((logprobs_KV.argmax(-1) == target_K).all())
            bar.update(len(batch))
        bar.close()
        return list(zip(totals, greedy, strict=True))

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        # A whitespace-only context can encode to nothing (lm-eval moves trailing spaces into the
        # continuation): the first continuation token is then scored after the prefix token.
        jobs = [
            ((list(context) or [self.prefix_token_id]) + list(continuation), len(continuation))
            for _, context, continuation in requests
        ]
        results = self._score([(seq, n) for seq, n in jobs if n > 0], disable_tqdm)
        scored = iter(results)
        out = [next(scored) if n > 0 else (0.0, True) for _, n in jobs]
        for (strings, _, _), result in zip(requests, out, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text after the EOS token, in windows of at most max_length."""
        jobs = []
        for request in requests:
            (text,) = request.args
            ids = self.tok_encode(text)
            jobs.append(([self.prefix_token_id, *ids], len(ids)))
        nonempty = [job for job in jobs if job[1] > 0]
        scored = iter(self._score(nonempty, disable_tqdm))
        out = [next(scored)[0] if n > 0 else 0.0 for _, n in jobs]
        for request, value in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, value)
        return out

    # ---- generation ----

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its `until` strings, EOS, or `max_gen_toks` tokens."""
        groups: dict[str, list[int]] = defaultdict(list)
        settings = []
        for i, request in enumerate(requests):
            _, gen_kwargs = request.args
            setting = self._generation_settings(gen_kwargs)
            settings.append(setting)
            groups[repr(setting)].append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", disable=disable_tqdm)
        for indices in groups.values():
            until, max_gen, temperature, top_p, top_k = settings[indices[0]]
            for first in range(0, len(indices), self.batch_size):
                batch = indices[first : first + self.batch_size]
                budget = max(1, self.max_length - max_gen)
                prompts = [self._prompt_ids(requests[i].args[0], budget) for i in batch]
                result = generate(
                    self.model,
                    prompts,
                    min(max_gen, self.max_length - max(len(p) for p in prompts)),
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    speculative=self.speculative,
                    eos_id=self.eot_token_id,
                    seed=self.seed + first,
                    stop_strings=until or None,
                    tokenizer=self.tokenizer,
                )
                for i, text in zip(batch, result.text, strict=True):
                    out[i] = _cut(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(batch))
        bar.close()
        return out

    def _prompt_ids(self, context: str, budget: int) -> list[int]:
        ids = self.tok_encode(context) if context else []
        return ids[-budget:] if ids else [self.prefix_token_id]

    def _generation_settings(self, gen_kwargs: dict | None) -> tuple:
        """(until, max_gen_toks, temperature, top_p, top_k) from a task's generation kwargs."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_gen = kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or self.max_gen_toks
        sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature") or 0.0) if sample else 0.0
        top_p = float(kwargs.get("top_p") or 1.0)
        top_k = int(kwargs.get("top_k") or 0)
        return tuple(until), min(int(max_gen), self.max_length - 1), temperature, top_p, top_k


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _parse_batch_size(batch_size: int | str | None) -> int:
    try:
        value = int(batch_size)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DEFAULT_BATCH_SIZE  # "auto", "auto:4" or None
    if value < 1:
        raise UserError(f"batch_size must be at least 1, got {value}")
    return value


def with_default_device(argv: list[str]) -> list[str]:
    """lm_eval arguments with `--device auto` added to a model run that names no device."""
    if "--model" in argv and not any(a == "--device" or a.startswith("--device=") for a in argv):
        return [*argv, "--device", "auto"]
    return list(argv)


def main(argv: list[str] | None = None) -> None:
    """The lm_eval command line, with the "multitoken" model registered.

    lm_eval's own default device is cuda:0; ours is `auto` (the GPU when there is one) unless --device
    is given. Our errors print as one line with exit status 2.
    """
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *with_default_device(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except UserError as err:
        print(f"multitoken: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Run as a script, this file is `__main__`; register the importable module's class, not this copy.
    from multitoken.evals.lm_eval_adapter import main as _main

    _main()
else:
    register_model("multitoken")(MultiTokenLMEval)
