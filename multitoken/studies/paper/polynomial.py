"""`multitoken experiment polynomial`: polynomial arithmetic in F7[X]/(X^5) (paper §4.2).

Byte-level models with n = 1, 2 and 4 heads (same blocks, seed, data and steps) learn `expr=answer`
on expressions of 1-5 operations; greedy exact match is measured on fresh expressions of 1-10
operations, so 6-10 are out of distribution.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.data.shards import PrepareConfig, prepare
from multitoken.errors import UserError
from multitoken.generate import generate
from multitoken.studies.corpora import poly_ring
from multitoken.studies.report import Report
from multitoken.studies.runs import (
    ModelBudget,
    final_validation,
    pick_scale,
    print_table,
    resolve_device,
    train_variant,
)
from multitoken.tokenizer import byte_tokenizer

TRAIN_OPS = (1, 5)
"""Operation counts seen in training (inclusive)."""
TEST_OPS = (1, 10)
"""Operation counts tested (inclusive); above TRAIN_OPS[1] is out of distribution."""
N_FUTURE = (1, 2, 4)
"""Heads compared."""
LOSS_AFTER = {"all": "", "answers": "="}
"""--loss -> TrainConfig.loss_after: every target, or only those after the "=" of each problem."""


@dataclass(kw_only=True)
class PolynomialScale(ModelBudget):
    """Budget of one scale."""

    n_train: int
    """Training problems."""
    n_test: int
    """Test problems per operation count."""
    big_dim: int = 0
    """Width of an extra n=1 model with about 3x the parameters (0: none); the paper's "tripling model size"."""
    loss: str = "all"
    """Default targets of the loss: all (every byte) or answers (the answer after "=" and its end)."""
    encoding: str = "digits"
    """Default spelling of the coefficients (poly_ring.ENCODINGS): digits, or tagged with their degree."""


SCALES = {
    "debug": PolynomialScale(dim=32, n_layers=4, n_heads=2, max_steps=20, batch_size=8, seq_len=64,
                             n_train=1500, n_test=4, big_dim=64),
    "small": PolynomialScale(dim=128, n_layers=4, n_heads=4, max_steps=800, batch_size=32, seq_len=128,
                             n_train=100_000, n_test=100),
    "cpu": PolynomialScale(dim=128, n_layers=6, n_heads=4, max_steps=3000, batch_size=16, seq_len=128,
                           n_train=200_000, n_test=200, big_dim=224, loss="answers"),
    "medium": PolynomialScale(dim=384, n_layers=8, n_heads=6, max_steps=10_000, batch_size=64, seq_len=256,
                              n_train=1_000_000, n_test=500, lr=1e-3, big_dim=640),
    "large": PolynomialScale(dim=768, n_layers=12, n_heads=12, max_steps=30_000, batch_size=128,
                             seq_len=256, n_train=5_000_000, n_test=1000, lr=6e-4, big_dim=1344),
}  # fmt: skip


def make_problems(
    seed: int, n: int, ops: tuple[int, int], exclude: set[str] = frozenset(), encoding: str = "digits"
) -> list[str]:
    """`n` documents "expr=answer" with an operation count uniform in `ops`, skipping prompts in `exclude`;
    coefficients spelled in `encoding` (the same expressions whatever the encoding)."""
    rng = random.Random(seed)
    docs: list[str] = []
    while len(docs) < n:
        prompt, answer = poly_ring.problem_text(poly_ring.random_expr(rng, rng.randint(*ops)), encoding)
        if prompt not in exclude:
            docs.append(prompt + answer)
    return docs


def test_sets(
    seed: int, n_test: int, train_prompts: set[str], encoding: str = "digits"
) -> dict[int, list[str]]:
    """Per operation count, `n_test` documents whose prompt is not a training prompt."""
    return {
        k: make_problems(seed * 1000 + k, n_test, (k, k), train_prompts, encoding)
        for k in range(TEST_OPS[0], TEST_OPS[1] + 1)
    }


