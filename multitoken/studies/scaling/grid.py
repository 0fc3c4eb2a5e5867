"""`multitoken lab scaling run`: GPT-4's "predictable scaling" in small.

Trains a grid of small byte-level models on Python source (widths x token budgets), fits Chinchilla's
L(N, D) = E + A/N^alpha + B/D^beta and the compute law L(C) = a C^b + c to every run except the largest
(largest N and largest D, so the largest compute), writes the prediction for that run to
prediction.json, and only then trains it and reports how far off each law was. The whole grid runs for
n_future = 1 and 4 (parameter-matched heads, same seed, data order and budgets), each with its own fits
and prediction, on the same metric: the next-token (head 0) validation loss.

N is the non-embedding parameter count (blocks and norms; the token embedding and the unembedding left
out, as Kaplan et al. count), D = steps x batch x seq_len training tokens, C = 6 N D.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitoken.checkpoint import find_latest
from multitoken.config import ModelConfig
from multitoken.data.shards import PrepareConfig, prepare, read_meta
from multitoken.errors import UserError
from multitoken.model import MultiTokenLM
from multitoken.studies import runs as study
from multitoken.studies.report import Report
from multitoken.studies.runs import (
    ModelBudget,
    final_validation,
    pick_scale,
    print_table,
    resolve_device,
    train_variant,
)
from multitoken.studies.scaling.fit import ChinchillaFit, ComputeFit, fit_chinchilla, fit_compute
from multitoken.studies.scaling.from_csv import lower_envelope
from multitoken.train import TrainConfig

QUESTION = "Can a small model's final loss be predicted before it is trained, from smaller runs?"
"""What the report answers."""
N_FUTURE = (1, 4)
"""Heads compared: next-token prediction and the paper's n = 4."""
PREDICTION = "prediction.json"
"""The sealed prediction, written before the held-out runs are trained."""
RUNS_CSV = "runs.csv"
"""One row per run, readable by `multitoken lab scaling fit`."""
RUNS_COLUMNS = ("n_future", "dim", "n_layers", "steps", "params", "non_embedding_params", "tokens", "flops",
                "loss", "held_out")  # fmt: skip
"""Columns of runs.csv (GridPoint fields; held_out as 0/1)."""
LAWS = ("compute", "chinchilla", "baseline")
"""Predictors of the held-out loss: L(C), L(N, D), and the best loss among the fitted runs (no law)."""
LAW_SHORT = {"compute": "L(C)", "chinchilla": "L(N, D)", "baseline": "the best smaller run's loss (no law)"}
"""Names of the predictors in the answer paragraph."""
LAW_NAMES = {
    "compute": "L(C) = a C^b + c",
    "chinchilla": "L(N, D) = E + A/N^alpha + B/D^beta",
    "baseline": "best fitted run's loss (no law)",
}


@dataclass(kw_only=True)
class GridScale:
    """The grid and training budget of one scale."""

    widths: tuple[int, ...]
    """Model widths (dim), increasing; the depth is fixed, so N grows with the width."""
    n_layers: int
    """Blocks in total, the same for every n (parameter-matched)."""
    n_heads: int
    """Attention heads per block."""
    steps: tuple[int, ...]
    """Optimizer steps of the token budgets, increasing."""
    batch_size: int
    """Sequences per step (also fixes the validation windows: 8 batches)."""
    seq_len: int
    """Bytes per training and validation window."""
    lr: float
    """Peak learning rate of every run."""
    max_documents: int
    """Documents of the python-stdlib corpus to prepare (0: all)."""
    val_fraction: float
    """Documents held out for validation."""
    bootstrap: int
    """Bootstrap resamples of the Chinchilla fit (intervals on its exponents)."""
    fit_starts: int
    """Best-scoring grid starts of the Chinchilla fit run to convergence."""

    def __post_init__(self) -> None:
        for name in ("widths", "steps"):
            values = getattr(self, name)
            if len(values) < 2 or list(values) != sorted(set(values)):
                raise ValueError(f"{name} must hold at least two increasing values, got {values}")


SCALES = {
    "debug": GridScale(widths=(16, 24, 32), n_layers=4, n_heads=2, steps=(4, 8), batch_size=4, seq_len=32,
                       lr=3e-3, max_documents=12, val_fraction=0.2, bootstrap=0, fit_starts=20),
    "small": GridScale(widths=(32, 48, 64, 96), n_layers=6, n_heads=4, steps=(75, 150, 300), batch_size=16,
                       seq_len=128, lr=2e-3, max_documents=300, val_fraction=0.05, bootstrap=100,
                       fit_starts=100),
    "medium": GridScale(widths=(128, 192, 256, 384), n_layers=8, n_heads=4, steps=(1000, 2000, 4000),
                        batch_size=32, seq_len=256, lr=1e-3, max_documents=0, val_fraction=0.02,
                        bootstrap=200, fit_starts=100),
}  # fmt: skip
"""debug: seconds (tests); small: about 10-15 minutes on a 2-core CPU for both n; medium: a GPU
(untested beyond building its configs)."""


