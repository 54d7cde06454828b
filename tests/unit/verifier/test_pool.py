import os
import signal
import threading
import time

import pytest

from services.common.schemas import VerdictStatus
from services.verifier.pool import GraderPool

MAZE = "S.E"


@pytest.fixture(scope="module")
def pool():
    pool = GraderPool(workers=2, timeout_s=1.0, graders="tests.helpers.graders")
    yield pool
    pool.close()


def wait_for(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_verdicts_for_right_and_wrong_answers(pool):
    right, wrong = pool.grade_many("maze", ["RR", "R"], MAZE)
    assert (right.status, right.reward) == (VerdictStatus.CORRECT, 1.0)
    assert (wrong.status, wrong.reward) == (VerdictStatus.WRONG, 0.0)
    assert right.grader == "maze" and right.elapsed >= 0


def test_a_hung_grader_times_out_and_its_worker_is_replaced(pool):
    before = pool.restarts["timeout"]
    verdict = pool.grade("sleep", "x", MAZE)
    assert verdict.status == VerdictStatus.TIMEOUT and "within 1 s" in verdict.detail
    assert verdict.elapsed < 2.0  # the kill, not the grader, ended it
    assert pool.restarts["timeout"] == before + 1
    wait_for(lambda: len(pool.pids()) == 2)
    assert [v.status for v in pool.grade_many("maze", ["RR"] * 4, MAZE)] == [VerdictStatus.CORRECT] * 4


def test_grader_failures_are_not_wrong_answers(pool):
    assert pool.grade("crash", "x", MAZE).status == VerdictStatus.GRADER_ERROR
    died = pool.grade("exit", "x", MAZE)
    assert died.status == VerdictStatus.GRADER_ERROR and "died (exit code 3)" in died.detail
    invalid = pool.grade("maze", "R", "S.X")
    assert invalid.status == VerdictStatus.INVALID_REQUEST and "only hold" in invalid.detail
    unknown = pool.grade("sudoku", "R", MAZE)
    assert unknown.status == VerdictStatus.INVALID_REQUEST and "unknown task 'sudoku'" in unknown.detail
    assert pool.grade("maze", "RR", MAZE).status == VerdictStatus.CORRECT


def test_killing_a_worker_mid_grade_gives_grader_error_and_a_replacement():
    pool = GraderPool(workers=1, timeout_s=60.0, graders="tests.helpers.graders")
    try:
        (victim,) = pool.pids()
        result = {}
        grading = threading.Thread(target=lambda: result.setdefault("v", pool.grade("sleep", "x", MAZE)))
        grading.start()
        wait_for(lambda: pool._idle.qsize() == 0)  # the worker has the answer
        os.kill(victim, signal.SIGKILL)
        grading.join(30)
        assert result["v"].status == VerdictStatus.GRADER_ERROR and "died" in result["v"].detail
        assert result["v"].elapsed < 30  # not the 60 s limit: the death is noticed at once
        wait_for(lambda: len(pool.pids()) == 1)
        assert pool.pids() != [victim] and pool.restarts["died"] == 1
        assert pool.grade("maze", "RR", MAZE).status == VerdictStatus.CORRECT
    finally:
        pool.close()


async def _grade_async(pool):
    return await pool.grade_many_async("maze", ["RR", "R", "DD"], MAZE)


def test_grading_from_async_code(pool):
    import asyncio

    verdicts = asyncio.run(_grade_async(pool))
    assert [v.status for v in verdicts] == [VerdictStatus.CORRECT, VerdictStatus.WRONG, VerdictStatus.WRONG]


def test_the_pool_refuses_bad_settings():
    with pytest.raises(ValueError, match="workers >= 1"):
        GraderPool(workers=0)
    with pytest.raises(RuntimeError, match="failed to start"):
        GraderPool(workers=1, graders="services.no_such_module")


def test_each_answer_of_a_batch_has_its_own_time_limit(pool):
    """Hangs amid normal answers: each hang times out alone and every other answer is still graded."""
    answers = ["ok = 1", "while True: pass", "ok = 0", "ok = 1", "while True: pass", "ok = 1", "ok = 1"]
    verdicts = pool.grade_many("exec", answers, "")
    assert [v.status.value for v in verdicts] == [
        "correct", "timeout", "wrong", "correct", "timeout", "correct", "correct",
    ]  # fmt: skip
    assert all(v.elapsed < 2.0 for v in verdicts)  # the 1 s limit, per answer, not per batch