def write_corpus(directory: Path, docs: list[str]) -> Path:
    """One JSONL file of {"text": doc} lines, the source `prepare` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "problems.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return directory


@torch.no_grad()
def answer_scores(model, docs: list[str], batch_size: int = 64) -> dict[str, float]:
    """Greedy answers after "expr=": exact match (answer reproduced, then stop), and the fraction of the
    DEGREE coefficients right in place (a continuous measure; chance is 1/P each)."""
    tokenizer = byte_tokenizer()
    correct, digits = 0, 0
    for first in range(0, len(docs), batch_size):
        batch = docs[first : first + batch_size]
        prompts = [[tokenizer.eos_id, *tokenizer.encode(doc.split("=")[0] + "=")] for doc in batch]
        out = generate(model, prompts, poly_ring.DEGREE + 1, eos_id=tokenizer.eos_id, speculative=False)
        for doc, tokens, reason in zip(batch, out.tokens, out.finish_reasons, strict=True):
            answer, said = doc.split("=")[1], tokenizer.decode(tokens)
            correct += reason == "eos" and said == answer
            digits += sum(a == b for a, b in zip(answer, said, strict=False))
    n = max(len(docs), 1)
    return {"exact_match": correct / n, "coefficient_accuracy": digits / (n * poly_ring.DEGREE)}


def exact_match(model, docs: list[str], batch_size: int = 64) -> float:
    """Fraction of documents whose answer greedy decoding reproduces exactly after "expr=" (and stops)."""
    return answer_scores(model, docs, batch_size)["exact_match"]


def variants(preset: PolynomialScale) -> dict[str, tuple[int, dict]]:
    """Run name -> (n_future, ModelConfig fields): n = 1, 2, 4 at the preset's width, and n=1 at big_dim."""
    out = {f"n{n}": (n, preset.model_fields(n, max_seq_len=256)) for n in N_FUTURE}
    if preset.big_dim:
        heads = max(1, preset.big_dim // (preset.dim // preset.n_heads))
        big = preset.model_fields(1, max_seq_len=256) | dict(
            dim=preset.big_dim, n_heads=heads, n_kv_heads=heads
        )
        out["n1-3x"] = (1, big)
    return out


@dataclass
class PolynomialOptions:
    """Flags of `multitoken experiment polynomial`."""

    out: str = "reports/polynomial"
    """Report directory; training runs go under OUT/runs/nN and are reused when complete."""
    scale: str = "small"
    """debug (seconds), small (a CPU, ~30 min), cpu (one CPU core, ~1 hour, answer-only loss, with the
    3x n=1 model), medium or large (GPU; these add an n=1 model with about 3x the parameters)."""
    seed: int = 0
    """Seed of the data and of every model's initialisation."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    loss: str = "scale"
    """Which targets train every head: all (every byte, a plain language-model loss), answers (only the
    answer after "=" and its end), or scale (the scale's choice: answers at cpu, all elsewhere)."""
    encoding: str = "scale"
    """How coefficients are spelled: digits ("30100" is 3 + x^2), tagged (one character per degree and
    value, "3aipA", so equal degrees match by content), or scale (digits at every scale)."""
    max_steps: int = 0
    """Training steps of every model (0: the scale's), e.g. a longer budget at a scale's model sizes."""
    n_train: int = 0
    """Training problems (0: the scale's); more steps want more problems, so that none repeats."""

    def __post_init__(self) -> None:
        if self.max_steps < 0 or self.n_train < 0:
            raise UserError("--max-steps and --n-train take a positive count, or 0 for the scale's")
        if self.loss not in ("scale", *LOSS_AFTER):
            raise UserError(f"unknown loss {self.loss!r}; choose one of scale, {', '.join(LOSS_AFTER)}")
        if self.encoding not in ("scale", *poly_ring.ENCODINGS):
            raise UserError(
                f"unknown encoding {self.encoding!r}; choose one of scale, {', '.join(poly_ring.ENCODINGS)}"
            )


def polynomial(options: PolynomialOptions) -> dict:
    """Polynomial arithmetic in F7[X]/(X^5): exact match vs number of operations for n = 1, 2, 4 heads.

    Trains on expressions of 1-5 operations (negation, addition, multiplication, composition) and tests
    greedy exact match on 1-10, so 6-10 measure out-of-distribution generalisation (paper §4.2).
    """
    out, scale, seed, device = options.out, options.scale, options.seed, options.device
    preset = pick_scale(scale, SCALES)
    overrides = {"max_steps": options.max_steps, "n_train": options.n_train}
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v})
    loss = preset.loss if options.loss == "scale" else options.loss
    encoding = preset.encoding if options.encoding == "scale" else options.encoding
    device = resolve_device(device)
    root = Path(out)
    train_docs = make_problems(seed, preset.n_train, TRAIN_OPS, encoding=encoding)
    data = prepare(
        PrepareConfig(
            source=str(write_corpus(root / "corpus", train_docs)),
            tokenizer="byte",
            out=str(root / "data"),
            val_fraction=0.01,
            seed=seed,
        )
    )
    tests = test_sets(seed + 1, preset.n_test, {doc.split("=")[0] + "=" for doc in train_docs}, encoding)
    results: dict[str, dict] = {}
    for name, (n, fields) in variants(preset).items():
        run_dir = train_variant(
            dataclasses.replace(
                preset.train_config(
                    data=data,
                    out=root / "runs" / name,
                    model=fields,
                    seed=seed,
                    device=device,
                    progress=scale != "debug",
                ),
                loss_after=LOSS_AFTER[loss],
            )
        )
        model = load_model(run_dir, device)
        scores = {k: answer_scores(model, docs) for k, docs in tests.items()}
        per_ops = {k: v["exact_match"] for k, v in scores.items()}
        coeffs = {k: v["coefficient_accuracy"] for k, v in scores.items()}
        in_dist = [k for k in per_ops if k <= TRAIN_OPS[1]]
        ood = [k for k in per_ops if k > TRAIN_OPS[1]]
        results[name] = {
            "n_future": n,
            "dim": fields["dim"],
            "params": model.num_params(),
            "val_loss": final_validation(run_dir)["val_loss"],
            "exact_match_by_ops": per_ops,
            "exact_match_in_distribution": sum(per_ops[k] for k in in_dist) / len(in_dist),
            "exact_match_out_of_distribution": sum(per_ops[k] for k in ood) / len(ood),
            "coefficient_accuracy_by_ops": coeffs,
            "coefficient_accuracy_in_distribution": sum(coeffs[k] for k in in_dist) / len(in_dist),
            "coefficient_accuracy_out_of_distribution": sum(coeffs[k] for k in ood) / len(ood),
        }
        print(f"{name}: exact match {100 * results[name]['exact_match_in_distribution']:.1f}% in distribution",
              flush=True)  # fmt: skip
    _write_report(root, scale, preset, results, loss, encoding)
    return results