@dataclass
class GridPoint:
    """One trained run of the grid and its final next-token validation loss."""

    n_future: int
    """Heads of the model."""
    dim: int
    """Model width."""
    n_layers: int
    """Blocks in total."""
    steps: int
    """Optimizer steps."""
    params: int
    """All parameters, embeddings included."""
    non_embedding_params: int
    """N: parameters outside the token embedding and the unembedding."""
    tokens: int
    """D: training tokens, steps x batch x seq_len."""
    loss: float
    """Final next-token validation loss (nats per byte)."""
    held_out: bool
    """Whether this is the run whose loss was predicted."""

    @property
    def flops(self) -> int:
        """C = 6 N D."""
        return 6 * self.non_embedding_params * self.tokens

    @property
    def name(self) -> str:
        return run_name(self.n_future, self.dim, self.steps)


def run_name(n_future: int, dim: int, steps: int) -> str:
    """Directory name of one run under <out>/runs."""
    return f"n{n_future}-d{dim}-s{steps}"


def is_held_out(preset: GridScale, dim: int, steps: int) -> bool:
    """The largest model with the largest budget: the run to predict."""
    return dim == preset.widths[-1] and steps == preset.steps[-1]


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(all parameters, non-embedding parameters) of a model, counted without allocating it."""
    with torch.device("meta"):
        model = MultiTokenLM(config)
    named = dict(model.named_parameters())
    embedding = ("tok_embeddings.", "output.")
    return sum(p.numel() for p in named.values()), sum(
        p.numel() for name, p in named.items() if not name.startswith(embedding)
    )


# ---- data and training -----------------------------------------------------------------------------


def prepare_data(root: Path, preset: GridScale) -> Path:
    """Byte-level python-stdlib shards under root/data (reused when already prepared)."""
    config = PrepareConfig(
        source="python-stdlib",
        out=str(root / "data"),
        tokenizer="byte",
        val_fraction=preset.val_fraction,
        max_documents=preset.max_documents,
    )
    return prepare(config)


def run_config(
    root: Path,
    data: Path,
    preset: GridScale,
    cell: tuple[int, int, int],
    seed: int,
    device: str,
    progress: bool,
) -> TrainConfig:
    """The TrainConfig of grid cell (n_future, width, steps): the shared recipe of `ModelBudget`."""
    n, dim, steps = cell
    budget = ModelBudget(
        dim=dim,
        n_layers=preset.n_layers,
        n_heads=preset.n_heads,
        max_steps=steps,
        batch_size=preset.batch_size,
        seq_len=preset.seq_len,
        lr=preset.lr,
    )
    return budget.train_config(
        data=data,
        out=root / "runs" / run_name(*cell),
        model=budget.model_fields(n, max_seq_len=preset.seq_len),
        seed=seed,
        device=device,
        progress=progress,
    )


def grid_point(cfg: TrainConfig, preset: GridScale, vocab_size: int, loss: float) -> GridPoint:
    """What the report and the fits need of one run: its sizes (known before training) and its loss."""
    config = cfg.model_config(vocab_size)
    params, non_embedding = parameter_counts(config)
    return GridPoint(
        n_future=config.n_future,
        dim=config.dim,
        n_layers=config.n_layers,
        steps=cfg.max_steps,
        params=params,
        non_embedding_params=non_embedding,
        tokens=cfg.max_steps * cfg.batch_size * cfg.seq_len,
        loss=loss,
        held_out=is_held_out(preset, config.dim, cfg.max_steps),
    )


def train_point(cfg: TrainConfig, preset: GridScale, vocab_size: int) -> GridPoint:
    """Train (or resume, or reuse) one run; its sizes and final next-token validation loss."""
    run_dir = train_variant(cfg)
    return grid_point(cfg, preset, vocab_size, final_validation(run_dir)["val_loss"])


# ---- fits and the prediction -----------------------------------------------------------------------


def chinchilla_caveats(fit: ChinchillaFit, losses: np.ndarray) -> list[str]:
    """Signs of a degenerate fit, stated in the report (the fit itself is left as it is)."""
    caveats = []
    for name, value, what in (("alpha", fit.alpha, "N"), ("beta", fit.beta, "D")):
        if value < 0.02:
            caveats.append(f"{name} = {value:.3g}: the fit finds almost no dependence on {what}")
        elif value > 2.0:
            caveats.append(f"{name} = {value:.3g} is implausibly steep")
    if fit.E < 0.01:
        caveats.append(f"E = {fit.E:.2g}: the fit finds no irreducible loss")
    if losses.min() <= fit.E:
        caveats.append(f"E = {fit.E:.3g} is not below the lowest fitted loss {losses.min():.3g}")
    return caveats


def predict_held_out(fitted: list[GridPoint], target: GridPoint, preset: GridScale, seed: int) -> dict:
    """Fit both laws to `fitted` and predict `target`'s loss; a law that cannot be fitted says why."""
    N = np.array([p.non_embedding_params for p in fitted], float)
    D = np.array([p.tokens for p in fitted], float)
    loss = np.array([p.loss for p in fitted], float)
    C = 6.0 * N * D
    out: dict[str, Any] = {
        "fitted_runs": [p.name for p in fitted],
        "held_out": {
            "run": target.name,
            "N": target.non_embedding_params,
            "D": target.tokens,
            "C": target.flops,
            "compute_over_largest_fitted": target.flops / C.max(),
        },
    }
    try:
        fit = fit_chinchilla(N, D, loss, bootstrap=preset.bootstrap, seed=seed, n_starts=preset.fit_starts)
        out["chinchilla"] = {
            "fit": fit.to_dict(),
            "predicted_loss": float(fit.predict(target.non_embedding_params, target.tokens)),
            "caveats": chinchilla_caveats(fit, loss),
        }
    except UserError as err:  # FitDidNotConverge or too few points: reported, not patched
        out["chinchilla"] = {"error": str(err)}
    envelope = lower_envelope(C, loss)
    try:
        law = fit_compute(C[envelope], loss[envelope])
        out["compute"] = {
            "fit": law.to_dict(),
            "envelope_runs": [fitted[i].name for i in envelope],
            "predicted_loss": float(law.predict(target.flops)),
        }
    except UserError as err:
        out["compute"] = {"error": str(err), "envelope_runs": [fitted[i].name for i in envelope]}
    best = int(np.argmin(loss))
    out["baseline"] = {"predicted_loss": float(loss[best]), "run": fitted[best].name}
    return out


