"""lab scaling run: the prediction is sealed before the held-out runs train, its errors, runs.csv, the CLI."""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from multitoken.checkpoint import load_model
from multitoken.cli import main
from multitoken.config import preset_config
from multitoken.model import MultiTokenLM
from multitoken.studies.runs import final_validation
from multitoken.studies.scaling import grid as scaling_run
from multitoken.studies.scaling.fit import ChinchillaFit, ComputeFit
from multitoken.studies.scaling.grid import (
    PREDICTION,
    SCALES,
    GridPoint,
    GridScale,
    chinchilla_caveats,
    parameter_counts,
    predict_held_out,
    prediction_error,
    write_prediction,
)

DEBUG = SCALES["debug"]


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    """The debug experiment end to end, recording whether prediction.json existed as each run started."""
    out = tmp_path_factory.mktemp("scaling_run")
    started: list[tuple[str, bool]] = []
    real_train_variant = scaling_run.train_variant

    def recording_train_variant(cfg):
        started.append((Path(cfg.out).name, (out / PREDICTION).exists()))
        return real_train_variant(cfg)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scaling_run, "train_variant", recording_train_variant)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            status = main(["lab", "scaling", "run", "--scale", "debug", "--out", str(out), "--device", "cpu"])
        finally:
            torch.set_num_threads(threads)
    assert status == 0
    return out, started


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def held_out_name(n: int) -> str:
    return f"n{n}-d{DEBUG.widths[-1]}-s{DEBUG.steps[-1]}"


# ---- end to end -------------------------------------------------------------------------------------


