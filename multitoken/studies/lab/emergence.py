"""`multitoken lab emergence`: abilities emerge, or do they? (Wei et al. 2022; Schaeffer et al. 2023)

Byte-level models of several sizes, each with n = 1 and n = 2 heads (parameter-matched), learn d-digit
addition in the direct format (`95+17=112`, the answer's d or d + 1 digit tokens then EOS) with the same
seed, data and token budget, keeping every checkpoint. At every checkpoint (and the re-created
initialisation), on a fixed held-out test set, four metrics of the answer (`emergence_metrics`):
exact match (all or nothing), answer log-prob, per-token accuracy and token edit distance. The report sets
them side by side against training step and against model size, with each metric's random baseline
and the resolution of the test set, and measures how much of the continuous metrics' gain was made
before and during the steepest rise of exact match.

Scales: debug (seconds; tests), small (about 15 minutes on a 2-core CPU), medium (meant for a GPU;
untested beyond constructing its configs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from multitoken.studies import runs as study
from multitoken.studies.corpora.arithmetic import (
    completion,
    held_out_pairs,
    prepare_format,
    prompt,
    train_pairs,
)
from multitoken.studies.lab import emergence_metrics as em
from multitoken.studies.report import Report
from multitoken.studies.runs import ModelBudget, pick_scale, print_table, resolve_device
from multitoken.tokenizer import byte_tokenizer

N_FUTURE = (1, 2)
"""Heads compared at every size."""
QUESTION = "Do abilities emerge suddenly, or does a discontinuous metric make smooth progress look sudden?"
"""What the report answers."""
METRICS = {
    "exact_match": ("exact match (%)", "exact match (discontinuous)"),
    "answer_logprob": ("-log p(answer + EOS) (nats, log scale)", "answer log-prob (continuous)"),
    "token_accuracy": ("per-token accuracy (%)", "per-token accuracy (continuous)"),
    "edit_distance": ("token edit distance (tokens)", "edit distance (continuous)"),
}
"""The metrics plotted, discontinuous first: (axis label, panel title) of each."""
PERCENT = {"exact_match", "token_accuracy"}
"""Metrics shown in percent."""
CLOSE_TO_POWER = 0.9
"""R^2 of exact match against accuracy^L from which the report calls exact match a power of accuracy."""


@dataclass(kw_only=True)
class EmergenceScale:
    """Task, model sizes and the training budget every model shares."""

    digits: int
    """Digits of each operand (trained and tested)."""
    sizes: tuple[tuple[int, int, int], ...]
    """Model sizes as (width, blocks, attention heads), smallest first."""
    max_steps: int
    """Optimizer steps per model."""
    batch_size: int
    """Sequences per step."""
    seq_len: int
    """Tokens per training window."""
    lr: float
    """Peak learning rate."""
    checkpoints: int
    """Checkpoints kept per model, evenly spaced (plus the initialisation, re-created from the seed)."""
    n_train: int
    """Training problems (repeats allowed, none from the test set)."""
    n_test: int
    """Held-out test problems (the resolution of exact match is 1/n_test)."""

    def budgets(self) -> list[ModelBudget]:
        """One ModelBudget per size, all with this scale's training budget."""
        return [
            ModelBudget(dim=dim, n_layers=blocks, n_heads=heads, max_steps=self.max_steps,
                        batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr)
            for dim, blocks, heads in self.sizes
        ]  # fmt: skip


SCALES = {
    "debug": EmergenceScale(digits=2, sizes=((16, 2, 2), (32, 2, 2)), max_steps=8, batch_size=4, seq_len=64,
                            lr=3e-3, checkpoints=4, n_train=400, n_test=8),
    "small": EmergenceScale(digits=2, sizes=((32, 2, 2), (64, 3, 4), (128, 4, 4)), max_steps=800,
                            batch_size=16, seq_len=128, lr=3e-3, checkpoints=16, n_train=100_000, n_test=200),
    "medium": EmergenceScale(digits=3, sizes=((64, 2, 4), (128, 4, 4), (256, 6, 8), (512, 8, 8)),
                             max_steps=3000, batch_size=64, seq_len=256, lr=2e-3, checkpoints=20,
                             n_train=1_000_000, n_test=1000),
}  # fmt: skip
"""debug: seconds (tests); small: about 15 minutes on a 2-core CPU for all six models; medium: a GPU
(untested beyond construction)."""