def write_prediction(root: Path, predictions: dict[str, dict], held_out_dirs: list[Path]) -> dict:
    """Write prediction.json, unless it already holds these very predictions (a re-run): keep that one."""
    path = root / PREDICTION
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("predictions") == json.loads(json.dumps(predictions)):
            return saved
    trained = [d.name for d in held_out_dirs if find_latest(d) is not None]
    sealed = {
        "question": QUESTION,
        "written_at": datetime.now(timezone.utc).isoformat(),
        "held_out_runs_trained_before": trained,
        "predictions": predictions,
    }
    path.write_text(json.dumps(sealed, indent=2) + "\n")
    return sealed


def prediction_error(predicted: float, actual: float) -> dict[str, float]:
    """Signed error (predicted - actual), in nats and relative to the actual loss."""
    error = predicted - actual
    return {"predicted": predicted, "actual": actual, "error": error, "relative_error": error / actual}


def evaluate(prediction: dict, actual: float) -> dict[str, dict]:
    """Error of every law that made a prediction."""
    return {
        law: prediction_error(prediction[law]["predicted_loss"], actual)
        for law in LAWS
        if "predicted_loss" in prediction[law]
    }


# ---- the experiment --------------------------------------------------------------------------------


def run_scaling(out: str, scale: str, seed: int, device: str, command: list[str]) -> dict:
    """Train the grid but the held-out runs, predict them, train them, write the report; the results."""
    preset = pick_scale(scale, SCALES)
    device = resolve_device(device)
    root = Path(out)
    data = prepare_data(root, preset)
    progress = scale != "debug"
    cells = [(n, dim, steps) for n in N_FUTURE for dim in preset.widths for steps in preset.steps]
    order = [c for c in cells if not is_held_out(preset, c[1], c[2])]
    held = [c for c in cells if is_held_out(preset, c[1], c[2])]

    vocab_size = read_meta(data)["vocab_size"]
    configs = {c: run_config(root, data, preset, c, seed, device, progress) for c in cells}

    points: dict[tuple[int, int, int], GridPoint] = {}
    for i, cell in enumerate(order, 1):
        print(f"[{i}/{len(cells)}] training {run_name(*cell)}", flush=True)
        points[cell] = train_point(configs[cell], preset, vocab_size)

    predictions = {}
    for cell in held:
        fitted = [points[c] for c in order if c[0] == cell[0]]
        target = grid_point(configs[cell], preset, vocab_size, loss=float("nan"))
        predictions[f"n={cell[0]}"] = predict_held_out(fitted, target, preset, seed)
    sealed = write_prediction(root, predictions, [Path(configs[c].out) for c in held])
    print(f"wrote {root / PREDICTION} before training the held-out runs", flush=True)

    for i, cell in enumerate(held, len(order) + 1):
        print(f"[{i}/{len(cells)}] training held-out {run_name(*cell)}", flush=True)
        points[cell] = train_point(configs[cell], preset, vocab_size)

    grid = [points[c] for c in cells]
    write_runs_csv(root / RUNS_CSV, grid)
    for n in N_FUTURE:
        write_runs_csv(root / runs_csv_of(n), [p for p in grid if p.n_future == n])
    evaluation = {
        f"n={n}": evaluate(sealed["predictions"][f"n={n}"], points[(n, dim, steps)].loss)
        for n, dim, steps in held
    }
    results = {
        "grid": [{**dataclasses.asdict(p), "flops": p.flops} for p in grid],
        "prediction_file": {k: sealed[k] for k in ("written_at", "held_out_runs_trained_before")},
        "predictions": sealed["predictions"],
        "evaluation": evaluation,
    }
    write_report(root, scale, preset, seed, data, results, command)
    return results


