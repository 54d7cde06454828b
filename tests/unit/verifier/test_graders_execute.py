"""Which graders execute answer text, called here in this process (no sandbox) with answers that
would leave a file behind if they ran: the pool batches only the graders shown not to (``BATCHED``)."""

import json

import pytest

from services.tasks.puzzles import generate
from services.verifier.graders import BATCHED, GRADERS


def payloads(marker) -> list[str]:
    code = f"open({str(marker)!r}, 'w').close()"
    forms = [code, f"exec({code!r})", f"__import__('builtins').exec({code!r})", f"(lambda: {code})()"]
    return [wrap.format(f) for f in forms for wrap in ("{}", "<answer>{}</answer>", "\\boxed{{{}}}")]


def test_only_the_maze_checker_batches():
    assert BATCHED == {"maze"}


def test_the_maze_checker_never_runs_an_answer(tmp_path):
    marker = tmp_path / "ran"
    for answer in payloads(marker):
        assert GRADERS["maze"](answer, "S.E") == 0.0
    assert not marker.exists()


def test_a_puzzle_scorer_runs_answers_as_code(tmp_path):
    """reasoning-gym's n_queens ``eval``s the answer: puzzle answers must each have a grader of their own."""
    [(config, entry)] = generate("n_queens", 1, seed=3)
    reference = json.dumps({"dataset": "n_queens", "config": config, "entry": entry}, default=list)
    marker = tmp_path / "ran"
    GRADERS["puzzle"](f"<answer>open({str(marker)!r}, 'w').close()</answer>", reference)
    assert marker.exists()


@pytest.mark.parametrize("task", sorted(set(GRADERS) - {"maze"}))
def test_every_other_grader_is_not_batched(task):
    """math-verify hands expressions to sympy's parse_expr, which evaluates Python; no payload of ours got
    through its extraction, but that is not a proof, so math answers are graded one per process too."""
    assert task not in BATCHED
