"""Fit scaling laws: Chinchilla's L(N, D), Kaplan's L(N) and a compute law L(C).

Chinchilla follows Hoffmann et al. 2022 (Approach 3) as replicated by Besiroglu et al. 2024 (Epoch AI):
log L = LSE(a - alpha log N, b - beta log D, e), with A = exp(a), B = exp(b), E = exp(e), fitted by
minimising the sum over points of Huber(delta) of (predicted - observed) log loss with L-BFGS-B from a
grid of starts. Natural logs throughout.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

from multitoken.errors import UserError

CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta")
"""Order of the Chinchilla parameters in reports and bootstrap tables."""

_LBFGS_OPTIONS = {"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-9}
"""L-BFGS-B settings for each local fit (objective scaled to about the mean absolute log residual)."""


class FitDidNotConverge(UserError):
    """No start of a fit reached a finite, converged optimum."""


def default_grid() -> np.ndarray:
    """Hoffmann et al.'s grid of starts as (a, b, e, alpha, beta) rows: 6 x 6 x 5 x 5 x 5 = 4500."""
    a = b = np.arange(0.0, 30.0, 5.0)  # 0, 5, ..., 25
    e = np.arange(-1.0, 1.5, 0.5)  # -1, -0.5, ..., 1
    alpha = beta = np.arange(0.0, 2.5, 0.5)  # 0, 0.5, ..., 2
    return np.array(list(itertools.product(a, b, e, alpha, beta)))


def _positive_arrays(names: tuple[str, ...], *arrays) -> list[np.ndarray]:
    out = [np.asarray(x, dtype=float).ravel() for x in arrays]
    if len({len(x) for x in out}) != 1:
        raise UserError(f"{', '.join(names)} must have the same length, got {[len(x) for x in out]}")
    for name, x in zip(names, out, strict=True):
        if not np.all(np.isfinite(x)) or np.any(x <= 0):
            raise UserError(f"{name} must be finite and positive")
    return out


def _need_points(n: int, n_params: int, what: str) -> None:
    if n < n_params:
        raise UserError(f"{what} has {n_params} parameters but only {n} points; need at least {n_params}")


# ---- Chinchilla -------------------------------------------------------------------------------------


def chinchilla_log_pred(p: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """Predicted log loss for parameters p = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = p
    return np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)


def huber_objective(
    p: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Mean Huber(delta) of log-loss residuals divided by delta, and its analytic gradient in p.

    Dividing by n * delta only rescales the Hoffmann/Epoch sum (same minimiser) so that L-BFGS-B
    tolerances mean the same thing for any delta and any number of points.
    """
    a, b, e, alpha, beta = p
    with np.errstate(over="ignore", invalid="ignore"):
        # Terms relative to E: pred = e + log(1 + u + v), stable while a, b stay moderate.
        u = np.exp(a - alpha * log_n - e)
        v = np.exp(b - beta * log_d - e)
        s = 1.0 + u + v
        r = e + np.log(s) - log_loss
        ar = np.abs(r)
        value = np.sum(np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)))
        g = np.clip(r, -delta, delta) / s  # Huber derivative times d pred / d e
        gu, gv = g * u, g * v
        grad = np.array([gu.sum(), gv.sum(), g.sum(), -(gu @ log_n), -(gv @ log_d)])
    scale = 1.0 / (len(r) * delta)
    return float(value * scale), grad * scale


def _local_fit(p0, args) -> tuple[np.ndarray, float, bool]:
    """L-BFGS-B from p0; returns (p, objective, converged)."""
    from scipy.optimize import minimize

    res = minimize(huber_objective, np.asarray(p0, float), args=args, jac=True, method="L-BFGS-B",
                   options=_LBFGS_OPTIONS)  # fmt: skip
    p, fun = res.x, float(res.fun)
    converged = bool(res.success) and np.isfinite(fun) and bool(np.all(np.isfinite(p)))
    return p, fun, converged