def runs_csv_of(n_future: int) -> str:
    """File name of one n's runs (a law is fitted per n: `lab scaling fit` on it refits that n alone)."""
    return f"runs_n{n_future}.csv"


def write_runs_csv(path: Path, grid: list[GridPoint]) -> None:
    """runs.csv: one row of RUNS_COLUMNS per run."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(RUNS_COLUMNS)
        for p in grid:
            values = (getattr(p, name) for name in RUNS_COLUMNS)
            writer.writerow([int(v) if isinstance(v, bool) else v for v in values])  # floats round-trip


# ---- report ----------------------------------------------------------------------------------------


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def answer_text(results: dict) -> str:
    """The answer paragraph, computed from the sealed predictions and the held-out losses.

    The verdict rests on L(C), GPT-4's law, chosen before any result (not on whichever law did better).
    """
    parts = [_lead(results)]
    for label, prediction in results["predictions"].items():
        errors, target = results["evaluation"][label], prediction["held_out"]
        said = []
        for law in LAWS:
            if law not in errors:
                said.append(f"{LAW_SHORT[law]} could not be fitted ({prediction[law]['error']})")
                continue
            e = errors[law]
            verb = "was" if law == "baseline" else "predicted"
            said.append(
                f"{LAW_SHORT[law]} {verb} {e['predicted']:.3f} ({e['error']:+.3f} nats, "
                f"{100 * e['relative_error']:+.1f}%)"
            )
            if law == "chinchilla" and prediction[law]["caveats"]:
                said[-1] += " from a suspect fit (" + "; ".join(prediction[law]["caveats"]) + ")"
        parts.append(
            f"For {label} (held-out N = {_human(target['N'])} non-embedding parameters, D = "
            f"{_human(target['D'])} tokens, {target['compute_over_largest_fitted']:.1f}x the compute of the "
            f"largest fitted run) the loss reached {errors['baseline']['actual']:.3f} nats/byte: "
            + ", ".join(said)
            + "."
        )
    parts += [_mtp_text(results), _exponent_text(results), _caveat_text(results)]
    return " ".join(p for p in parts if p)


def _lead(results: dict) -> str:
    """Verdict on L(C)'s held-out errors, against carrying over the best smaller run's loss."""
    evaluation = results["evaluation"]
    fitted = {label: ev["compute"] for label, ev in evaluation.items() if "compute" in ev}
    missing = [label for label in evaluation if label not in fitted]
    if not fitted:
        return f"Not here: the compute law L(C) could not be fitted for {' or '.join(missing)}."
    worst = max(abs(e["relative_error"]) for e in fitted.values())
    lost = [
        label for label, e in fitted.items() if abs(e["error"]) >= abs(evaluation[label]["baseline"]["error"])
    ]
    verdict = "Not usefully" if lost else "Yes" if worst < 0.02 else "Roughly" if worst < 0.05 else "Not well"
    text = (
        f"{verdict}, at this small scale: the compute law L(C) = a C^b + c, fitted to the smaller runs and "
        f"written to {PREDICTION} before the held-out run was trained, predicted its final loss to within "
        f"{100 * worst:.1f}% for {' and '.join(fitted)}"
    )
    if lost:
        text += f", but for {' and '.join(lost)} no closer than carrying over the best smaller run's loss"
    else:
        text += ", closer than carrying over the best smaller run's loss"
    if missing:
        text += f" (for {' and '.join(missing)} it could not be fitted)"
    return text + "."


def _mtp_text(results: dict) -> str:
    """n = 4 against n = 1 at the held-out size: next-token loss and L(C)'s error."""
    evaluation = results["evaluation"]
    if not {"n=1", "n=4"} <= set(evaluation):
        return ""
    one, four = evaluation["n=1"]["baseline"]["actual"], evaluation["n=4"]["baseline"]["actual"]
    text = (
        f"At the held-out size n=4's next-token loss is {abs(four - one):.3f} nats/byte "
        f"{'above' if four > one else 'below'} n=1's"
    )
    if "compute" in evaluation["n=1"] and "compute" in evaluation["n=4"]:
        errors = [100 * evaluation[label]["compute"]["relative_error"] for label in ("n=1", "n=4")]
        text += f", and L(C) missed it by {errors[1]:+.1f}% against {errors[0]:+.1f}% for n=1"
    return text + "."


