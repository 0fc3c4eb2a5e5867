"""`multitoken experiment induction`: copying two-token names from earlier in a story (paper §4.1).

Character names in a story corpus are replaced by random two-token names, consistently within each
story. Names are a capitalised syllable and a lowercase syllable ("Ka" + "lo" = "Kalo"); the BPE
tokenizer is trained on the corpus and then given top-priority merges for every syllable, so each name
encodes to exactly [" Ka", "lo"] (checked for every name). The metric is the next-token head's greedy
accuracy on the second token of a name already mentioned earlier in the same story: after " Ka" the
model must recall which syllable followed " Ka" earlier in this story, an induction task. Only mentions
after a space count (a name opening a document or a line tokenizes differently).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch

from multitoken.checkpoint import checkpoint_steps, load_model
from multitoken.data.shards import PrepareConfig, prepare
from multitoken.data.sources import iter_documents
from multitoken.errors import UserError
from multitoken.studies.corpora import stories
from multitoken.studies.report import Report
from multitoken.studies.runs import (
    Budget,
    StudyOptions,
    final_validation,
    pick_scale,
    print_table,
    resolve_device,
)
from multitoken.tokenizer import Tokenizer, train_bpe

CONSONANTS = "bdfgklmnprstvz"
"""Consonants of the name syllables."""
VOWELS = "aeiou"
"""Vowels of the name syllables."""
N_FUTURE = (1, 2)
"""Heads compared."""


@dataclass(kw_only=True)
class InductionScale(Budget):
    """Budget of one scale."""

    dims: tuple[int, ...]
    """Model widths swept (the x axis of the plot)."""
    n_layers: int
    """Blocks of every model."""
    n_stories: int
    """Training stories (generated corpus)."""
    n_eval: int
    """Held-out stories on which the metric is measured."""
    vocab_size: int
    """BPE vocabulary before the name syllables are added."""
    seeds: int = 1
    """Model seeds of the two smallest widths."""
    seeds_rest: int = 1
    """Model seeds of the larger widths (no more than `seeds`: the largest are cut first)."""
    checkpoints: int = 4
    """Kept checkpoints per run, each scored: the best is the paper's early stopping on the test metric."""


SCALES = {
    "debug": InductionScale(dims=(16, 32), n_layers=2, max_steps=15, batch_size=8, seq_len=64, n_stories=300,
                            n_eval=16, vocab_size=400, seeds=2, checkpoints=2),
    "small": InductionScale(dims=(32, 64, 128), n_layers=4, max_steps=600, batch_size=32, seq_len=128,
                            n_stories=20_000, n_eval=300, vocab_size=1024),
    "cpu": InductionScale(dims=(16, 32, 64, 128), n_layers=4, max_steps=1500, batch_size=32, seq_len=128,
                          n_stories=50_000, n_eval=300, vocab_size=1024, seeds=2, checkpoints=6),
    "medium": InductionScale(dims=(64, 128, 256, 512), n_layers=6, max_steps=5000, batch_size=64,
                             seq_len=256, n_stories=200_000, n_eval=1000, vocab_size=4096, lr=1e-3, seeds=2,
                             checkpoints=10),
    "large": InductionScale(dims=(128, 256, 512, 1024), n_layers=8, max_steps=20_000, batch_size=128,
                            seq_len=512, n_stories=1_000_000, n_eval=2000, vocab_size=8192, lr=6e-4, seeds=2,
                            checkpoints=10),
}  # fmt: skip
"""cpu: the issue-15 budget, about an hour of one CPU core (n=1 at the largest width learns to copy)."""


# ---- names and tokenizer -------------------------------------------------------------------------------


def syllables() -> tuple[list[str], list[str]]:
    """(first syllables "Ba", "Be", ..., second syllables "ba", "be", ...): consonant + vowel."""
    second = [c + v for c in CONSONANTS for v in VOWELS]
    return [s.capitalize() for s in second], second


