"""Arithmetic in F7[X]/(X^5) and the expression language of the polynomial experiment."""

import random

import pytest

from multitoken.studies.corpora import poly_ring as pr
from multitoken.studies.corpora.poly_ring import X, add, compose, mul, neg, poly


def test_hand_checked_examples():
    assert mul(poly(1, 1), poly(1, 1)) == poly(1, 2, 1)  # (1 + x)^2
    assert mul(poly(0, 0, 0, 1), poly(0, 0, 0, 1)) == poly()  # x^6 = 0 mod x^5
    assert mul(poly(0, 6), poly(0, 6)) == poly(0, 0, 1)  # 36 x^2 = x^2 mod 7
    assert add(poly(3, 4), poly(5, 3)) == poly(1, 0)
    assert neg(poly(1, 0, 6)) == poly(6, 0, 1)
    assert compose(poly(0, 0, 1), poly(1, 1)) == poly(1, 2, 1)  # (x + 1)^2
    assert compose(poly(2, 3), poly(0, 0, 1)) == poly(2, 0, 3)  # 2 + 3x^2
    assert compose(poly(0, 0, 0, 0, 1), poly(1, 1)) == poly(1, 4, 6, 4, 1)  # (x + 1)^4
    assert compose(X, poly(4, 5, 6)) == poly(4, 5, 6)


def _polys(seed, count):
    rng = random.Random(seed)
    return [pr.random_poly(rng) for _ in range(count)]


def test_ring_axioms_on_random_polynomials():
    rng = random.Random(1)
    for _ in range(200):
        p, q, r = (pr.random_poly(rng) for _ in range(3))
        assert mul(p, add(q, r)) == add(mul(p, q), mul(p, r))
        assert mul(mul(p, q), r) == mul(p, mul(q, r))
        assert mul(p, q) == mul(q, p)
        assert add(p, neg(p)) == pr.ZERO
        assert mul(p, pr.ONE) == p
        assert compose(add(p, q), r) == add(compose(p, r), compose(q, r))
        assert compose(p, X) == p and compose(X, p) == p


def test_composition_associative_when_inner_has_no_constant_term():
    rng = random.Random(2)
    for _ in range(200):
        p, q, r = (pr.random_poly(rng) for _ in range(3))
        r0 = (0, *r[1:])  # r(0) = 0: r^5 = 0 mod x^5, so truncating p o q first loses nothing
        assert compose(compose(p, q), r0) == compose(p, compose(q, r0))
        assert compose(mul(p, q), r0) == mul(compose(p, r0), compose(q, r0))


def test_composition_matches_full_polynomial_composition():
    """Compose without truncation (integer coefficients), then reduce: same as the ring operation."""
    for p, q in zip(_polys(3, 50), _polys(4, 50), strict=True):
        full = [0]
        for a in reversed(p):  # Horner on untruncated coefficient lists
            prod = [0] * (len(full) + len(q) - 1)
            for i, x in enumerate(full):
                for j, y in enumerate(q):
                    prod[i + j] += x * y
            prod[0] += a
            full = prod
        assert compose(p, q) == poly(*full[:5])


@pytest.mark.parametrize("n_ops", [0, 1, 3, 7, 10])
def test_generator_parser_round_trip(n_ops):
    rng = random.Random(n_ops)
    for _ in range(30):
        expr = pr.random_expr(rng, n_ops)
        assert expr.n_ops() == n_ops
        parsed = pr.parse(expr.text())
        assert parsed == expr and parsed.evaluate() == expr.evaluate()


def test_problem_text_and_parse_errors():
    expr = pr.parse("(11000*11000)")
    assert pr.problem_text(expr) == ("(11000*11000)=", "12100")
    assert pr.parse("-(10000o01000)").evaluate() == poly(6)
    for bad in ("(11000*11000", "1100", "(11000?11000)", "11000)", "17000"):
        with pytest.raises(ValueError):
            pr.parse(bad)


@pytest.mark.parametrize("n_ops", [0, 2, 6])
def test_tagged_encoding_spells_the_same_expressions(n_ops):
    rng = random.Random(100 + n_ops)
    for _ in range(30):
        expr = pr.random_expr(rng, n_ops)
        tagged = expr.text("tagged")
        assert len(tagged) == len(expr.text())
        # the same expression, value and answer; each coefficient's character names its degree
        assert pr.parse(tagged, "tagged") == expr
        prompt, answer = pr.problem_text(expr, "tagged")
        assert prompt == tagged + "="
        assert answer == pr.to_text(expr.evaluate(), "tagged")
        for d, ch in enumerate(answer):
            assert pr.TAGGED[d].index(ch) == expr.evaluate()[d]


def test_tagged_alphabets_are_distinct_and_no_operator():
    chars = "".join(pr.TAGGED)
    assert len(set(chars)) == pr.P * pr.DEGREE and not set(chars) & set("()+*o-=")
    assert pr.to_text(poly(3, 0, 1), "tagged") == "3aipA"
    for bad in ("3aipA0", "30100", "a3hpA"):  # wrong length, plain digits, degrees out of place
        with pytest.raises(ValueError):
            pr.parse(bad, "tagged")