def _exponent_text(results: dict) -> str:
    """The fitted exponents of n = 1 against n = 4."""
    bits = []
    for label, prediction in results["predictions"].items():
        ch, cp = prediction["chinchilla"], prediction["compute"]
        terms = []
        if "fit" in ch:
            terms.append(f"alpha {_with_ci(ch['fit'], 'alpha')}, beta {_with_ci(ch['fit'], 'beta')}")
        if "fit" in cp:
            terms.append(f"L(C) exponent b {cp['fit']['b']:.3f}")
        if terms:
            bits.append(f"{label}: " + ", ".join(terms))
    return ("Fitted exponents, " + "; ".join(bits) + ".") if bits else ""


def _with_ci(fit: dict, name: str) -> str:
    ci = fit.get("ci95")
    return f"{fit[name]:.3f}" + (f" [{ci[name][0]:.2g}, {ci[name][1]:.2g}]" if ci else "")


def _caveat_text(results: dict) -> str:
    ratio = max(p["held_out"]["compute_over_largest_fitted"] for p in results["predictions"].values())
    n_fitted = len(next(iter(results["predictions"].values()))["fitted_runs"])
    trained = results["prediction_file"]["held_out_runs_trained_before"]
    blind = (
        f"{PREDICTION} was written before any held-out run existed."
        if not trained
        else f"NOT blind: {', '.join(trained)} already existed when {PREDICTION} was written."
    )
    bootstrapped = any(p["chinchilla"].get("fit", {}).get("ci95") for p in results["predictions"].values())
    intervals = " (bracketed: 95% bootstrap intervals, wide with so few points)" if bootstrapped else ""
    return (
        f"The extrapolation spans only {ratio:.1f}x in compute (GPT-4's spanned 1,000-10,000x) and rests on "
        f"{n_fitted} runs per n{intervals}. {blind}"
    )


PREDICTION_MARKERS = {"L(C)": ("D", "tab:red"), "L(N, D)": ("s", "tab:blue")}
"""Marker and colour of each law's held-out prediction in the plots."""


def _mark_prediction(ax, x: float, loss: float, law: str) -> None:
    """A law's prediction for the held-out run: an open marker at (x, loss)."""
    marker, colour = PREDICTION_MARKERS[law]
    ax.scatter([x], [loss], marker=marker, s=70, facecolors="none", edgecolors=colour, linewidths=1.5,
               zorder=4, label=f"held-out: {law} prediction")  # fmt: skip


def _mark_actual(ax, x: float, loss: float) -> None:
    """The loss the held-out run reached: a black star."""
    ax.scatter([x], [loss], marker="*", s=160, color="k", zorder=5, label="held-out: actual")