def name_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """BPE trained on `texts`, with top-priority merges making " Xy" and "xy" syllables single tokens.

    BPE applies merges in rank order, so with the syllable merges ranked first, " Kalo" always becomes
    " Ka" + "lo" whatever merges the corpus taught (names are checked with `two_token_names`).
    """
    config = json.loads(train_bpe(texts, vocab_size).hf.to_str())
    model = config["model"]
    vocab: dict[str, int] = model["vocab"]
    first, second = syllables()
    space = "Ġ"  # the ByteLevel alphabet's space
    merges: list[list[str]] = []
    for syl in first:
        merges += [[space, syl[0]], [space + syl[0], syl[1]]]
    merges += [[syl[0], syl[1]] for syl in second]
    merges = [list(m) for m in dict.fromkeys(tuple(m) for m in merges)]
    for left, right in merges:
        if left + right not in vocab:
            vocab[left + right] = max(vocab.values()) + 1
    front = {tuple(m) for m in merges}
    model["merges"] = merges + [m for m in model["merges"] if tuple(m) not in front]
    model["ignore_merges"] = False
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(config)), kind="bpe")


def name_ids(tokenizer: Tokenizer, name: str) -> tuple[int, ...]:
    """Token ids of `name` as it appears in running text, after a space."""
    return tuple(tokenizer.encode(" " + name))


def two_token_names(tokenizer: Tokenizer, forbidden_words: set[str]) -> dict[str, tuple[int, int]]:
    """Every syllable-pair name that encodes to exactly two tokens and is no word of the corpus."""
    first, second = syllables()
    names = {}
    for a in first:
        for b in second:
            ids = name_ids(tokenizer, a + b)
            if len(ids) == 2 and (a + b).lower() not in forbidden_words:
                names[a + b] = ids
    return names


# ---- corpus -------------------------------------------------------------------------------------------


def replace_names(text: str, names: list[str], pool: list[str], rng: random.Random) -> tuple[str, list[str]]:
    """`text` with each distinct listed name replaced by a distinct random pool name; (text, names used)."""
    if not names:
        return text, []
    pattern = re.compile(
        r"\b(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")\b"
    )
    found = list(dict.fromkeys(pattern.findall(text)))
    chosen = rng.sample(pool, len(found))
    mapping = dict(zip(found, chosen, strict=True))
    return pattern.sub(lambda m: mapping[m.group(1)], text), chosen


