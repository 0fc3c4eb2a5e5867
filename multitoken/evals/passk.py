"""The unbiased pass@k estimator of the Codex paper (Chen et al., 2021) and its average over tasks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from multitoken.errors import UserError

DEFAULT_KS = (1, 10, 100)


def pass_at_k(n_samples: int, n_correct: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) passes: 1 - C(n-c, k) / C(n, k).

    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms huge binomials.
    """
    if not 0 <= n_correct <= n_samples:
        raise UserError(f"need 0 <= correct <= samples; got correct={n_correct}, samples={n_samples}")
    if k < 1:
        raise UserError(f"k must be at least 1; got {k}")
    if k > n_samples:
        raise UserError(f"k={k} needs at least {k} samples per task; got {n_samples}")
    if n_samples - n_correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n_samples - n_correct + 1, n_samples + 1)))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Average pass@k over tasks given ``(n_samples, n_correct)`` per task, for every k in ``ks``.

    Every requested k must fit every task: k larger than a task's sample count raises UserError.
    """
    counts = list(counts)
    if not counts:
        raise UserError("no tasks to compute pass@k over")
    fewest = min(n for n, _ in counts)
    for k in ks:
        if k > fewest:
            raise UserError(f"k={k} needs at least {k} samples per task; got {fewest}")
    return {k: float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks}