def plot_compute(report: Report, results: dict, grid: list[GridPoint], preset: GridScale) -> None:
    """Loss vs compute per n: runs coloured by width, the L(C) fit, the held-out prediction vs actual."""
    import matplotlib.pyplot as plt

    labels = list(results["predictions"])
    fig, axes = report.figure(1, len(labels), width=5.5, height=4.6)
    axes = np.atleast_1d(axes).ravel()
    colours = dict(
        zip(preset.widths, plt.get_cmap("viridis")(np.linspace(0, 0.85, len(preset.widths))), strict=True)
    )
    for ax, label in zip(axes, labels, strict=True):
        prediction = results["predictions"][label]
        runs = [p for p in grid if f"n={p.n_future}" == label]
        fitted = [p for p in runs if not p.held_out]
        target = next(p for p in runs if p.held_out)
        envelope = set(prediction["compute"].get("envelope_runs", []))
        C = np.array([p.flops for p in fitted])
        for dim in preset.widths:
            same = [p for p in fitted if p.dim == dim]
            if same:
                ax.scatter(
                    [p.flops for p in same],
                    [p.loss for p in same],
                    color=colours[dim],
                    s=36,
                    zorder=3,
                    label=f"width {dim} (N = {_human(same[0].non_embedding_params)})",
                )
        on_env = [p for p in fitted if p.name in envelope]
        ax.scatter(
            [p.flops for p in on_env],
            [p.loss for p in on_env],
            s=110,
            facecolors="none",
            edgecolors="k",
            linewidths=0.8,
            zorder=3,
            label="compute-efficient runs (L(C) fitted to these)",
        )
        grid_c = np.geomspace(C.min() / 1.3, target.flops * 1.5, 200)
        if "fit" in prediction["compute"]:
            law = ComputeFit(**prediction["compute"]["fit"])
            inside = grid_c <= C.max()
            ax.plot(grid_c[inside], law.predict(grid_c[inside]), color="tab:red", lw=1.5, label="L(C) fit")
            ax.plot(
                grid_c[~inside],
                law.predict(grid_c[~inside]),
                color="tab:red",
                lw=1.5,
                ls="--",
                label="L(C) extrapolated",
            )
            _mark_prediction(ax, target.flops, prediction["compute"]["predicted_loss"], "L(C)")
        if "predicted_loss" in prediction["chinchilla"]:
            _mark_prediction(ax, target.flops, prediction["chinchilla"]["predicted_loss"], "L(N, D)")
        _mark_actual(ax, target.flops, target.loss)
        ax.axvline(C.max(), color="grey", lw=0.8, ls=":")
        _loss_panel(ax, "training compute C = 6 N D (FLOP, N non-embedding)", f"{label}: loss vs compute")
    _save_panels(
        report,
        fig,
        axes,
        "loss_vs_compute.png",
        "Final validation loss vs training compute, one panel per n. Dots: the runs fitted, coloured by "
        "width (ringed: the compute-efficient ones L(C) is fitted to); dashed: L(C) beyond the largest fitted compute "
        "(dotted line); star: the held-out run, with each law's prediction made before it was trained.",
    )


def _loss_panel(ax, xlabel: str, title: str) -> None:
    """A panel of final loss against a log x axis labelled at 1, 2 and 5 times powers of ten, as 2e+08
    (a narrow range has few decades)."""
    from matplotlib.ticker import FuncFormatter

    def label(x: float, _) -> str:
        mantissa = round(x / 10 ** np.floor(np.log10(x))) if x > 0 else 0
        return f"{x:.0e}" if mantissa in (1, 2, 5) else ""

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(label))
    ax.xaxis.set_minor_formatter(FuncFormatter(label))
    ax.set(xlabel=xlabel, ylabel="final next-token val loss (nats/byte)", title=title)
    ax.grid(True, which="both", alpha=0.2)


def _save_panels(report: Report, fig, axes, name: str, caption: str) -> None:
    """Save a row of panels with the legend beside the last one (beside the data, never on it)."""
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    report.save_figure(fig, name, caption)


def plot_params(report: Report, results: dict, grid: list[GridPoint], preset: GridScale) -> None:
    """Loss vs N per token budget, with the Chinchilla fit at each budget."""
    import matplotlib.pyplot as plt

    labels = list(results["predictions"])
    fig, axes = report.figure(1, len(labels), width=5.5, height=4.6)
    axes = np.atleast_1d(axes).ravel()
    colours = plt.get_cmap("plasma")(np.linspace(0.1, 0.8, len(preset.steps)))
    for ax, label in zip(axes, labels, strict=True):
        prediction = results["predictions"][label]
        runs = [p for p in grid if f"n={p.n_future}" == label]
        target = next(p for p in runs if p.held_out)
        saved = prediction["chinchilla"].get("fit")
        fit = ChinchillaFit(**saved) if saved else None
        grid_n = np.geomspace(
            min(p.non_embedding_params for p in runs) / 1.2, target.non_embedding_params * 1.2
        )
        for colour, steps in zip(colours, preset.steps, strict=True):
            line = sorted((p for p in runs if p.steps == steps and not p.held_out), key=lambda p: p.dim)
            tokens = steps * preset.batch_size * preset.seq_len
            ax.plot(
                [p.non_embedding_params for p in line],
                [p.loss for p in line],
                "o-",
                color=colour,
                label=f"D = {_human(tokens)} tokens ({steps} steps)",
            )
            if fit is not None:
                ax.plot(grid_n, fit.predict(grid_n, tokens), "--", color=colour, lw=1, alpha=0.8)
        if fit is not None:
            ax.plot([], [], "k--", lw=1, label="L(N, D) fit at each D")
            _mark_prediction(
                ax, target.non_embedding_params, prediction["chinchilla"]["predicted_loss"], "L(N, D)"
            )
        _mark_actual(ax, target.non_embedding_params, target.loss)
        _loss_panel(ax, "N (non-embedding parameters)", f"{label}: loss vs model size")
    _save_panels(
        report,
        fig,
        axes,
        "loss_vs_params.png",
        "Final validation loss vs model size, one line per token budget D (solid: measured; dashed: the "
        "Chinchilla fit to every run but the held-out one, shown at each D).",
    )


