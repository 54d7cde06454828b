"""Math grading with math-verify.

The gold is LaTeX or a plain expression (``\\frac{3}{4}``, ``0.75``, ``x^2+1``).
The answer is the text of the last ``<answer>...</answer>`` if there is one,
else the whole response, where math-verify finds the last ``\\boxed{}``. An
answer math-verify cannot parse is wrong; a gold it cannot parse is an invalid
request. math-verify's own signal-based timeouts are off: they would turn a
slow parse into a silent "wrong", and signals never reach a hung GMP
computation anyway; the pool's wall-clock limit (a kill) turns it into a
``timeout`` verdict, which the trainer does not train on.
"""

from __future__ import annotations

import logging

from services.verifier.errors import InvalidReference
from services.verifier.tags import last_tagged


def answer_text(response: str) -> str:
    tagged = last_tagged(response)
    return tagged.strip() if tagged is not None else response


def _as_latex(text: str) -> str:
    """math-verify reads LaTeX between $...$ or in \\boxed{}; a bare gold is wrapped so it parses as LaTeX."""
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def grade(response: str, reference: str) -> float:
    from math_verify import parse, verify

    gold = parse(_as_latex(reference), parsing_timeout=None)
    if all(isinstance(g, str) for g in gold):  # math-verify keeps the raw text beside what it parsed
        raise InvalidReference(f"math-verify cannot parse the gold answer {reference[:200]!r}")
    text = answer_text(response)
    answer = parse(_as_latex(text) if text is not response else text, parsing_timeout=None)
    return 1.0 if answer and verify(gold, answer, timeout_seconds=None) else 0.0


def warm() -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call with timeouts off
    grade("\\boxed{\\frac{1}{2}}", "0.5")
