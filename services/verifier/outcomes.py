"""The final answer of a response, as one short string per task: what outcome-based exploration
(Song, Kempe and Munos 2025) counts per prompt. Plain string work in the verifier's own process
(the answer is never run): the same extraction the graders start from, then a normal form so that
answers a grader treats alike mostly count alike.

- maze: the moves of the extracted answer (U, D, L, R; case and other characters dropped, as the
  checker drops them);
- math and puzzles: the last ``<answer>...</answer>`` (math: else the last ``\\boxed{}``), with
  white space collapsed and lower-cased. Two equivalent math answers in different forms (``0.5``
  and ``\\frac{1}{2}``) stay two outcomes: telling them apart would mean running math-verify on
  every pair.

An empty string means no answer at all; the trainer gives such responses no bonus.
"""

from __future__ import annotations

from services.verifier.maze import extract_answer
from services.verifier.tags import last_tagged

MAX_CHARS = 200  # a longer answer is cut: counts key on it, and Redis holds one field per outcome


def outcome(task: str, response: str) -> str:
    if task == "maze":
        return "".join(ch for ch in extract_answer(response).upper() if ch in "UDLR")[:MAX_CHARS]
    text = last_tagged(response)
    if text is None and task == "math" and "boxed" in response:
        text = extract_answer(response)  # the balanced braces of the last \boxed{}
    if text is None:
        return ""
    return " ".join(text.split()).lower()[:MAX_CHARS]
