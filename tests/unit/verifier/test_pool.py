import pytest

from services.common.schemas import VerdictStatus
from services.verifier.pool import GraderPool

MAZE = "S.E"


@pytest.fixture(scope="module")
def pool():
    pool = GraderPool(workers=2, timeout_s=1.0, graders="tests.helpers.graders")
    yield pool
    pool.close()


def test_verdicts_for_right_and_wrong_answers(pool):
    right, wrong = pool.grade_many("maze", ["RR", "R"], MAZE)
    assert (right.status, right.reward) == (VerdictStatus.CORRECT, 1.0)
    assert (wrong.status, wrong.reward) == (VerdictStatus.WRONG, 0.0)
    assert right.grader == "maze" and right.elapsed >= 0


def test_a_hung_grader_times_out_and_its_worker_is_replaced(pool):
    before = pool.timeouts
    verdict = pool.grade("sleep", "x", MAZE)
    assert verdict.status == VerdictStatus.TIMEOUT and "within 1 s" in verdict.detail
    assert pool.timeouts == before + 1
    # the pool still has two working workers
    assert [v.status for v in pool.grade_many("maze", ["RR"] * 4, MAZE)] == [VerdictStatus.CORRECT] * 4


def test_grader_failures_are_not_wrong_answers(pool):
    assert pool.grade("crash", "x", MAZE).status == VerdictStatus.GRADER_ERROR
    died = pool.grade("exit", "x", MAZE)
    assert died.status == VerdictStatus.GRADER_ERROR and "died" in died.detail
    invalid = pool.grade("maze", "R", "S.X")
    assert invalid.status == VerdictStatus.INVALID_REQUEST and "only hold" in invalid.detail
    unknown = pool.grade("sudoku", "R", MAZE)
    assert unknown.status == VerdictStatus.INVALID_REQUEST and "unknown task 'sudoku'" in unknown.detail
    assert pool.grade("maze", "RR", MAZE).status == VerdictStatus.CORRECT