# ---- problems, training, scoring ------------------------------------------------------------------


def addition_problems(pairs: list[tuple[int, int]]) -> list[em.Problem]:
    """Prompt `a+b=` (after EOS, as in the training stream) and the direct answer, as byte tokens."""
    tokenizer = byte_tokenizer()
    return [
        em.Problem(
            [tokenizer.eos_id, *tokenizer.encode(prompt(a, b))], tokenizer.encode(completion("direct", a, b))
        )
        for a, b in pairs
    ]


def model_name(budget: ModelBudget, n: int) -> str:
    """Run name and plot label of one model, e.g. `d64-L3-n2`."""
    return f"d{budget.dim}-L{budget.n_layers}-n{n}"


def train_one(
    root: Path, data: Path, budget: ModelBudget, n: int, preset: EmergenceScale, seed: int, device: str,
    progress: bool,
) -> Path:  # fmt: skip
    """Train (or resume, or reuse) one model with every checkpoint kept; returns its run directory."""
    return budget.train(
        data=data,
        out=root / "runs" / model_name(budget, n),
        model=budget.model_fields(n, max_seq_len=preset.seq_len),
        seed=seed,
        device=device,
        progress=progress,
        checkpoints=preset.checkpoints,
    )


def score_run(run_dir: Path, problems: list[em.Problem], device: str) -> dict[str, Any]:
    """Every metric at every checkpoint of a run (step 0: the initialisation re-created from its seed)."""
    run = study.read_run(run_dir)
    curves: dict[str, Any] = {"step": []}
    for step, path in run.checkpoints:
        model = study.load_run_model(run, path, study.pick_device(device)).eval()
        scores = em.score_problems(model, problems, eos_id=byte_tokenizer().eos_id)
        curves["step"].append(step)
        for name, value in scores.items():
            curves.setdefault(name, []).append(value)
    return {"params": model.num_params(), "curves": curves}  # the last model loaded: the final checkpoint


def run_emergence(out: str, scale: str, seed: int, device: str, command: list[str]) -> dict[str, Any]:
    """Prepare the data, train every size with n = 1 and 2, score every checkpoint, write the report."""
    preset = pick_scale(scale, SCALES)
    device = resolve_device(device)
    root = Path(out)
    test_pairs = held_out_pairs(seed + 1, (preset.digits, preset.digits), preset.n_test)[preset.digits]
    pairs = train_pairs(seed, (preset.digits, preset.digits), preset.n_train, set(test_pairs))
    data = prepare_format(root, "direct", pairs, seed)
    problems = addition_problems(test_pairs)
    answers = [completion("direct", a, b) for a, b in test_pairs]
    baselines = em.random_baselines(answers, seed=seed)
    resolution = em.resolution(answers)
    threshold = em.floor_threshold(baselines["exact_match"], resolution["exact_match"])
    models: dict[str, Any] = {}
    for budget in preset.budgets():
        for n in N_FUTURE:
            run_dir = train_one(root, data, budget, n, preset, seed, device, scale != "debug")
            scored = score_run(run_dir, problems, device)
            models[model_name(budget, n)] = {
                "dim": budget.dim,
                "n_layers": budget.n_layers,
                "n_heads": budget.n_heads,
                "n_future": n,
                **scored,
                "final": em.summarise(scored["curves"], threshold, baselines),
            }
    results = {
        "models": models,
        "baselines": baselines,
        "resolution": resolution,
        "floor_threshold": threshold,
        "n_test": len(problems),
        "mean_answer_digits": em.mean([len(a) for a in answers]),
        "tokens_per_step": preset.batch_size * preset.seq_len,
    }
    write_report(root, scale, preset, results, command)
    return results