def plot_errors(report: Report, results: dict) -> None:
    """Each predictor's signed error on the held-out run, one bar per n."""
    labels = list(results["evaluation"])
    fig, ax = report.figure(width=6.5, height=3.8)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        errors = results["evaluation"][label]
        x = [j + (i - (len(labels) - 1) / 2) * width for j, law in enumerate(LAWS) if law in errors]
        y = [100 * errors[law]["relative_error"] for law in LAWS if law in errors]
        bars = ax.bar(x, y, width, label=label)
        ax.bar_label(bars, fmt="%+.1f%%", fontsize=7, padding=2)
    ax.axhline(0, color="k", lw=0.8)
    ticks = {
        "compute": "L(C) = a C^b + c",
        "chinchilla": "Chinchilla L(N, D)",
        "baseline": "best smaller run\n(no law)",
    }
    ax.set_xticks(range(len(LAWS)), [ticks[law] for law in LAWS])
    ax.set_ylabel("error on the held-out run (% of its loss)")
    ax.set_title("Predicted minus actual final loss of the held-out run")
    ax.legend(title="heads")
    ax.margins(y=0.15)
    report.save_figure(
        fig,
        "prediction_errors.png",
        "Error of each prediction, written before the held-out run was trained (positive: the run did "
        "better than predicted); the last group predicts no improvement at all.",
    )


def prediction_table(results: dict) -> tuple[list[str], list[list]]:
    header = [
        "n",
        "predictor",
        "runs fitted",
        "predicted loss",
        "actual loss",
        "error (nats)",
        "error (%)",
    ]
    rows = []
    for label, errors in results["evaluation"].items():
        prediction = results["predictions"][label]
        for law in LAWS:
            if law == "compute":
                used = f"{len(prediction['compute'].get('envelope_runs', []))} compute-efficient"
            elif law == "chinchilla":
                used = len(prediction["fitted_runs"])
            else:
                used = f"{len(prediction['fitted_runs'])} (best: {prediction['baseline']['run']})"
            if law in errors:
                e = errors[law]
                rows.append(
                    [
                        label,
                        LAW_NAMES[law],
                        used,
                        f"{e['predicted']:.4f}",
                        f"{e['actual']:.4f}",
                        f"{e['error']:+.4f}",
                        f"{100 * e['relative_error']:+.2f}",
                    ]
                )
            else:
                rows.append([label, LAW_NAMES[law], used, "not fitted", "", "", ""])
    return header, rows


def fit_table(results: dict) -> tuple[list[str], list[list]]:
    header = ["n", "E", "A", "B", "alpha (95% CI)", "beta (95% CI)", "L(C): a", "b", "c"]
    rows = []
    for label, prediction in results["predictions"].items():
        ch, cp = prediction["chinchilla"], prediction["compute"]
        row: list[Any] = [label]
        if "fit" in ch:
            f = ch["fit"]
            row += [f["E"], f["A"], f["B"], _with_ci(f, "alpha"), _with_ci(f, "beta")]
        else:
            row += ["not fitted"] + [""] * 4
        row += [cp["fit"]["a"], cp["fit"]["b"], cp["fit"]["c"]] if "fit" in cp else ["not fitted", "", ""]
        rows.append(row)
    return header, rows


def runs_table(grid: list[GridPoint]) -> tuple[list[str], list[list]]:
    header = [
        "n",
        "width",
        "steps",
        "N (non-embedding)",
        "all params",
        "D (tokens)",
        "C (FLOP)",
        "val loss",
        "role",
    ]
    rows = [
        [
            p.n_future,
            p.dim,
            p.steps,
            p.non_embedding_params,
            p.params,
            p.tokens,
            f"{p.flops:.3g}",
            f"{p.loss:.4f}",
            "held out" if p.held_out else "fitted",
        ]
        for p in grid
    ]
    return header, rows