def test_debug_run_writes_report_plots_results_csv_and_prediction(debug_run):
    out, _ = debug_run
    lines = (out / "report.md").read_text().splitlines()
    assert lines[0].startswith("# ")
    assert lines[2] == f"**Question.** {scaling_run.QUESTION}"
    assert lines[4].startswith("**Answer (this run).**") and "L(C) predicted" in lines[4]
    for png in ("loss_vs_compute.png", "loss_vs_params.png", "prediction_errors.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in "\n".join(lines)
    results = json.loads((out / "results.json").read_text())
    assert (
        results["command"].startswith("multitoken lab scaling run") and "--scale debug" in results["command"]
    )
    grid = results["results"]["grid"]
    cells = len(scaling_run.N_FUTURE) * len(DEBUG.widths) * len(DEBUG.steps)
    assert len(grid) == cells == len(read_csv(out / "runs.csv"))
    assert [r["held_out"] for r in grid].count(True) == len(scaling_run.N_FUTURE)
    assert set(json.loads((out / PREDICTION).read_text())["predictions"]) == {"n=1", "n=4"}


def test_prediction_is_written_before_the_held_out_runs_start(debug_run):
    out, started = debug_run
    held = {held_out_name(n) for n in scaling_run.N_FUTURE}
    assert {name for name, _ in started} == {f"n{n}-d{d}-s{s}" for n in (1, 4) for d in DEBUG.widths
                                             for s in DEBUG.steps}  # fmt: skip
    for name, existed in started:
        assert existed == (name in held), name  # the fitted runs before it, the held-out runs after
    sealed = json.loads((out / PREDICTION).read_text())
    assert sealed["held_out_runs_trained_before"] == []
    written = datetime.fromisoformat(sealed["written_at"]).timestamp()
    for name in held:
        assert written < os.path.getmtime(out / "runs" / name / "train_config.json")


def test_runs_csv_holds_the_grid_and_round_trips_through_scaling_fit(debug_run, tmp_path):
    out, _ = debug_run
    rows = read_csv(out / "runs.csv")
    for row in rows:
        run_dir = out / "runs" / f"n{row['n_future']}-d{row['dim']}-s{row['steps']}"
        model = load_model(run_dir)
        blocks = [*model.trunk.parameters(), *model.heads.parameters(), *model.norm.parameters()]
        assert int(row["non_embedding_params"]) == sum(p.numel() for p in blocks)
        assert int(row["params"]) == sum(p.numel() for p in model.parameters())
        assert int(row["tokens"]) == int(row["steps"]) * DEBUG.batch_size * DEBUG.seq_len
        assert float(row["flops"]) == pytest.approx(6 * int(row["non_embedding_params"]) * int(row["tokens"]))
        assert float(row["loss"]) == final_validation(run_dir)["val_loss"]
    fit_out = tmp_path / "fit"
    argv = ["lab", "scaling", "fit", str(out / "runs.csv"), "--n-col", "non_embedding_params",
            "--d-col", "tokens", "--loss-col", "loss", "--out", str(fit_out)]  # fmt: skip
    assert main(argv) == 0
    fitted = json.loads((fit_out / "results.json").read_text())
    assert fitted["inputs"]["rows_used"] == len(rows)
    assert (fit_out / "report.md").is_file() and (fit_out / "scaling.png").is_file()
    per_n = {n: read_csv(out / f"runs_n{n}.csv") for n in ("1", "4")}
    assert all(r["n_future"] == n for n, group in per_n.items() for r in group)
    assert sorted(map(str, rows), key=str) == sorted(map(str, per_n["1"] + per_n["4"]), key=str)


def test_prediction_errors_follow_from_the_recorded_numbers(debug_run):
    out, _ = debug_run
    sealed = json.loads((out / PREDICTION).read_text())["predictions"]
    evaluation = json.loads((out / "results.json").read_text())["results"]["evaluation"]
    rows = {f"n={r['n_future']}": r for r in read_csv(out / "runs.csv") if r["held_out"] == "1"}
    assert set(rows) == set(sealed) == set(evaluation)
    checked = 0
    for label, prediction in sealed.items():
        row = rows[label]
        actual = float(row["loss"])
        N, D = int(row["non_embedding_params"]), int(row["tokens"])
        assert (prediction["held_out"]["N"], prediction["held_out"]["D"]) == (N, D)
        if "fit" in prediction["compute"]:  # the recorded law gives the recorded prediction
            law = ComputeFit(**prediction["compute"]["fit"])
            assert law.predict(6.0 * N * D) == pytest.approx(
                prediction["compute"]["predicted_loss"], rel=1e-12
            )
        if "fit" in prediction["chinchilla"]:
            fit = ChinchillaFit(**prediction["chinchilla"]["fit"])
            assert fit.predict(N, D) == pytest.approx(prediction["chinchilla"]["predicted_loss"], rel=1e-12)
        for law, got in evaluation[label].items():
            predicted = prediction[law]["predicted_loss"]
            assert got["predicted"] == predicted and got["actual"] == actual
            assert got["error"] == pytest.approx(predicted - actual, abs=1e-12)
            assert got["relative_error"] == pytest.approx((predicted - actual) / actual, abs=1e-12)
            checked += 1
    assert checked >= 2 * len(sealed)  # the baseline and at least one law per n


def test_rerun_reuses_every_run_and_keeps_the_sealed_prediction(debug_run, monkeypatch, capsys):
    out, _ = debug_run
    sealed = (out / PREDICTION).read_bytes()
    trained = []
    monkeypatch.setattr("multitoken.studies.runs.train", lambda cfg: trained.append(cfg))
    assert main(["lab", "scaling", "run", "--scale", "debug", "--out", str(out), "--device", "cpu"]) == 0
    assert trained == []  # every run was complete, so nothing was trained again
    assert (out / PREDICTION).read_bytes() == sealed
    assert "was written before any held-out run existed" in (out / "report.md").read_text()


def test_unknown_scale_exits_2_with_one_line(tmp_path, capsys):
    assert main(["lab", "scaling", "run", "--scale", "huge", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown scale 'huge'" in err and "debug, small, medium" in err
    assert not any(tmp_path.iterdir())


# ---- pieces -----------------------------------------------------------------------------------------


def test_prediction_error_on_hand_numbers():
    assert prediction_error(2.2, 2.0) == pytest.approx(
        {"predicted": 2.2, "actual": 2.0, "error": 0.2, "relative_error": 0.1}
    )
    over = prediction_error(3.0, 4.0)
    assert over["error"] == -1.0 and over["relative_error"] == -0.25


def test_parameter_counts_leave_out_embedding_and_unembedding_and_match_across_n():
    counts = {}
    for n in (1, 4):
        config = preset_config(
            "debug", dim=32, n_layers=6, n_heads=4, n_kv_heads=4, n_future=n, vocab_size=258
        )
        model = MultiTokenLM(config)
        embedding = model.tok_embeddings.weight.numel() + model.output.weight.numel()
        counts[n] = parameter_counts(config)
        assert counts[n] == (model.num_params(), model.num_params() - embedding)
    assert counts[1] == counts[4]  # parameter-matched heads


def grid_from_law(law: ChinchillaFit, widths_N, tokens_D) -> list[GridPoint]:
    return [
        GridPoint(n_future=1, dim=i, n_layers=6, steps=j, params=int(N) + 1000, non_embedding_params=int(N),
                  tokens=int(D), loss=float(law.predict(N, D)), held_out=False)
        for i, N in enumerate(widths_N) for j, D in enumerate(tokens_D)
    ]  # fmt: skip


def test_predict_held_out_recovers_an_exact_chinchilla_law():
    law = ChinchillaFit(E=1.2, A=40.0, B=90.0, alpha=0.35, beta=0.3, loss=0.0, n_points=0, converged=True)
    points = grid_from_law(law, [1e5, 2e5, 4e5, 8e5], [2e5, 4e5, 8e5])
    target = points.pop()
    preset = GridScale(widths=(1, 2), n_layers=6, n_heads=4, steps=(1, 2), batch_size=1, seq_len=1, lr=1e-3,
                       max_documents=0, val_fraction=0.1, bootstrap=0, fit_starts=50)  # fmt: skip
    prediction = predict_held_out(points, target, preset, seed=0)
    assert prediction["chinchilla"]["predicted_loss"] == pytest.approx(target.loss, rel=1e-4)
    assert prediction["chinchilla"]["caveats"] == []
    assert prediction["held_out"]["compute_over_largest_fitted"] == pytest.approx(2.0)
    assert prediction["baseline"]["predicted_loss"] == min(p.loss for p in points)
    assert len(prediction["compute"]["envelope_runs"]) >= 3 and "predicted_loss" in prediction["compute"]


def test_predict_held_out_reports_a_law_it_cannot_fit():
    law = ChinchillaFit(E=1.2, A=40.0, B=90.0, alpha=0.35, beta=0.3, loss=0.0, n_points=0, converged=True)
    points = grid_from_law(law, [1e5, 2e5], [2e5, 4e5])
    target = points.pop()
    prediction = predict_held_out(points, target, DEBUG, seed=0)
    assert "5 parameters but only 3 points" in prediction["chinchilla"]["error"]
    assert "predicted_loss" not in prediction["chinchilla"]


def test_chinchilla_caveats_flag_degenerate_fits():
    losses = np.array([2.0, 2.5, 3.0])
    sane = ChinchillaFit(E=1.5, A=10, B=10, alpha=0.3, beta=0.3, loss=0, n_points=3, converged=True)
    assert chinchilla_caveats(sane, losses) == []
    flat = ChinchillaFit(E=2.1, A=10, B=10, alpha=0.001, beta=3.5, loss=0, n_points=3, converged=True)
    caveats = chinchilla_caveats(flat, losses)
    assert len(caveats) == 3
    assert "no dependence on N" in caveats[0] and "steep" in caveats[1] and "E = 2.1" in caveats[2]
    floorless = ChinchillaFit(E=1e-12, A=10, B=10, alpha=0.3, beta=0.3, loss=0, n_points=3, converged=True)
    assert chinchilla_caveats(floorless, losses) == ["E = 1e-12: the fit finds no irreducible loss"]


def test_write_prediction_keeps_a_matching_file_and_records_held_out_runs_already_trained(
    debug_run, tmp_path
):
    out, _ = debug_run
    trained_run = out / "runs" / held_out_name(1)
    untrained_run = tmp_path / "runs" / "not-yet"
    first = write_prediction(tmp_path, {"n=1": {"x": 1.5}}, [untrained_run])
    assert first["held_out_runs_trained_before"] == []
    again = write_prediction(tmp_path, {"n=1": {"x": 1.5}}, [trained_run])
    assert again == first  # same predictions: the sealed file and its timestamp stay
    changed = write_prediction(tmp_path, {"n=1": {"x": 1.6}}, [trained_run, untrained_run])
    assert changed["held_out_runs_trained_before"] == [trained_run.name]
    assert json.loads((tmp_path / PREDICTION).read_text()) == changed


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_scale_builds_a_grid_whose_held_out_run_has_the_most_compute(scale, tmp_path):
    preset = SCALES[scale]
    cells = [(n, d, s) for n in scaling_run.N_FUTURE for d in preset.widths for s in preset.steps]
    points = []
    for cell in cells:
        cfg = scaling_run.run_config(tmp_path, tmp_path / "data", preset, cell, 0, "cpu", False)
        assert cfg.seq_len == preset.seq_len and cfg.batch_size == preset.batch_size and cfg.seed == 0
        points.append(scaling_run.grid_point(cfg, preset, vocab_size=258, loss=float("nan")))
    for n in scaling_run.N_FUTURE:
        mine = [p for p in points if p.n_future == n]
        held = [p for p in mine if p.held_out]
        assert len(held) == 1 and held[0].flops > max(p.flops for p in mine if not p.held_out)
        sizes = [p.non_embedding_params for p in mine if p.steps == preset.steps[0]]
        assert sizes == sorted(set(sizes))  # N grows with the width
    assert {(p.dim, p.steps, p.non_embedding_params) for p in points if p.n_future == 1} == {
        (p.dim, p.steps, p.non_embedding_params) for p in points if p.n_future == 4
    }  # parameter-matched: the same N for n = 1 and 4
