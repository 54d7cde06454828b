"""A small built-in math set with known answers, for tests and demos: integer
arithmetic, fractions, linear equations and quadratics with integer roots,
generated with a seed. Answers are LaTeX or plain numbers, as math-verify reads
them (services.verifier.math_answers)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from fractions import Fraction

from services.tasks.records import TaskItem

INSTRUCTION = "\n\nGive the final answer in \\boxed{}."


def _latex(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 999)
    op = rng.choice("+-")
    value = a * b + c if op == "+" else a * b - c
    return f"Compute ${a} \\times {b} {op} {c}$.", str(value)


def fractions(rng: random.Random) -> tuple[str, str]:
    p, q = Fraction(rng.randint(1, 9), rng.randint(2, 12)), Fraction(rng.randint(1, 9), rng.randint(2, 12))
    op = rng.choice("+-")
    value = p + q if op == "+" else p - q
    return f"Compute ${_latex(p)} {op} {_latex(q)}$ as a fraction in lowest terms.", _latex(value)


def linear(rng: random.Random) -> tuple[str, str]:
    x, a = rng.randint(-20, 20), rng.choice([n for n in range(-9, 10) if n not in (0, 1)])
    b = rng.randint(-50, 50)
    return f"Solve for $x$: ${a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}$.", str(x)


def quadratic(rng: random.Random) -> tuple[str, str]:
    r, s = rng.randint(-12, 12), rng.randint(-12, 12)
    b, c = -(r + s), r * s
    equation = f"x^2 {'+' if b >= 0 else '-'} {abs(b)}x {'+' if c >= 0 else '-'} {abs(c)} = 0"
    return f"What is the product of the roots of ${equation}$, counted with multiplicity?", str(c)


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": arithmetic,
    "fractions": fractions,
    "linear": linear,
    "quadratic": quadratic,
}


def build_splits(
    train_per_kind: int, test_per_kind: int, seed: int, kinds: Sequence[str] | None = None
) -> dict[str, list[TaskItem]]:
    """Train and test splits per kind of problem (of ``kinds`` only, when given); a question is in at
    most one split."""
    if train_per_kind < 0 or test_per_kind < 0:
        raise ValueError("items per kind must be >= 0")
    unknown = sorted(set(kinds or ()) - set(GENERATORS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; the generator has {', '.join(GENERATORS)}")
    rng = random.Random(seed)
    splits: dict[str, list[TaskItem]] = {"test": [], "train": []}
    for kind in dict.fromkeys(kinds or GENERATORS):  # each kind once, in the order given
        make = GENERATORS[kind]
        seen: set[str] = set()
        for split, count in (("test", test_per_kind), ("train", train_per_kind)):
            made, tries = 0, 0
            while made < count and tries < 50 * count:  # small problem spaces run out rather than loop
                tries += 1
                question, answer = make(rng)
                if question in seen:
                    continue
                seen.add(question)
                item_id = f"{kind}-{split}-{made}"
                splits[split].append(TaskItem(item_id, "math", kind, question + INSTRUCTION, answer, answer))
                made += 1
    return splits