# ---- answer paragraph -----------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _share(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def answer_text(results: dict[str, Any]) -> str:
    """The answer paragraph, computed from this run's numbers."""
    models, base, n_test = results["models"], results["baselines"], results["n_test"]
    floor = (
        f"{_pct(results['floor_threshold'])}, {em.FLOOR_FACTOR:g}x the larger of chance "
        f"({_pct(base['exact_match'])}) and the test set's resolution (1/{n_test})"
    )
    best = max(models, key=lambda k: (models[k]["final"]["exact_match"], models[k]["params"]))
    jumped = [k for k in models if models[k]["final"]["jump_step"] is not None]
    if not jumped:
        biggest = max(models, key=lambda k: (models[k]["params"], -models[k]["n_future"]))
        c = models[biggest]["curves"]
        parts = [
            f"Nothing jumps at this scale: no model's exact match reached the floor of {floor}; the best final "
            f"exact match is {_pct(models[best]['final']['exact_match'])} ({best}). The continuous metrics "
            f"of the largest model ({biggest}) did move: per-token accuracy {_pct(c['token_accuracy'][0])} -> "
            f"{_pct(c['token_accuracy'][-1])} (random guess {_pct(base['token_accuracy'])}), answer log-prob "
            f"{c['answer_logprob'][0]:.2f} -> {c['answer_logprob'][-1]:.2f} nats (random guess "
            f"{base['answer_logprob']:.2f}), edit distance {c['edit_distance'][0]:.2f} -> "
            f"{c['edit_distance'][-1]:.2f} tokens."
        ]
    else:
        parts = [
            _jump_text(best, models[best], results, floor),
            f"{len(jumped)} of {len(models)} models left the floor.",
        ]
    parts.append(_across_sizes(models))
    parts.append(_n_comparison(models))
    parts.append(
        f"One seed and {n_test} test problems: one problem is {_pct(1 / n_test)} of exact match, so "
        "differences of a few problems are noise."
    )
    return " ".join(parts)


def _jump_text(name: str, m: dict[str, Any], results: dict[str, Any], floor: str) -> str:
    """Where the best model's exact match jumped, and what the continuous metrics had done by then."""
    c, f, base = m["curves"], m["final"], results["baselines"]
    a, b = c["step"].index(f["jump_from_step"]), c["step"].index(f["jump_step"])
    inside, before = f["share_in_jump"], f["share_before_jump"]
    text = (
        f"The best model, {name}, left the exact-match floor ({floor}) at step {f['floor_step']}; its steepest "
        f"rise came between steps {f['jump_from_step']} and {f['jump_step']} ({_pct(c['exact_match'][a])} -> "
        f"{_pct(c['exact_match'][b])}, {_share(inside['exact_match'])} of its whole gain over chance), and it "
        f"ended at {_pct(f['exact_match'])}. In that interval per-token accuracy made "
        f"{_share(inside['token_accuracy'])} of its gain over a random guess, answer log-prob "
        f"{_share(inside['answer_logprob'])} and edit distance {_share(inside['edit_distance'])}; by step "
        f"{f['jump_from_step']} they had already made {_share(before['token_accuracy'])} "
        f"(accuracy {_pct(base['token_accuracy'])} guess -> {_pct(c['token_accuracy'][a])} -> "
        f"{_pct(f['token_accuracy'])}), {_share(before['answer_logprob'])} (log-prob "
        f"{base['answer_logprob']:.2f} guess -> {c['answer_logprob'][a]:.2f} -> {f['answer_logprob']:.2f} nats) "
        f"and {_share(before['edit_distance'])}."
    )
    continuous = max(inside[k] for k in ("token_accuracy", "answer_logprob", "edit_distance"))
    if inside["exact_match"] >= 2 * continuous:
        text += (
            " Exact match moved at least twice as abruptly as any continuous metric: much of this jump is "
            "the all-or-nothing metric, as Schaeffer et al. argue."
        )
    elif inside["exact_match"] >= 1.25 * continuous:
        text += (
            " Exact match moved more abruptly than the continuous metrics, but they rose steeply in the same "
            "interval too: the predictions did change quickly, and the all-or-nothing metric sharpens it."
        )
    else:
        text += (
            " The continuous metrics rose about as abruptly as exact match in that interval, so here the "
            "jump is in the model's predictions, not only in the metric."
        )
    digits = results["mean_answer_digits"]
    pairs = [
        (e, a**digits)
        for model in results["models"].values()
        for e, a in zip(model["curves"]["exact_match"], model["curves"]["token_accuracy"], strict=True)
    ]
    r2 = em.r_squared([e for e, _ in pairs], [p for _, p in pairs])
    gap = em.mean([abs(e - p) for e, p in pairs])
    return text + (
        f" Across every checkpoint of every model, accuracy^{digits:.2f} (independent digit errors, the mean "
        f"answer length as exponent) explains R^2 = {r2:.2f} of the variance of exact match (mean gap "
        f"{100 * gap:.1f} points): "
        + ("exact match is close to a steep function of per-token accuracy." if r2 >= CLOSE_TO_POWER else
           "exact match is not simply a power of per-token accuracy here.")
    )  # fmt: skip


