"""Arithmetic in F7[X]/(X^5) and the expression language of the polynomial experiment (paper §4.2).

A polynomial is a tuple of DEGREE coefficients mod P, constant term first; its canonical text is those
digits, e.g. 3 + x^2 is "30100". Expressions:

    expr := poly | "-" expr | "(" expr op expr ")"      op: "+" add, "*" multiply, "o" compose

`p o q` is p(q(X)) mod X^5. A training document is `expr=answer`, e.g. "(30100*01000)=03010".

The "tagged" encoding spells the coefficient c of X^d with a character of its own per degree,
TAGGED[d][c] (one byte each, none an operator), so a model can match coefficients of equal degree by
content instead of by counting positions: 3 + x^2 is "3aipA".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

P = 7
"""The field F_7."""
DEGREE = 5
"""Polynomials are taken mod X^5: five coefficients."""
OPS = ("neg", "+", "*", "o")
"""Operations: negation, addition, multiplication, composition."""

Poly = tuple[int, ...]

TAGGED = ("0123456", "abcdefg", "hijklmn", "pqrstuv", "ABCDEFG")
"""Tagged encoding: TAGGED[d][c] is coefficient c of X^d ("o", the compose operator, is skipped)."""
ENCODINGS = ("digits", "tagged")
"""How coefficients are spelled: plain digits, or tagged with their degree."""


def poly(*coefficients: int) -> Poly:
    """The polynomial with these coefficients (constant first), reduced mod P and padded to DEGREE."""
    coeffs = [c % P for c in coefficients[:DEGREE]]
    return tuple(coeffs + [0] * (DEGREE - len(coeffs)))


ZERO = poly()
ONE = poly(1)
X = poly(0, 1)


def neg(p: Poly) -> Poly:
    return tuple((-a) % P for a in p)


def add(p: Poly, q: Poly) -> Poly:
    return tuple((a + b) % P for a, b in zip(p, q, strict=True))


def mul(p: Poly, q: Poly) -> Poly:
    """p * q with the terms of degree >= DEGREE dropped."""
    out = [0] * DEGREE
    for i, a in enumerate(p):
        if a:
            for j in range(DEGREE - i):
                out[i + j] += a * q[j]
    return tuple(c % P for c in out)


def compose(p: Poly, q: Poly) -> Poly:
    """p(q(X)) mod X^5, by Horner's rule."""
    out = poly(p[-1])
    for a in reversed(p[:-1]):
        out = add(mul(out, q), poly(a))
    return out


def to_text(p: Poly, encoding: str = "digits") -> str:
    """The coefficients, constant first: digits "30100", or tagged "3aipA"."""
    if encoding == "tagged":
        return "".join(TAGGED[d][c] for d, c in enumerate(p))
    return "".join(str(c) for c in p)


@dataclass(frozen=True)
class Expr:
    """A node: a literal (`op` "lit", `value`), a negation (`left`) or a binary operation (`left`, `right`)."""

    op: str
    """lit, neg, +, * or o."""
    value: Poly | None = None
    """The polynomial of a literal."""
    left: Expr | None = None
    """Operand of neg, or left operand."""
    right: Expr | None = None
    """Right operand of a binary operation."""

    def evaluate(self) -> Poly:
        if self.op == "lit":
            return self.value
        if self.op == "neg":
            return neg(self.left.evaluate())
        a, b = self.left.evaluate(), self.right.evaluate()
        return {"+": add, "*": mul, "o": compose}[self.op](a, b)

    def n_ops(self) -> int:
        """Number of operations (negations and binary operations)."""
        if self.op == "lit":
            return 0
        return 1 + self.left.n_ops() + (self.right.n_ops() if self.right is not None else 0)

    def text(self, encoding: str = "digits") -> str:
        if self.op == "lit":
            return to_text(self.value, encoding)
        if self.op == "neg":
            return "-" + self.left.text(encoding)
        return f"({self.left.text(encoding)}{self.op}{self.right.text(encoding)})"


def random_poly(rng: random.Random) -> Poly:
    """A uniform random polynomial of degree < DEGREE."""
    return tuple(rng.randrange(P) for _ in range(DEGREE))


def random_expr(rng: random.Random, n_ops: int) -> Expr:
    """A random expression with exactly `n_ops` operations, each operation uniform over OPS."""
    if n_ops == 0:
        return Expr("lit", value=random_poly(rng))
    op = rng.choice(OPS)
    if op == "neg":
        return Expr("neg", left=random_expr(rng, n_ops - 1))
    left_ops = rng.randrange(n_ops)
    return Expr(op, left=random_expr(rng, left_ops), right=random_expr(rng, n_ops - 1 - left_ops))


def parse(text: str, encoding: str = "digits") -> Expr:
    """The expression `text` spells in `encoding`; ValueError on anything else."""
    alphabets = TAGGED if encoding == "tagged" else ("0123456",) * DEGREE
    expr, end = _parse_at(text, 0, alphabets)
    if end != len(text):
        raise ValueError(f"unexpected {text[end:]!r} at position {end}")
    return expr


def _parse_at(text: str, i: int, alphabets: tuple[str, ...]) -> tuple[Expr, int]:
    if i >= len(text):
        raise ValueError("unexpected end of expression")
    if text[i] == "-":
        inner, i = _parse_at(text, i + 1, alphabets)
        return Expr("neg", left=inner), i
    if text[i] == "(":
        left, i = _parse_at(text, i + 1, alphabets)
        if i >= len(text) or text[i] not in "+*o":
            raise ValueError(f"expected an operator at position {i}")
        op = text[i]
        right, i = _parse_at(text, i + 1, alphabets)
        if i >= len(text) or text[i] != ")":
            raise ValueError(f"expected ')' at position {i}")
        return Expr(op, left=left, right=right), i + 1
    chars = text[i : i + DEGREE]
    if len(chars) != DEGREE or any(
        ch not in alphabet for ch, alphabet in zip(chars, alphabets, strict=False)
    ):
        raise ValueError(f"expected {DEGREE} coefficients 0-{P - 1} at position {i}")
    return Expr("lit", value=tuple(a.index(ch) for ch, a in zip(chars, alphabets, strict=True))), i + DEGREE


def problem_text(expr: Expr, encoding: str = "digits") -> tuple[str, str]:
    """(prompt, answer): "expr=" and the text of its value, in `encoding`."""
    return expr.text(encoding) + "=", to_text(expr.evaluate(), encoding)
