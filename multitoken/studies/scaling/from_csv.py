"""Scaling laws from a CSV of training runs: fits, a JSON of results, a Markdown report and a plot.

Kaplan's L(N) describes models not limited by data, so it is fitted to the lower envelope in N: the runs
whose loss beats every run with fewer parameters. The compute law L(C) is likewise fitted to the
compute-efficient envelope in C = 6 N D. Chinchilla's L(N, D) uses every kept run.
"""

from __future__ import annotations

import csv as csv_module
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multitoken.errors import UserError
from multitoken.studies.scaling.fit import (
    CHINCHILLA_PARAMS,
    ChinchillaFit,
    ComputeFit,
    FitDidNotConverge,
    KaplanFit,
    fit_chinchilla,
    fit_compute,
    fit_kaplan,
)

__all__ = [
    "ChinchillaFit",
    "ComputeFit",
    "CsvFit",
    "FitDidNotConverge",
    "KaplanFit",
    "fit_chinchilla",
    "fit_compute",
    "fit_csv",
    "fit_kaplan",
    "lower_envelope",
    "scaling_fit",
]

QUESTION = "Does loss follow a predictable power law in model size and data?"
"""The question the report answers first."""


# ---- input ------------------------------------------------------------------------------------------


def _read_columns(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Named columns of a CSV as positive float arrays; UserError naming the column and row otherwise."""
    if not path.is_file():
        raise UserError(f"no such CSV file: {path}")
    try:
        with path.open(newline="") as fh:
            reader = csv_module.DictReader(fh)
            header = reader.fieldnames or []
            missing = [n for n in names if n not in header]
            if missing:
                raise UserError(
                    f"column {', '.join(map(repr, missing))} not in {path}; "
                    f"available: {', '.join(header) or 'none'}"
                )
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv_module.Error) as err:
        raise UserError(f"cannot read CSV {path}: {err}") from err
    out = {}
    for name in names:
        values = np.empty(len(rows))
        for i, row in enumerate(rows):
            text = (row.get(name) or "").strip()
            try:
                values[i] = float(text)
            except ValueError:
                raise UserError(f"column {name!r} row {i + 1} is not a number: {text!r}") from None
            if not (np.isfinite(values[i]) and values[i] > 0):
                raise UserError(f"column {name!r} row {i + 1} must be finite and positive, got {text!r}")
        out[name] = values
    return out


def lower_envelope(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of points whose loss is below that of every point with smaller x, in increasing x."""
    order = np.lexsort((loss, x))
    keep, best = [], np.inf
    for i in order:
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.array(keep, dtype=int)


# ---- fitting ----------------------------------------------------------------------------------------


def _budgets(c_min: float, c_max: float) -> list[float]:
    """Powers of ten from the smallest budget observed to 100x the largest, at most 8 of them."""
    lo, hi = int(np.floor(np.log10(c_min))), int(np.ceil(np.log10(c_max))) + 2
    step = max(1, int(np.ceil((hi - lo + 1) / 8)))
    return [float(10.0**k) for k in range(lo, hi + 1, step)]


def _answer(fit: ChinchillaFit, rel_rms: float, r2: float, n: int) -> str:
    """One paragraph answering QUESTION from the measured fit quality."""
    verdict = "Yes" if rel_rms < 0.02 else "Roughly" if rel_rms < 0.05 else "Not well"
    a = fit.beta / (fit.alpha + fit.beta)
    return (
        f"{verdict}. Over {n} runs, L(N, D) = E + A/N^alpha + B/D^beta predicts the loss with a "
        f"root-mean-square relative error of {100 * rel_rms:.2f}% (R^2 of log loss {r2:.3f}). "
        f"Loss falls as N^-{fit.alpha:.3f} with "
        f"model size and D^-{fit.beta:.3f} with data towards an irreducible {fit.E:.3f}. For a fixed compute "
        f"budget C = 6ND the loss-minimising model grows as C^{a:.3f} and its data as C^{1 - a:.3f}."
    )


@dataclass
class CsvFit:
    """Which columns of a CSV of runs to fit, and how (flags of `multitoken lab scaling fit`)."""

    n_col: str = "N"
    """Column holding model size N (parameters)."""
    d_col: str | None = None
    """Column holding training tokens D (give this or flop_col)."""
    flop_col: str | None = None
    """Column holding training FLOP; D = FLOP / (6 N)."""
    loss_col: str = "loss"
    """Column holding the final loss."""
    drop_highest: int = 0
    """Drop this many highest-loss runs before fitting."""
    bootstrap: int = 0
    """Bootstrap resamples for standard errors and 95 percent intervals (0: none)."""


def fit_csv(path: str | Path, how: CsvFit | None = None, out_dir: str | Path | None = None) -> dict:
    """Fit Chinchilla, Kaplan and compute laws to the runs in a CSV; optionally write a report.

    D comes from `how.d_col`, or D = FLOP / (6 N) from `how.flop_col`. The `how.drop_highest`
    highest-loss rows are dropped first. Returns a JSON-serialisable dict; with `out_dir`, also writes
    results.json, report.md and scaling.png there.
    """
    how = how or CsvFit()
    n_col, d_col, flop_col, loss_col = how.n_col, how.d_col, how.flop_col, how.loss_col
    drop_highest, bootstrap = how.drop_highest, how.bootstrap
    if (d_col is None) == (flop_col is None):
        raise UserError("give exactly one of d_col (tokens per run) or flop_col (training FLOP per run)")
    if drop_highest < 0 or bootstrap < 0:
        raise UserError("drop_highest and bootstrap must be >= 0")
    path = Path(path)
    cols = _read_columns(path, [n_col, d_col or flop_col, loss_col])
    N, loss = cols[n_col], cols[loss_col]
    D = cols[d_col] if d_col else cols[flop_col] / (6.0 * N)
    if drop_highest >= len(N):
        raise UserError(f"drop_highest={drop_highest} would drop all {len(N)} rows")
    dropped = np.argsort(-loss, kind="stable")[:drop_highest]
    keep = np.setdiff1d(np.arange(len(N)), dropped)
    if len(keep) < 5:
        raise UserError(f"{len(keep)} rows left after dropping; the Chinchilla law has 5 parameters")
    N, D, loss = N[keep], D[keep], loss[keep]
    C = 6.0 * N * D

    start = time.perf_counter()
    fit = fit_chinchilla(N, D, loss, bootstrap=bootstrap)
    pred = fit.predict(N, D)
    log_res = np.log(pred) - np.log(loss)
    rel_rms = float(np.sqrt(np.mean((pred / loss - 1.0) ** 2)))
    r2 = float(1.0 - np.sum(log_res**2) / np.sum((np.log(loss) - np.log(loss).mean()) ** 2))

    results: dict = {"question": QUESTION}
    results["answer"] = _answer(fit, rel_rms, r2, len(N))
    budgets = _budgets(C.min(), C.max())
    n_opt, d_opt = fit.compute_optimal(budgets)
    results["chinchilla"] = {
        **fit.to_dict(),
        "rel_rms": rel_rms,
        "r2_log": r2,
        "compute_optimal": [
            {
                "C": c,
                "N": float(n),
                "D": float(d),
                "tokens_per_param": float(d / n),
                "loss": float(fit.predict(n, d)),
            }
            for c, n, d in zip(budgets, n_opt, d_opt, strict=True)
        ],
    }
    for name, x, fitter in (("kaplan", N, fit_kaplan), ("compute", C, fit_compute)):
        idx = lower_envelope(x, loss)
        try:
            results[name] = {**fitter(x[idx], loss[idx]).to_dict(), "envelope_rows": _rows(keep[idx])}
        except UserError as err:  # the envelope can be too short; the report says so
            results[name] = {"error": str(err)}
    results["fit_seconds"] = time.perf_counter() - start
    results["inputs"] = {
        "csv": str(path),
        "csv_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        **{f.name: getattr(how, f.name) for f in dataclasses.fields(CsvFit)},
        "rows": len(keep) + len(dropped),
        "rows_used": len(keep),
        "dropped_rows": _rows(dropped),
        "huber_delta": fit.delta,
        "starts": fit.n_starts,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_fit(fit, N, D, loss, out / "scaling.png", compute=results["compute"], loss_col=loss_col)
        (out / "report.md").write_text(render_report(results, "scaling.png"))
    return results


def _rows(indices) -> list[int]:
    """1-based data-row numbers, as the error messages count them."""
    return sorted(int(i) + 1 for i in indices)


# ---- report -----------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def render_report(results: dict, png_name: str) -> str:
    """Markdown report: question, answer, plot, parameters, compute-optimal budgets, inputs."""
    ch, inp = results["chinchilla"], results["inputs"]
    lines = [f"# {results['question']}", "", results["answer"], "", f"![loss vs compute]({png_name})", ""]
    lines += ["## Chinchilla fit: L(N, D) = E + A / N^alpha + B / D^beta", ""]
    has_ci = ch.get("ci95") is not None
    header = "| parameter | estimate |" + (" bootstrap s.e. | 95% interval |" if has_ci else "")
    lines += [header, "|---|---|" + ("---|---|" if has_ci else "")]
    for name in CHINCHILLA_PARAMS:
        row = f"| {name} | {_fmt(ch[name])} |"
        if has_ci:
            lo, hi = ch["ci95"][name]
            row += f" {_fmt(ch['stderr'][name])} | [{_fmt(lo)}, {_fmt(hi)}] |"
        lines.append(row)
    lines += [
        "",
        f"{ch['n_points']} runs; Huber loss (delta {ch['delta']:g}, summed over runs, on log loss) "
        f"{ch['loss']:.6g}; best of {ch['n_starts']} L-BFGS-B starts; "
        f"root-mean-square relative error {100 * ch['rel_rms']:.2f}%; "
        f"fit took {results['fit_seconds']:.1f} s."
        + (f" Intervals from {ch['n_bootstrap']} bootstrap resamples." if has_ci else ""),
        "",
        "## Compute-optimal allocation (C = 6 N D)",
        "",
        "| FLOP budget C | N (parameters) | D (tokens) | tokens per parameter | predicted loss |",
        "|---|---|---|---|---|",
    ]
    for r in ch["compute_optimal"]:
        lines.append(
            f"| {r['C']:.0e} | {_fmt(r['N'])} | {_fmt(r['D'])} | "
            f"{r['tokens_per_param']:.1f} | {r['loss']:.3f} |"
        )
    lines += ["", "## Single-variable laws (fitted to the lower envelope of the runs)", ""]
    kp, cp = results["kaplan"], results["compute"]
    if "error" in kp:
        lines.append(f"- Kaplan L(N) = (Nc / N)^alpha_N: not fitted ({kp['error']}).")
    else:
        lines.append(
            f"- Kaplan L(N) = (Nc / N)^alpha_N: Nc = {_fmt(kp['Nc'])}, alpha_N = {kp['alpha_N']:.4f} "
            f"({kp['n_points']} runs, rms log residual {kp['rmse_log']:.4f})."
        )
    if "error" in cp:
        lines.append(f"- Compute L(C) = a C^b + c: not fitted ({cp['error']}).")
    else:
        lines.append(
            f"- Compute L(C) = a C^b + c: a = {_fmt(cp['a'])}, b = {cp['b']:.4f}, c = {cp['c']:.4f} "
            f"({cp['n_points']} runs, rms log residual {cp['rmse_log']:.4f})."
        )
    lines += ["", "## Inputs", ""]
    lines += [f"- {k}: `{v}`" for k, v in inp.items()]
    return "\n".join(lines) + "\n"


def plot_fit(
    fit: ChinchillaFit, N, D, loss, png: Path, *, compute: dict | None = None, loss_col: str = "loss"
) -> None:
    """Observed loss vs FLOP coloured by N, fitted iso-N curves, compute-optimal frontier (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FormatStrFormatter

    C = 6.0 * N * D
    norm = LogNorm(vmin=N.min(), vmax=N.max())
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    grid_c = np.logspace(np.log10(C.min()) - 0.3, np.log10(C.max()) + 0.3, 200)
    for i, n in enumerate(np.geomspace(N.min(), N.max(), 6)):
        ax.plot(grid_c, fit.predict(n, grid_c / (6 * n)), color=cmap(norm(n)), lw=1.2, alpha=0.8,
                label="fit at fixed N (iso-N)" if i == 0 else None)  # fmt: skip
    n_opt, d_opt = fit.compute_optimal(grid_c)
    ax.plot(grid_c, fit.predict(n_opt, d_opt), "k--", lw=2, label="compute-optimal frontier (fit)")
    if compute and "error" not in compute:
        law = compute["a"] * grid_c ** compute["b"] + compute["c"]
        ax.plot(grid_c, law, ":", color="tab:red", lw=1.5, label="compute law L(C) = a C^b + c")
    sc = ax.scatter(C, loss, c=N, cmap=cmap, norm=norm, s=18, edgecolors="k", linewidths=0.3, zorder=3,
                    label="observed runs")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(loss.min() * 0.9, loss.max() * 1.1)
    for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_format(FormatStrFormatter("%.1f"))  # plain loss values, not 3x10^0
    ax.set_xlabel("training compute C = 6 N D (FLOP)")
    ax.set_ylabel(f"{loss_col} (nats per token)")
    ax.set_title("Loss vs compute, coloured by model size")
    fig.colorbar(sc, ax=ax, label="model size N (parameters)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ---- CLI --------------------------------------------------------------------------------------------


@dataclass
class ScalingFitOptions(CsvFit):
    """Flags of `multitoken lab scaling fit`."""

    csv: str = ""
    """CSV file with one training run per row."""
    out: str = "reports/lab/scaling"
    """Directory for results.json, report.md and scaling.png."""


def scaling_fit(options: ScalingFitOptions) -> None:
    """Fit Chinchilla, Kaplan and compute scaling laws to a CSV of runs and write a report."""
    results = fit_csv(options.csv, options, out_dir=options.out)
    ch = results["chinchilla"]
    print(f"{'param':>6}  {'estimate':>10}" + ("  95% interval" if ch.get("ci95") else ""))
    for name in CHINCHILLA_PARAMS:
        ci = ch.get("ci95")
        print(f"{name:>6}  {ch[name]:>10.4g}" + (f"  [{ci[name][0]:.4g}, {ci[name][1]:.4g}]" if ci else ""))
    print(results["answer"])
    print(f"report: {Path(options.out) / 'report.md'}")