def repeated_name_positions(ids: list[int], pairs: set[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Positions t of name second tokens (ids[t-1], ids[t]) in `pairs`: (repeated mentions, first mentions).

    A mention is repeated when the same two tokens already occurred, complete, before position t - 1.
    """
    seen: set[tuple[int, int]] = set()
    repeated, first = [], []
    for t in range(1, len(ids)):
        pair = (ids[t - 1], ids[t])
        if pair in pairs:
            (repeated if pair in seen else first).append(t)
            seen.add(pair)
    return repeated, first


@dataclass
class Corpus:
    """Name-replaced stories ready for training and evaluation."""

    data: Path
    """Prepared dataset directory."""
    tokenizer: Tokenizer
    """Tokenizer with two-token names."""
    eval_docs: list[str]
    """Held-out stories."""
    eval_names: list[list[str]]
    """Names inserted in each held-out story."""
    n_names: int
    """Size of the random-name pool."""


def build_corpus(root: Path, scale: InductionScale, seed: int, corpus: str, names_file: str) -> Corpus:
    """Generated stories (or `corpus` with the names of `names_file`), names replaced, tokenized."""
    if bool(corpus) != bool(names_file):
        raise UserError("give both --corpus and --names, or neither (to use generated stories)")
    if corpus:
        if not Path(names_file).is_file():
            raise UserError(f"name file {names_file} does not exist")
        names = [line.strip() for line in Path(names_file).read_text().splitlines() if line.strip()]
        if not names:
            raise UserError(f"name file {names_file} lists no names")
        docs = list(iter_documents(corpus))
        held = set(range(0, len(docs), max(2, len(docs) // scale.n_eval))[: scale.n_eval])
        eval_docs = [d for i, d in enumerate(docs) if i in held]
        train_docs = [d for i, d in enumerate(docs) if i not in held]
    else:
        names = list(stories.NAMES)
        train_docs = stories.stories(seed, scale.n_stories)
        eval_docs = stories.stories(seed + 1, scale.n_eval)
    tokenizer = name_tokenizer(train_docs, scale.vocab_size)
    words = {w.lower() for doc in train_docs[:5000] for w in re.findall(r"[A-Za-z]+", doc)}
    pool = sorted(two_token_names(tokenizer, words))
    if len(pool) < 50:
        raise UserError(f"only {len(pool)} two-token names survive this tokenizer; too few")
    rng = random.Random(seed)
    # Every fifth name is kept for the held-out stories: a copied name was never seen in training.
    train_pool = [n for i, n in enumerate(pool) if i % 5]
    eval_pool = pool[::5]
    replaced = [replace_names(doc, names, train_pool, rng)[0] for doc in train_docs]
    evals = [replace_names(doc, names, eval_pool, rng) for doc in eval_docs]
    source = root / "corpus"
    source.mkdir(parents=True, exist_ok=True)
    (source / "stories.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in replaced))
    tokenizer.save(root / "tokenizer")
    data = prepare(
        PrepareConfig(
            source=str(source), tokenizer=str(root / "tokenizer"), out=str(root / "data"), val_fraction=0.01
        )
    )
    return Corpus(data, tokenizer, [e[0] for e in evals], [e[1] for e in evals], len(pool))


# ---- metric -------------------------------------------------------------------------------------------


@torch.no_grad()
def name_accuracy(model, corpus: Corpus, max_len: int, batch_size: int = 16) -> dict[str, float]:
    """Next-token-head greedy accuracy on second name tokens: repeated mentions, and first mentions."""
    tok = corpus.tokenizer
    device = next(model.parameters()).device
    model.eval()
    hits = {"repeated": [0, 0], "first": [0, 0]}
    for start in range(0, len(corpus.eval_docs), batch_size):
        rows, positions = [], []
        for doc, names in zip(
            corpus.eval_docs[start : start + batch_size],
            corpus.eval_names[start : start + batch_size],
            strict=True,
        ):
            ids = [tok.eos_id, *tok.encode(doc)][:max_len]
            rows.append(ids)
            positions.append(repeated_name_positions(ids, {name_ids(tok, n) for n in names}))
        width = max(len(r) for r in rows)
        tokens_BT = torch.full((len(rows), width), tok.eos_id, dtype=torch.long)
        for b, ids in enumerate(rows):
            tokens_BT[b, : len(ids)] = torch.tensor(ids)
        tokens_BT = tokens_BT.to(device)
        rope = model.rope_context(tokens_BT, None)
        logits_BTV = model.logits(model.head_forward(0, model.trunk_forward(tokens_BT, rope), rope))
        pred_BT = logits_BTV.argmax(-1).cpu()
        for b, (repeated, first) in enumerate(positions):
            for kind, ts in (("repeated", repeated), ("first", first)):
                hits[kind][0] += sum(int(pred_BT[b, t - 1] == rows[b][t]) for t in ts)
                hits[kind][1] += len(ts)
    return {
        "accuracy_repeated": hits["repeated"][0] / max(hits["repeated"][1], 1),
        "accuracy_first": hits["first"][0] / max(hits["first"][1], 1),
        "n_repeated": hits["repeated"][1],
        "n_first": hits["first"][1],
    }


# ---- the experiment -----------------------------------------------------------------------------------


def run_name(dim: int, n_future: int, seed_offset: int) -> str:
    """Run directory (and results key) of one model: dDIM-nN, with -sK for the K-th extra seed."""
    return f"d{dim}-n{n_future}" + (f"-s{seed_offset}" if seed_offset else "")


def planned_runs(preset: InductionScale) -> list[tuple[int, int, int]]:
    """(dim, n_future, seed offset) in training order: one seed of every width, widest first, then extra seeds.

    Widest first, so the run that shows whether the budget teaches copying at all finishes early; then
    the extra seeds of the two smallest widths, then those of the larger widths.
    """
    dims = sorted(preset.dims)
    first = [(dim, n, 0) for dim in reversed(dims) for n in N_FUTURE]
    small = [(dim, n, s) for s in range(1, preset.seeds) for dim in dims[:2] for n in N_FUTURE]
    rest = [(dim, n, s) for s in range(1, preset.seeds_rest) for dim in reversed(dims[2:]) for n in N_FUTURE]
    return first + small + rest


def train_run(
    root: Path,
    preset: InductionScale,
    data: Path,
    dim: int,
    n: int,
    seed: int,
    offset: int,
    device: str,
    progress: bool,
) -> Path:
    """Train (or resume, or reuse) model (dim, n, seed + offset) of the sweep into root/runs; its run directory."""
    n_heads = max(1, dim // 16)
    model = dict(dim=dim, n_layers=preset.n_layers, n_heads=n_heads, n_kv_heads=n_heads, n_future=n,
                 max_seq_len=max(preset.seq_len, 64))  # fmt: skip
    return preset.train(
        data=data,
        out=root / "runs" / run_name(dim, n, offset),
        model=model,
        seed=seed + offset,
        device=device,
        progress=progress,
        checkpoints=preset.checkpoints,
    )


def score_run(run_dir: Path, data: Corpus, seq_len: int, device: str) -> dict:
    """Name accuracy of every kept checkpoint; the final one, and the best (early stopping on the metric)."""
    by_step = {}
    for step, path in checkpoint_steps(run_dir):
        model = load_model(path, device)
        by_step[step] = name_accuracy(model, data, seq_len)
    final_step = max(by_step)
    best_step = max(by_step, key=lambda k: (by_step[k]["accuracy_repeated"], k))
    return {
        "params": model.num_params(),
        "params_non_embedding": model.num_params(exclude_embeddings=True),
        **by_step[final_step],
        "best_step": best_step,
        "best_accuracy_repeated": by_step[best_step]["accuracy_repeated"],
        "best_accuracy_first": by_step[best_step]["accuracy_first"],
        "accuracy_repeated_by_step": {k: v["accuracy_repeated"] for k, v in by_step.items()},
    }


@dataclass
class InductionOptions(StudyOptions):
    """Flags of `multitoken experiment induction`."""

    out: str = "reports/induction"
    """report directory; runs go under OUT/runs/dDIM-nN[-sK] and are reused when complete."""
    scale: str = "small"
    """debug (seconds), small (a CPU, ~30 min), cpu (one CPU core, ~1 hour, 2 seeds), medium or
    large (GPU)."""
    seed: int = 0
    """seed of the corpus and the names, and of the first model of each size (extra seeds add 1, 2..)."""
    corpus: str = ""
    """a story corpus (directory, file or glob) to use instead of the generated stories."""
    names: str = ""
    """file of the character names used in --corpus, one per line (required with --corpus)."""


def induction(options: InductionOptions) -> dict:
    """Induction on stories with random two-token names: accuracy vs model size for n = 1 and n = 2.

    Measures the next-token head's greedy accuracy on the second token of a name already mentioned in
    the same story (paper §4.1: n = 2 helps small models most). Every kept checkpoint is scored; the
    report gives the final and the best one (the paper stops early on the test metric).
    """
    scale, seed = options.scale, options.seed
    preset = pick_scale(scale, SCALES)
    device = resolve_device(options.device)
    root = Path(options.out)
    data = build_corpus(root, preset, seed, options.corpus, options.names)
    results: dict[str, dict] = {}
    for dim, n, offset in planned_runs(preset):
        name = run_name(dim, n, offset)
        run_dir = train_run(root, preset, data.data, dim, n, seed, offset, device, progress=scale != "debug")
        results[name] = {
            "dim": dim,
            "n_future": n,
            "seed": seed + offset,
            "val_loss": final_validation(run_dir)["val_loss"],
            **score_run(run_dir, data, preset.seq_len, device),
        }
        print(f"{name}: repeated-name accuracy {100 * results[name]['best_accuracy_repeated']:.1f}% (best)",
              flush=True)  # fmt: skip
    results = {k: results[k] for k in sorted(results, key=lambda k: (results[k]["dim"], results[k]["n_future"],
                                                                      results[k]["seed"]))}  # fmt: skip
    _write_report(root, scale, preset, data, results)
    return results


def summarize(results: dict[str, dict]) -> list[dict]:
    """Per (dim, n): mean and spread (min, max) over seeds of the best and final repeated-name accuracy."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in results.values():
        groups.setdefault((r["dim"], r["n_future"]), []).append(r)
    rows = []
    for (dim, n), rs in sorted(groups.items()):
        best = [r["best_accuracy_repeated"] for r in rs]
        final = [r["accuracy_repeated"] for r in rs]
        rows.append({
            "dim": dim, "n_future": n, "params": rs[0]["params"], "seeds": len(rs),
            "params_non_embedding": rs[0]["params_non_embedding"],
            "best_mean": sum(best) / len(best), "best_min": min(best), "best_max": max(best),
            "final_mean": sum(final) / len(final),
            "first_mean": sum(r["best_accuracy_first"] for r in rs) / len(rs),
        })  # fmt: skip
    return rows


def _write_report(root: Path, scale: str, preset: InductionScale, data: Corpus, results: dict) -> None:
    report = Report(
        root,
        title="Induction on stories with two-token names",
        question=(
            "Does training with n = 2 future tokens help small models copy a two-token name seen earlier "
            "in the same story, and does the gap close as the model grows (paper §4.1)?"
        ),
    )
    summary = summarize(results)
    fig, ax = report.figure()
    for n, color in zip(N_FUTURE, ("tab:blue", "tab:orange"), strict=True):
        rs = [r for r in summary if r["n_future"] == n]
        params = [r["params_non_embedding"] for r in rs]
        mean = [100 * r["best_mean"] for r in rs]
        spread = [[100 * (r["best_mean"] - r["best_min"]) for r in rs],
                  [100 * (r["best_max"] - r["best_mean"]) for r in rs]]  # fmt: skip
        ax.errorbar(params, mean, yerr=spread, marker="o", color=color, capsize=4,
                    label=f"n = {n}, repeated names (mean, min-max over seeds)")  # fmt: skip
        for r in results.values():
            if r["n_future"] == n:
                ax.plot(
                    r["params_non_embedding"], 100 * r["best_accuracy_repeated"], ".", color=color, alpha=0.5
                )
        ax.plot(params, [100 * r["first_mean"] for r in rs], ls=":", marker=".", color=color,
                label=f"n = {n}, first mentions (nothing to copy)")  # fmt: skip
    ax.set_ylim(-2, 102)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters (log scale)")
    ax.set_ylabel("accuracy on a name's second token (%)")
    ax.set_title(f"Induction, {scale} scale (best checkpoint of each run)")
    ax.legend(fontsize=8)
    report.save_figure(
        fig, "induction_accuracy.png", "Next-token accuracy on the second token of a name vs parameters"
    )
    header = ["dim", "params", "n", "val loss (nats)", "repeated-name acc (%)", "first-mention acc (%)",
              "seed", "best repeated acc (%)", "best step"]  # fmt: skip
    rows = [
        [r["dim"], r["params"], r["n_future"], r["val_loss"], 100 * r["accuracy_repeated"],
         100 * r["accuracy_first"], r["seed"], 100 * r["best_accuracy_repeated"], r["best_step"]]
        for r in results.values()
    ]  # fmt: skip
    report.add_table(
        header, rows, "Accuracy on the second token of a name (next-token head, greedy), per run"
    )
    summary_header = ["dim", "non-embedding params", "n", "seeds", "best repeated acc (%), mean",
                      "min-max (%)", "final repeated acc (%), mean", "first-mention acc (%)"]  # fmt: skip
    summary_rows = [
        [r["dim"], r["params_non_embedding"], r["n_future"], r["seeds"], 100 * r["best_mean"],
         f"{100 * r['best_min']:.1f}-{100 * r['best_max']:.1f}", 100 * r["final_mean"], 100 * r["first_mean"]]
        for r in summary
    ]  # fmt: skip
    report.add_table(summary_header, summary_rows, "Per size and n, over seeds")
    gaps = []
    for dim in preset.dims:
        one, two = (next(r for r in summary if r["dim"] == dim and r["n_future"] == n) for n in N_FUTURE)
        gaps.append(f"dim {dim}: {100 * one['best_mean']:.1f}% (n=1) vs {100 * two['best_mean']:.1f}% (n=2)")
    any_r = next(iter(results.values()))
    answer = (
        "Accuracy on the second token of repeated names (best checkpoint, mean over seeds): "
        + "; ".join(gaps)
        + f". Measured on {any_r['n_repeated']} repeated mentions in {len(data.eval_docs)} held-out stories."
    )
    report.write(
        answer,
        results,
        details={
            "scale": scale,
            "models": f"dims {list(preset.dims)}, {preset.n_layers} blocks, BPE vocab {data.tokenizer.vocab_size}",
            "training": f"{preset.max_steps} steps x {preset.batch_size} x {preset.seq_len} tokens, "
            f"{preset.checkpoints} checkpoints scored per run",
            "seeds": f"{preset.seeds} for the two smallest widths, {preset.seeds_rest} above",
            "names": f"{data.n_names} random two-token names (syllable + syllable); every fifth is held out "
            "for the evaluation stories",
        },
    )
    print_table("induction: accuracy on repeated names", summary_header, summary_rows)