@dataclass
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, fitted to (N, D, loss) points."""

    E: float
    """Irreducible loss (nats per token)."""
    A: float
    """Model-size coefficient."""
    B: float
    """Data coefficient."""
    alpha: float
    """Model-size exponent."""
    beta: float
    """Data exponent."""
    loss: float
    """Huber objective at the optimum: the sum over points, as Hoffmann et al. and Epoch report it."""
    n_points: int
    """Number of points fitted."""
    converged: bool
    """Whether L-BFGS-B reported convergence at the returned optimum."""
    delta: float = 1e-3
    """Huber threshold on log-loss residuals."""
    n_starts: int = 0
    """Starting points optimised to convergence."""
    stderr: dict[str, float] | None = None
    """Bootstrap standard deviation of each parameter, or None without a bootstrap."""
    ci95: dict[str, tuple[float, float]] | None = None
    """Bootstrap 2.5 and 97.5 percentiles of each parameter, or None without a bootstrap."""
    n_bootstrap: int = 0
    """Bootstrap resamples whose refit converged (the ones stderr and ci95 use)."""

    @property
    def params(self) -> np.ndarray:
        """Internal (a, b, e, alpha, beta) = (log A, log B, log E, alpha, beta)."""
        return np.array([np.log(self.A), np.log(self.B), np.log(self.E), self.alpha, self.beta])

    def predict(self, N, D) -> np.ndarray:
        """Predicted loss at model sizes N and token counts D (broadcast)."""
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def compute_optimal(self, C) -> tuple[np.ndarray, np.ndarray]:
        """Loss-minimising (N, D) for FLOP budget C = 6 N D, in closed form."""
        C = np.asarray(C, float)
        s = self.alpha + self.beta
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        return G * (C / 6.0) ** (self.beta / s), (C / 6.0) ** (self.alpha / s) / G

    def to_dict(self) -> dict:
        """JSON-serialisable fields."""
        out = asdict(self)
        if self.ci95 is not None:
            out["ci95"] = {k: list(v) for k, v in self.ci95.items()}
        return out


def _describe(names, p) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in zip(names, p, strict=True))


def _chinchilla_natural(p: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = p
    with np.errstate(over="ignore"):
        return np.array([np.exp(e), np.exp(a), np.exp(b), alpha, beta])


def fit_chinchilla(
    N,
    D,
    loss,
    *,
    delta: float = 1e-3,
    grid=None,
    bootstrap: int = 0,
    seed: int = 0,
    n_starts: int | None = 100,
) -> ChinchillaFit:
    """Fit Chinchilla's L(N, D) = E + A/N^alpha + B/D^beta by Huber regression on log loss.

    Every row of `grid` (default: Hoffmann's 4500 (a, b, e, alpha, beta) starts) is scored in one
    vectorised pass; the `n_starts` best-scoring starts (None: all) are each run to convergence with
    L-BFGS-B and analytic gradients, and the best converged optimum wins. `bootstrap=k` refits k
    resamples (points drawn with replacement, seeded by `seed`) from that optimum.
    Raises FitDidNotConverge when no start converges to a finite optimum.
    """
    N, D, loss = _positive_arrays(("N", "D", "loss"), N, D, loss)
    _need_points(len(N), 5, "the Chinchilla law")
    if not delta > 0:
        raise UserError(f"Huber delta must be positive, got {delta}")
    starts = default_grid() if grid is None else np.atleast_2d(np.asarray(grid, float))
    if starts.ndim != 2 or starts.shape[1] != 5:
        raise UserError("grid must have rows (a, b, e, alpha, beta)")
    args = (np.log(N), np.log(D), np.log(loss), delta)
    if n_starts is not None and len(starts) > n_starts:
        starts = starts[np.argsort(_score_starts(starts, *args), kind="stable")[:n_starts]]

    best_p, best_f, best_ok = None, np.inf, False
    for p0 in starts:
        p, fun, ok = _local_fit(p0, args)
        # Prefer converged optima; among them the lowest objective.
        if (ok, -fun) > (best_ok, -best_f) or best_p is None:
            best_p, best_f, best_ok = p, fun, ok
    if not best_ok or not np.isfinite(best_f):
        raise FitDidNotConverge(
            f"Chinchilla fit did not converge from any of {len(starts)} starts; best found: "
            f"{_describe(CHINCHILLA_PARAMS, _chinchilla_natural(best_p))}"
        )
    E, A, B, alpha, beta = _chinchilla_natural(best_p)
    fit = ChinchillaFit(
        E=float(E), A=float(A), B=float(B), alpha=float(alpha), beta=float(beta),
        loss=best_f * len(N) * delta, n_points=len(N), converged=True, delta=delta, n_starts=len(starts),
    )  # fmt: skip
    if bootstrap > 0:
        _bootstrap(fit, best_p, args, bootstrap, seed)
    return fit


def _score_starts(starts: np.ndarray, log_n, log_d, log_loss, delta, chunk: int = 512) -> np.ndarray:
    """Huber objective at each start (rows), vectorised in chunks; non-finite scores sort last."""
    scores = np.empty(len(starts))
    for i in range(0, len(starts), chunk):
        p = starts[i : i + chunk].T[:, :, None]
        with np.errstate(over="ignore", invalid="ignore"):
            r = chinchilla_log_pred(p, log_n, log_d) - log_loss
            ar = np.abs(r)
            scores[i : i + chunk] = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum(axis=1)
    return np.where(np.isfinite(scores), scores, np.inf)


def _bootstrap(fit: ChinchillaFit, p_best: np.ndarray, args, k: int, seed: int) -> None:
    """Fill fit.stderr and fit.ci95 from k resample refits started at the full-data optimum."""
    log_n, log_d, log_loss, delta = args
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(k):
        idx = rng.integers(0, len(log_n), len(log_n))
        p, _, ok = _local_fit(p_best, (log_n[idx], log_d[idx], log_loss[idx], delta))
        if ok:
            draws.append(_chinchilla_natural(p))
    fit.n_bootstrap = len(draws)
    if len(draws) < 2:
        return
    draws = np.array(draws)
    fit.stderr = {k: float(s) for k, s in zip(CHINCHILLA_PARAMS, draws.std(axis=0, ddof=1), strict=True)}
    lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
    fit.ci95 = {k: (float(a), float(b)) for k, a, b in zip(CHINCHILLA_PARAMS, lo, hi, strict=True)}


# ---- Kaplan L(N) ------------------------------------------------------------------------------------


@dataclass
class KaplanFit:
    """L(N) = (Nc / N)^alpha_N (Kaplan et al. 2020), fitted by least squares in log-log space."""

    Nc: float
    """Critical model size (parameters)."""
    alpha_N: float
    """Model-size exponent."""
    rmse_log: float
    """Root-mean-square residual of log loss."""
    n_points: int
    """Number of points fitted."""

    def predict(self, N) -> np.ndarray:
        """Predicted loss at model sizes N."""
        return (self.Nc / np.asarray(N, float)) ** self.alpha_N

    def to_dict(self) -> dict:
        """JSON-serialisable fields."""
        return asdict(self)


def fit_kaplan(N, loss) -> KaplanFit:
    """Fit L(N) = (Nc/N)^alpha_N: log L = alpha_N log Nc - alpha_N log N is linear, so regression is exact."""
    N, loss = _positive_arrays(("N", "loss"), N, loss)
    _need_points(len(N), 2, "the Kaplan law")
    x, y = np.log(N), np.log(loss)
    if np.ptp(x) == 0:
        raise UserError("the Kaplan law needs at least two different model sizes")
    slope, intercept = np.polyfit(x, y, 1)
    alpha_n = -slope
    if not alpha_n > 0:
        raise FitDidNotConverge(
            f"Kaplan fit found no power-law decrease of loss with N; best found: slope={slope:.4g}"
        )
    rmse = float(np.sqrt(np.mean((intercept + slope * x - y) ** 2)))
    return KaplanFit(
        Nc=float(np.exp(intercept / alpha_n)), alpha_N=float(alpha_n), rmse_log=rmse, n_points=len(N)
    )


# ---- compute law L(C) -------------------------------------------------------------------------------


@dataclass
class ComputeFit:
    """L(C) = a C^b + c with irreducible loss c >= 0 ("predictable scaling", GPT-4 report)."""

    a: float
    """Coefficient of the power-law term."""
    b: float
    """Compute exponent (negative when loss falls with compute)."""
    c: float
    """Irreducible loss, >= 0."""
    rmse_log: float
    """Root-mean-square residual of log loss."""
    n_points: int
    """Number of points fitted."""

    def predict(self, C) -> np.ndarray:
        """Predicted loss at FLOP budgets C."""
        return self.a * np.asarray(C, float) ** self.b + self.c

    def to_dict(self) -> dict:
        """JSON-serialisable fields."""
        return asdict(self)


def fit_compute(C, loss) -> ComputeFit:
    """Fit L(C) = a C^b + c (c >= 0) by nonlinear least squares on log loss from several starts.

    Starts: c at fractions of the lowest loss, each with (a, b) from a log-log line through L - c.
    """
    from scipy.optimize import least_squares

    C, loss = _positive_arrays(("C", "loss"), C, loss)
    _need_points(len(C), 3, "the compute law")
    x, y = np.log(C), np.log(loss)
    mu = x.mean()
    if np.ptp(x) == 0:
        raise UserError("the compute law needs at least two different compute budgets")
    xc = x - mu  # centred log C decorrelates log a from b

    def residual(q):  # q = (log a at C = e^mu, b, c)
        return np.logaddexp(q[0] + q[1] * xc, np.log(q[2]) if q[2] > 0 else -np.inf) - y

    def jacobian(q):
        t = np.exp(q[0] + q[1] * xc)
        s = t + q[2]
        return np.stack([t / s, t * xc / s, 1.0 / s], axis=1)

    c_max = loss.min() * (1 - 1e-9)
    best = None
    for frac in (0.0, 0.25, 0.5, 0.75, 0.9, 0.97):
        c0 = frac * loss.min()
        slope, intercept = np.polyfit(xc, np.log(loss - c0), 1)
        q0 = np.array([intercept, slope, c0])
        bounds = ([-np.inf, -np.inf, 0.0], [np.inf, np.inf, c_max])
        res = least_squares(residual, q0, jac=jacobian, bounds=bounds, xtol=1e-14, ftol=1e-14, gtol=1e-14,
                            max_nfev=5000)  # fmt: skip
        if res.status > 0 and np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise FitDidNotConverge("compute fit did not converge from any start")
    la, b, c = best.x
    rmse = float(np.sqrt(np.mean(best.fun**2)))
    return ComputeFit(a=float(np.exp(la - b * mu)), b=float(b), c=float(c), rmse_log=rmse, n_points=len(C))