def write_report(
    root: Path, scale: str, preset: GridScale, seed: int, data: Path, results: dict, command: list[str]
) -> Path:
    """report.md, the two plots and results.json under `root`; the prediction table on stdout."""
    grid = [GridPoint(**{k: v for k, v in row.items() if k != "flops"}) for row in results["grid"]]
    report = Report(
        root,
        title="Predictable scaling in small: predicting a run's loss before training it",
        question=QUESTION,
    )
    plot_compute(report, results, grid, preset)
    plot_params(report, results, grid, preset)
    plot_errors(report, results)
    header, rows = prediction_table(results)
    report.add_table(
        header, rows, "Held-out run: each predictor against the loss it reached (error = predicted - actual)"
    )
    report.add_table(*fit_table(results), "Fits to every run but the held-out one")
    report.add_table(*runs_table(grid), "Every run of the grid")
    meta = read_meta(data)
    trunk = {n: ModelConfig(n_layers=preset.n_layers, n_future=n).n_trunk_layers for n in N_FUTURE}
    details = {
        "scale": scale,
        "seed": f"{seed} (initialisation and data order, the same for every run)",
        "data": f"python-stdlib source, byte-level ({meta['vocab_size']} ids), "
        f"{meta['splits']['train']['tokens']:,} train and {meta['splits']['val']['tokens']:,} validation bytes",
        "models": f"widths {', '.join(map(str, preset.widths))}; {preset.n_layers} blocks in total for every "
        f"n (parameter-matched: n=1 has a {trunk[1]}-block trunk plus one head block, n=4 a "
        f"{trunk[4]}-block trunk plus four head blocks); {preset.n_heads} attention heads",
        "training": f"steps {', '.join(map(str, preset.steps))} x {preset.batch_size} sequences x "
        f"{preset.seq_len} bytes; lr {preset.lr}, 5% warmup, cosine decay to each run's own last step",
        "metric": "the trainer's final validation (runner.final_validation): next-token (head 0) "
        f"cross-entropy on the same {8 * preset.batch_size} fixed windows of {preset.seq_len} bytes, "
        "evenly spread over the validation split, for every run; fitted for n=1 and n=4 alike",
        "N, D, C": "N = non-embedding parameters (blocks and norms; token embedding and unembedding "
        "excluded), D = steps x batch x seq_len, C = 6 N D (the extra unembeddings of n=4 not counted)",
        "fits": f"Chinchilla: Huber (delta 1e-3) on log loss, best {preset.fit_starts} of Hoffmann's "
        f"grid starts, {preset.bootstrap} bootstrap resamples; L(C) = a C^b + c: least squares on log "
        "loss over the compute-efficient runs (lower envelope in C), as `lab scaling fit` does",
        "prediction": f"{PREDICTION} written {results['prediction_file']['written_at']}, before the "
        "held-out runs were trained"
        + (
            ""
            if not results["prediction_file"]["held_out_runs_trained_before"]
            else f" (except {', '.join(results['prediction_file']['held_out_runs_trained_before'])}, "
            "which already existed)"
        ),
        "runs": f"{RUNS_CSV} (every run) and {runs_csv_of(1)} etc. (one per n); refit one n with "
        f"`multitoken lab scaling fit {runs_csv_of(1)} --n-col non_embedding_params --d-col tokens "
        "--loss-col loss`",
    }
    path = report.write(answer_text(results), results, command=command, details=details)
    print_table("scaling run: held-out predictions", header, rows)
    return path


@dataclass
class ScalingRunOptions(study.StudyOptions):
    """Flags of `multitoken lab scaling run`."""

    out: str = "reports/lab/scaling-run"
    scale: str = "small"
    """debug (seconds), small (about 15 minutes on a 2-core CPU) or medium (a GPU; untested)."""


def scaling_run_cli(options: ScalingRunOptions) -> None:
    """Can a small model's final loss be predicted before it is trained, from smaller runs?

    Trains a grid of byte-level models (widths x token budgets) for n_future = 1 and 4, fits Chinchilla's
    L(N, D) and the compute law L(C) on every run but the largest, writes the prediction for the largest
    to prediction.json, then trains it and reports each law's error (GPT-4's "predictable scaling").
    Writes report.md, two plots, results.json and runs.csv (readable by `lab scaling fit`).
    """
    command = study.options_command(("lab", "scaling", "run"), options)
    run_scaling(options.out, options.scale, options.seed, options.device, command)
    print(f"wrote {Path(options.out) / 'report.md'}")