def _across_sizes(models: dict[str, Any]) -> str:
    """Final exact match and per-token accuracy against size, per n."""
    lines = []
    for n in N_FUTURE:
        mine = sorted((k for k in models if models[k]["n_future"] == n), key=lambda k: models[k]["params"])
        exact = ", ".join(_pct(models[k]["final"]["exact_match"]) for k in mine)
        token = ", ".join(_pct(models[k]["final"]["token_accuracy"]) for k in mine)
        lines.append(f"n={n}: exact match {exact}, per-token accuracy {token}")
    return "Across sizes (smallest to largest) at the last checkpoint, " + "; ".join(lines) + "."


def _n_comparison(models: dict[str, Any]) -> str:
    """n = 2 against n = 1 at each size: final exact match and log-prob, and where exact match jumped."""
    pairs = []
    for name, one in models.items():
        two = models.get(name.removesuffix("n1") + "n2")
        if one["n_future"] != 1 or two is None:
            continue
        jumps = ["-" if x["final"]["jump_step"] is None else x["final"]["jump_step"] for x in (two, one)]
        pairs.append(
            f"{name.removesuffix('-n1')} {_pct(two['final']['exact_match'])} vs {_pct(one['final']['exact_match'])} "
            f"(log-prob {two['final']['answer_logprob']:.2f} vs {one['final']['answer_logprob']:.2f}"
            + ("" if jumps == ["-", "-"] else f", steepest rise ending at step {jumps[0]} vs {jumps[1]}")
            + ")"
        )
    return "n=2 against n=1 (final exact match): " + "; ".join(pairs) + "."


# ---- report ---------------------------------------------------------------------------------------


def _scaled(name: str, values: list[float]) -> list[float]:
    """Values as plotted: percent for rates, the answer's negative log-prob (log axis), others as they are."""
    if name in PERCENT:
        return [100 * v for v in values]
    return [-v for v in values] if name == "answer_logprob" else list(values)