def _write_report(
    root: Path, scale: str, preset: PolynomialScale, results: dict[str, dict], loss: str, encoding: str
) -> None:
    report = Report(
        root,
        title="Polynomial arithmetic in F7[X]/(X^5)",
        question=(
            "Does predicting n = 2 or 4 future tokens improve greedy exact match on polynomial arithmetic, "
            "in distribution (1-5 operations) and out of distribution (6-10), at the same model size?"
        ),
    )
    fig, ax = report.figure()
    for name, r in results.items():
        ops = sorted(int(k) for k in r["exact_match_by_ops"])
        label = f"n = {r['n_future']}" + (f", {r['params']:,} params" if name.endswith("3x") else "")
        ax.plot(ops, [100 * r["exact_match_by_ops"][k] for k in ops], marker="o", label=label,
                ls="--" if name.endswith("3x") else "-")  # fmt: skip
    ax.axvspan(TRAIN_OPS[1] + 0.5, TEST_OPS[1] + 0.5, color="0.9", label="out of distribution")
    ax.set_xlabel("number of operations in the expression")
    ax.set_ylabel("greedy exact match (%)")
    ax.set_xticks(range(TEST_OPS[0], TEST_OPS[1] + 1))
    ax.set_ylim(-2, 102)
    ax.set_title(f"Polynomial arithmetic, {scale} scale ({preset.dim}-wide, {preset.n_layers} blocks)")
    ax.legend()
    report.save_figure(
        fig, "exact_match.png", "Greedy exact match by number of operations, per number of heads n"
    )
    header = ["n", "params", "val loss (nats)", "exact match 1-5 ops (%)", "exact match 6-10 ops (%)",
              "coefficients right 1-5 ops (%)", "coefficients right 6-10 ops (%)"]  # fmt: skip
    rows = [
        [r["n_future"], r["params"], r["val_loss"], 100 * r["exact_match_in_distribution"],
         100 * r["exact_match_out_of_distribution"], 100 * r.get("coefficient_accuracy_in_distribution", 0),
         100 * r.get("coefficient_accuracy_out_of_distribution", 0)]
        for r in results.values()
    ]  # fmt: skip
    report.add_table(header, rows, "Exact match in and out of distribution")
    base = results["n1"]
    parts = []
    for name, r in list(results.items())[1:]:
        parts.append(
            f"n={r['n_future']}{' at ' + format(r['params'], ',') + ' params' if name.endswith('3x') else ''}: {100 * r['exact_match_in_distribution']:.1f}% in distribution and "
            f"{100 * r['exact_match_out_of_distribution']:.1f}% out of distribution"
        )
    answer = (
        f"n=1 reaches {100 * base['exact_match_in_distribution']:.1f}% exact match on 1-5 operations and "
        f"{100 * base['exact_match_out_of_distribution']:.1f}% on 6-10; " + "; ".join(parts) + ". "
        f"({preset.n_test} test problems per operation count; the paper reports MTP helping more than "
        "tripling the model size.)"
    )
    details = {
        "scale": scale,
        "model": f"dim {preset.dim}, {preset.n_layers} blocks, {preset.n_heads} heads, byte tokens",
        "training": f"{preset.max_steps} steps x {preset.batch_size} x {preset.seq_len} tokens, "
        f"{preset.n_train} problems of {TRAIN_OPS[0]}-{TRAIN_OPS[1]} operations",
    }
    if loss != "all":  # the plain runs' details stay as they were (tests/pins)
        details["loss"] = "every head on the answer after '=' (and its end) only"
    if encoding != "digits":
        details["encoding"] = (
            f"{encoding} coefficients ({poly_ring.to_text(poly_ring.poly(3, 0, 1), encoding)} is 3 + x^2)"
        )
    report.write(answer, results, details=details)
    print_table("polynomial: exact match", header, rows)
