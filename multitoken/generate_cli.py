"""`multitoken generate`: continue text prompts with a checkpoint, and measure self-speculative decoding."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Literal

from multitoken.devices import resolve_device
from multitoken.draft_tree import DraftTree
from multitoken.errors import UserError
from multitoken.generate import SPECULATIVE_HINT, GenerationStats, format_stats, generate, merge_stats
from multitoken.speculative import draft_depth

SPECULATIVE_MODES = {"auto": None, "on": True, "off": False}
COMPARE_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _TextStream:
    """Prints the prompt, then the row's text as its tokens arrive, holding back an incomplete character."""

    def __init__(self, tokenizer, out, prompt: str) -> None:
        self.tokenizer, self.out, self.prompt = tokenizer, out, prompt
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, new_ids: list[int]) -> None:
        if self.prompt is not None:  # printed only once generation has started (input was valid)
            self.out.write(self.prompt)
            self.prompt = None
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids)
        end = len(text.rstrip("\ufffd"))
        if end > self.printed:
            self.out.write(text[self.printed : end])
            self.out.flush()
            self.printed = end

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write((self.prompt or "") + text[self.printed :] + "\n")
        self.out.flush()


def _read_prompts(prompt: str | None, prompt_file: str | None, prompts_from_data: str | None, n: int):
    if sum(x is not None for x in (prompt, prompt_file, prompts_from_data)) != 1:
        raise UserError("give exactly one of --prompt, --prompt-file and --prompts-from-data")
    if prompt is not None:
        return [prompt]
    if prompts_from_data is not None:
        from multitoken.data.prompts import code_prompts

        return code_prompts(prompts_from_data, n)
    from multitoken.data.prompts import file_prompts

    return file_prompts(prompt_file)