def _finish_panel(ax, name: str, results: dict[str, Any], xlabel: str) -> None:
    """Axes, title and the reference lines: random guess, and for exact match the resolution and floor."""
    lines = [(results["baselines"][name], "random guess", ":")]
    if name == "exact_match":
        lines += [
            (results["resolution"]["exact_match"], f"resolution 1/{results['n_test']}", "-."),
            (results["floor_threshold"], "floor (5x max of the two)", "--"),
        ]
    handles = []
    for value, label, style in lines:
        y = _scaled(name, [value])[0]
        handles.append(ax.axhline(y, color="grey", linestyle=style, linewidth=1, label=f"{label}: {y:.3g}"))
    # Lower left is free in the edit-distance panel, whose upper right holds the models' legend.
    ax.add_artist(
        ax.legend(handles=handles, fontsize=7, loc="lower left" if name == "edit_distance" else "best")
    )
    if name == "answer_logprob":
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ylabel, title = METRICS[name]
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def _style(models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Plot style of each model: a colour per size, solid for n = 1 and dashed for n = 2."""
    import matplotlib

    sizes = sorted({(m["dim"], m["n_layers"]) for m in models.values()})
    palette = matplotlib.colormaps["viridis"]
    colour = {s: palette(0.85 * i / max(len(sizes) - 1, 1)) for i, s in enumerate(sizes)}
    return {
        k: {"color": colour[(m["dim"], m["n_layers"])], "linestyle": "-" if m["n_future"] == 1 else "--"}
        for k, m in models.items()
    }


def plot_steps(report: Report, results: dict[str, Any], scale: str) -> None:
    """The four metrics against training step, one line per model; a star where exact match jumped."""
    fig, axes = report.figure(1, len(METRICS), width=4.6, height=4.4)
    styles = _style(results["models"])
    for ax, name in zip(axes[0], METRICS, strict=True):
        handles = []
        for label, m in results["models"].items():
            c, jump = m["curves"], m["final"]["jump_step"]
            handles += ax.plot(
                c["step"],
                _scaled(name, c[name]),
                marker=".",
                label=f"{label} ({m['params']:,})",
                **styles[label],
            )
            if jump is not None:
                y = _scaled(name, [c[name][c["step"].index(jump)]])[0]
                ax.plot(
                    [jump], [y], marker="*", markersize=11, color=styles[label]["color"], linestyle="none"
                )
        _finish_panel(ax, name, results, f"training step ({results['tokens_per_step']:,} tokens each)")
    axes[0][-1].legend(
        handles=handles, fontsize=7, title="model (parameters)", title_fontsize=7, loc="upper right"
    )
    fig.suptitle(f"Emergence over training, {scale} scale: * = end of the steepest rise of exact match")
    report.save_figure(
        fig, "emergence_steps.png",
        "Held-out metrics at every checkpoint; colour = size, n = 1 solid, n = 2 dashed; grey = random "
        "guess (and for exact match the test set's resolution and the floor)",
    )  # fmt: skip


def plot_params(report: Report, results: dict[str, Any], scale: str) -> None:
    """The four metrics at the last checkpoint against parameters (log scale), one line per n."""
    fig, axes = report.figure(1, len(METRICS), width=4.6, height=4.4)
    models = results["models"]
    for ax, name in zip(axes[0], METRICS, strict=True):
        handles = []
        for n in N_FUTURE:
            mine = sorted((m for m in models.values() if m["n_future"] == n), key=lambda m: m["params"])
            handles += ax.plot([m["params"] for m in mine], _scaled(name, [m["final"][name] for m in mine]), marker="o",
                    linestyle="-" if n == 1 else "--", label=f"n = {n}")  # fmt: skip
        ax.set_xscale("log")
        _finish_panel(ax, name, results, "parameters (log scale)")
    axes[0][-1].legend(handles=handles, fontsize=8, loc="upper right")
    fig.suptitle(f"Emergence with scale, {scale} scale: metrics at the last checkpoint")
    report.save_figure(fig, "emergence_params.png", "Held-out metrics of the final models against size")


def plot_exact_vs_token(report: Report, results: dict[str, Any]) -> None:
    """Exact match against per-token accuracy at every checkpoint, with the independent-errors curve p^L."""
    fig, ax = report.figure(width=6, height=4.5)
    styles = _style(results["models"])
    for label, m in results["models"].items():
        c = m["curves"]
        ax.plot(_scaled("token_accuracy", c["token_accuracy"]), _scaled("exact_match", c["exact_match"]),
                marker=".", label=label, **styles[label])  # fmt: skip
    digits = results["mean_answer_digits"]
    grid = [i / 100 for i in range(101)]
    ax.plot([100 * p for p in grid], [100 * p**digits for p in grid], color="black", linewidth=1,
            label=f"accuracy^{digits:.2f} (independent digit errors)")  # fmt: skip
    ax.set_xlabel("per-token accuracy (%)")
    ax.set_ylabel("exact match (%)")
    ax.set_title("Exact match as a function of per-token accuracy")
    ax.legend(fontsize=7)
    report.save_figure(
        fig, "exact_vs_token.png",
        "Exact match against per-token accuracy at every checkpoint of every model, and accuracy^L "
        "(L: mean answer digits), what independent digit errors would give",
    )  # fmt: skip


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and one row per model: final metrics, where exact match left the floor and jumped."""
    header = ["model", "params", "n", "exact match (%)", "answer log-prob (nats)", "per-token acc (%)",
              "edit distance (tokens)", "left floor at step", "steepest rise (steps)",
              "acc gain over guess before it (%)"]  # fmt: skip
    rows = []
    for m in sorted(results["models"].values(), key=lambda m: (m["params"], m["n_future"])):
        f = m["final"]
        before = f["share_before_jump"].get("token_accuracy", math.nan)
        rows.append([
            f"d{m['dim']} x {m['n_layers']} blocks", f"{m['params']:,}", m["n_future"], 100 * f["exact_match"],
            f["answer_logprob"], 100 * f["token_accuracy"], f["edit_distance"],
            "-" if f["floor_step"] is None else f["floor_step"],
            "-" if f["jump_step"] is None else f"{f['jump_from_step']}-{f['jump_step']}",
            "-" if math.isnan(before) else 100 * before,
        ])  # fmt: skip
    return header, rows


def write_report(
    root: Path, scale: str, preset: EmergenceScale, results: dict[str, Any], command: list[str]
) -> Path:
    """report.md, three PNGs and results.json under `root`; the table on stdout."""
    report = Report(root, title="Emergence: exact match against continuous metrics", question=QUESTION)
    plot_steps(report, results, scale)
    plot_params(report, results, scale)
    plot_exact_vs_token(report, results)
    header, rows = table(results)
    report.add_table(
        header, rows, "Held-out metrics at the last checkpoint; the step where exact match left its floor"
    )
    base, res = results["baselines"], results["resolution"]
    path = report.write(
        answer_text(results),
        results,
        command=command,
        details={
            "scale": scale,
            "task": f"{preset.digits}-digit + {preset.digits}-digit addition, direct format `95+17=112`, byte "
            f"tokens; {preset.n_train:,} training problems, {results['n_test']} held-out test problems "
            f"(answers of {results['mean_answer_digits']:.2f} digits on average, then EOS)",
            "models": ", ".join(f"{k}: {m['params']:,} parameters" for k, m in results["models"].items())
            + " (dN-LB-nK: width N, B blocks in all, K heads; n = 2 is parameter-matched)",
            "training": f"{preset.max_steps} steps x {preset.batch_size} x {preset.seq_len} tokens, lr {preset.lr}, "
            f"same seed and data order for every model; {preset.checkpoints} checkpoints kept, step 0 "
            "re-created from the seed",
            "metrics": "exact match: greedy answer ends with EOS and equals the truth; answer log-prob: "
            "teacher-forced sum of log p over the answer tokens and EOS (next-token head); per-token "
            "accuracy: teacher-forced top-1 on the answer digits; edit distance: Levenshtein distance "
            "between greedy answer (up to 2 tokens past the true length) and truth, in tokens",
            "random baselines": f"a guesser that knows the answer length and writes uniform random digits: "
            f"exact match mean 10^-L = {_pct(base['exact_match'])}, per-token accuracy 1/10, log-prob "
            f"-(L+1) ln 11 = {base['answer_logprob']:.2f} nats (uniform over 10 digits and EOS), edit distance "
            f"{base['edit_distance']:.2f} tokens (Monte Carlo, 200 seeded strings per answer)",
            "resolution": f"exact match 1/{results['n_test']} = {_pct(res['exact_match'])}; per-token accuracy "
            f"1/{round(1 / res['token_accuracy'])} digits = {100 * res['token_accuracy']:.2g}%",
            "jump": f"exact match has left the floor at the first checkpoint where it reaches "
            f"{_pct(results['floor_threshold'])} ({em.FLOOR_FACTOR:g}x max(random, resolution)); after that, "
            "its jump is the interval between checkpoints where it rises most; shares of gain are measured "
            "from each metric's random guess to its last value",
            "seed": "problems, initialisation and data order from --seed",
        },
    )
    print_table("emergence: final metrics", header, rows)
    return path


@dataclass
class EmergenceOptions(study.StudyOptions):
    """Flags of `multitoken lab emergence`."""

    out: str = "reports/lab/emergence"
    scale: Literal["debug", "small", "medium"] = "small"
    """debug (seconds), small (about 15 minutes on a 2-core CPU) or medium (a GPU)."""
    seed: int = 0
    """seed of the problems and of every model's initialisation and data order."""


def emergence_cli(options: EmergenceOptions) -> None:
    """Abilities emerge, or do they? Exact match against continuous metrics over training and size.

    Trains byte-level models of several sizes, n=1 and n=2 each, on multi-digit addition (95+17=112),
    keeps every checkpoint, and scores held-out sums by exact match, answer log-prob, per-token
    accuracy and token edit distance, with random baselines and the test set's resolution
    (Schaeffer et al. 2023, "Are emergent abilities of large language models a mirage?").
    """
    command = study.options_command(("lab", "emergence"), options)
    run_emergence(options.out, options.scale, options.seed, options.device, command)
    print(f"wrote {Path(options.out) / 'report.md'}")