def generate_cli(
    checkpoint: str,
    prompt: str | None = None,
    prompt_file: str | None = None,
    prompts_from_data: str | None = None,
    n_prompts: int = 10,
    max_new_tokens: int = 200,
    batch_size: int = 1,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    speculative: Literal["auto", "on", "off"] = "auto",
    seed: int | None = None,
    stats: bool = False,
    stats_json: str | None = None,
    device: str = "auto",
    stop: list[str] | None = None,
    compare_plain: bool = False,
    compare_clock: Literal["wall", "cpu"] = "wall",
    draft_tree: str | None = None,
    compile: bool = False,
) -> None:
    """Continue text prompts with a trained checkpoint, streaming the text as it is accepted.

    Decoding is greedy unless --temperature > 0 (then --top-k, --top-p and --seed apply). A model
    trained with --n-future > 1 decodes self-speculatively: its extra heads draft tokens that the
    next-token head verifies, so the output is exactly that of plain decoding (or, when sampling,
    follows exactly the same distribution) in fewer forward passes. By default (--speculative auto)
    each step picks the draft plan that is fastest on this machine, given how often the drafts are
    accepted, and decodes plainly when drafting does not pay.

    Args:
        checkpoint: checkpoint or run directory.
        prompt: the text to continue; end it on a word or punctuation, not on a space.
        prompt_file: a text file with one prompt per line (blank lines are skipped), or a .jsonl file of
            {"prompt": ...} objects.
        prompts_from_data: a prepared dataset directory: use the function headers of its val split
            as prompts (reproducible code prompts).
        n_prompts: how many prompts --prompts-from-data takes.
        max_new_tokens: most tokens to generate per prompt.
        batch_size: prompts decoded together.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k: sample among the k most likely tokens only (0: all).
        top_p: sample among the most likely tokens holding this much probability (1: all).
        speculative: auto (draft when it pays, step by step), on (always draft with every head) or
            off (plain decoding); --no-speculative is the same as off.
        seed: random seed for sampling.
        stats: print tokens per forward pass, acceptance per head, the draft plans used and the speed.
        stats_json: also write the stats to this JSON file.
        device: cpu, cuda, cuda:N or auto.
        stop: stop strings, each taken whole (commas included); a continuation ends after the first
            one it produces.
        compare_plain: time plain decoding of the same prompts too, alternating with speculative
            decoding after a warm-up, and report the median speedup and whether the outputs match.
        compare_clock: the clock of --compare-plain: wall, or cpu (this process's CPU time, which
            other jobs on a busy machine do not inflate; for one torch thread).
        draft_tree: verify a tree of drafts each step, given as widths per depth: 4,2,1 tries the top
            4 drafts of the +2 head, after each the top 2 of the +3 head, then the top +4.
        compile: compile the verification pass with torch.compile; the first batch waits tens of
            seconds to compile, later steps run faster (CUDA graphs on a GPU).
    """
    from multitoken.checkpoint import load_checkpoint

    if compare_clock not in COMPARE_CLOCKS:
        raise UserError(f"--compare-clock takes wall or cpu, got {compare_clock!r}")
    clock = COMPARE_CLOCKS[compare_clock]
    mode = SPECULATIVE_MODES.get(speculative, "bad")
    if mode == "bad":
        raise UserError(f"--speculative takes auto, on or off, got {speculative!r}")
    if n_prompts < 1:
        raise UserError(f"--n-prompts must be >= 1, got {n_prompts}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    texts = _read_prompts(prompt, prompt_file, prompts_from_data, n_prompts)
    tree = DraftTree.parse(draft_tree) if draft_tree is not None else None
    model, tokenizer = load_checkpoint(checkpoint, device=resolve_device(device))
    if tokenizer is None:
        raise UserError(f"checkpoint {checkpoint} has no tokenizer, so text prompts cannot be encoded")
    if mode is True and draft_depth(model.config) < 2:
        raise UserError(f"--speculative on: {SPECULATIVE_HINT}")
    model.eval()

    def run(ids, speculative_mode, tree_mode, first, on_tokens=None):
        """generate() on one batch; its stats' seconds are read on the comparison clock."""
        start = clock()
        result = generate(
            model,
            ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            speculative=speculative_mode,
            eos_id=tokenizer.eos_id,
            seed=None if seed is None else seed + first,
            stop_strings=stop,
            tokenizer=tokenizer,
            on_tokens=on_tokens,
            draft_tree=tree_mode,
            compile=compile,
        )
        if compare_clock == "cpu":
            result.stats.seconds = clock() - start
            result.stats.tokens_per_s = result.stats.new_tokens / max(result.stats.seconds, 1e-9)
        return result

    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    if compare_plain:  # warm up both (first-use cost measurement, compilation, allocator) untimed
        warm_ids = [tokenizer.encode(t) for t in batches[0]]
        run(warm_ids, mode, tree, 0)
        run(warm_ids, False, None, 0)
    parts: list[GenerationStats] = []
    plain_parts: list[GenerationStats] = []
    speedups: list[float] = []
    same_output = True
    separator = "---\n" if len(texts) > 1 else ""
    for index, batch in enumerate(batches):
        first = index * batch_size
        ids = [tokenizer.encode(t) for t in batch]
        stream = None
        if len(batch) == 1 and not compare_plain:  # timed runs print after decoding
            stream = _TextStream(tokenizer, sys.stdout, batch[0])
        if compare_plain and index % 2 == 1:  # alternate the order, so drift hits both alike
            plain = run(ids, False, None, first)
            result = run(ids, mode, tree, first)
        else:
            result = run(ids, mode, tree, first, stream)
            plain = run(ids, False, None, first) if compare_plain else None
        if stream is not None:
            stream.finish()
            sys.stdout.write(separator)
        else:
            for text, completion in zip(batch, result.text, strict=True):
                sys.stdout.write(f"{text}{completion}\n{separator}")
        parts.append(result.stats)
        if plain is not None:
            plain_parts.append(plain.stats)
            speedups.append(plain.stats.seconds / max(result.stats.seconds, 1e-9))
            same_output &= plain.tokens == result.tokens
    total = merge_stats(parts)
    if stats:
        print(format_stats(total), file=sys.stderr)
    if compare_plain:
        plain_total = merge_stats(plain_parts)
        same = "identical" if same_output else "different (expected when sampling)"
        print(
            f"plain decoding: {plain_total.tokens_per_s:.1f} tokens/s; speculative: {total.tokens_per_s:.1f} "
            f"tokens/s; median speedup over plain across {len(speedups)} runs: "
            f"{statistics.median(speedups):.2f}x (min {min(speedups):.2f}x, max {max(speedups):.2f}x); "
            f"outputs {same}",
            file=sys.stderr,
        )
    if stats_json:
        record = {
            "checkpoint": str(checkpoint),
            "prompts": len(texts),
            "batch_size": batch_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **total.to_dict(),
        }
        if compare_plain:
            record["plain"] = merge_stats(plain_parts).to_dict()
            record["identical_to_plain"] = same_output
            record["speedups"] = speedups
            record["median_speedup"] = statistics.median(speedups)
        Path(stats_json).write_text(json.dumps(record, indent=2) + "\n")


__all__ = ["generate_cli"]
