import asyncio
import os
import signal
import threading

import pytest

from services.common.schemas import VerdictStatus
from services.verifier.pool import GraderPool, TemplateDown, parse_replies
from tests.helpers.procs import wait_for

MAZE = "S.E"


@pytest.fixture(scope="module")
def pool():
    pool = GraderPool(workers=2, timeout_s=1.0, graders="tests.helpers.graders")
    yield pool
    pool.close()


def sleeping_grader(pool: GraderPool) -> int | None:
    """The pid of the grader that runs the ``sleep`` test grader (it leaves a file in its workdir)."""
    for marker in pool.workbase.glob("*/sleeping"):
        return int(marker.parent.name)
    return None


def test_verdicts_for_right_and_wrong_answers(pool):
    right, wrong = pool.grade_many("maze", ["RR", "R"], MAZE)
    assert (right.status, right.reward) == (VerdictStatus.CORRECT, 1.0)
    assert (wrong.status, wrong.reward) == (VerdictStatus.WRONG, 0.0)
    assert right.grader == "maze" and right.elapsed >= 0


def test_a_hung_grader_times_out_and_the_next_answer_is_graded(pool):
    before = pool.restarts["timeout"]
    verdict = pool.grade("sleep", "x", MAZE)
    assert verdict.status == VerdictStatus.TIMEOUT and "within 1 s" in verdict.detail
    assert pool.restarts["timeout"] == before + 1
    assert pool.grade("exec", "ok = 1", "").status == VerdictStatus.CORRECT
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


def test_killing_a_grader_mid_grade_gives_grader_error():
    pool = GraderPool(workers=1, timeout_s=600.0, graders="tests.helpers.graders")
    try:
        result = {}
        grading = threading.Thread(target=lambda: result.setdefault("v", pool.grade("sleep", "x", MAZE)))
        grading.start()
        victim = wait_for(lambda: sleeping_grader(pool))
        os.kill(victim, signal.SIGKILL)
        grading.join(60)
        assert result["v"].status == VerdictStatus.GRADER_ERROR and "died" in result["v"].detail
        assert pool.restarts["died"] == 1
        assert pool.grade("maze", "RR", MAZE).status == VerdictStatus.CORRECT
        assert victim not in pool.pids()
    finally:
        pool.close()


def test_grading_from_async_code(pool):
    verdicts = asyncio.run(pool.grade_many_async("maze", ["RR", "R", "DD"], MAZE))
    assert [v.status for v in verdicts] == [VerdictStatus.CORRECT, VerdictStatus.WRONG, VerdictStatus.WRONG]


def test_cancelling_an_async_grading_kills_what_it_runs():
    pool = GraderPool(workers=1, timeout_s=600.0, graders="tests.helpers.graders")

    async def cancel_while_sleeping():
        task = asyncio.ensure_future(pool.grade_many_async("sleep", ["x", "x", "x"], MAZE))
        while sleeping_grader(pool) is None:
            await asyncio.sleep(0.05)
        victim = sleeping_grader(pool)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return victim

    try:
        victim = asyncio.run(cancel_while_sleeping())
        wait_for(lambda: pool.in_flight() == 0)
        assert victim not in pool.pids()
        assert pool.restarts["died"] == 0  # a kill the request asked for is not a grader failure
        assert pool.grade("maze", "RR", MAZE).status == VerdictStatus.CORRECT
    finally:
        pool.close()


def test_the_pool_refuses_bad_settings():
    with pytest.raises(ValueError, match="workers >= 1"):
        GraderPool(workers=0)
    with pytest.raises((TemplateDown, ModuleNotFoundError), match="no_such_module"):
        GraderPool(workers=1, graders="services.no_such_module")


def test_each_answer_has_its_own_time_limit(pool):
    """Hangs amid normal answers: each hang times out alone and every other answer is still graded."""
    answers = ["ok = 1", "while True: pass", "ok = 0", "ok = 1", "while True: pass", "ok = 1", "ok = 1"]
    verdicts = pool.grade_many("exec", answers, "")
    assert [v.status.value for v in verdicts] == [
        "correct", "timeout", "wrong", "correct", "timeout", "correct", "correct",
    ]  # fmt: skip


def test_no_answer_sees_what_an_earlier_one_left(pool):
    """Siblings of one request and later requests: each executing answer starts from a clean process."""
    plant = "import sys; sys.modules['services.verifier.graders'].PLANTED = 1; ok = 1"
    look = "import sys; ok = not hasattr(sys.modules['services.verifier.graders'], 'PLANTED')"
    verdicts = pool.grade_many("exec", [plant, look, look, look], "")
    assert [v.status for v in verdicts] == [VerdictStatus.CORRECT] * 4
    assert pool.grade("exec", look, "").status == VerdictStatus.CORRECT


def test_a_grader_can_only_set_its_own_verdict(pool):
    """An answer that writes a forged reply for many answers on its socket gets a bad reply, and no other
    answer's verdict comes from it."""
    forge = (
        "import json, os, struct\n"
        "body = json.dumps([['ok', 1.0, '']] * 8).encode()\n"
        "for fd in range(3, 64):\n"
        "    try: os.write(fd, struct.pack('!I', len(body)) + body)\n"
        "    except OSError: pass\n"
        "ok = 0\n"
    )
    verdicts = pool.grade_many("exec", [forge, "ok = 0", "ok = 0"], "")
    assert verdicts[0].status in (VerdictStatus.GRADER_ERROR, VerdictStatus.CORRECT, VerdictStatus.WRONG)
    assert [v.status for v in verdicts[1:]] == [VerdictStatus.WRONG] * 2


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"x": 1}, "expected 1 to 2 replies"),
        ([], "expected 1 to 2 replies"),
        ([["ok", 1.0, ""]] * 3, "expected 1 to 2 replies"),
        ([["correct", 1.0, ""], ["ok", 1.0, ""]], "bad status"),
        ([["ok", 7.0, ""], ["ok", 1.0, ""]], "not in [0, 1]"),
        ([["ok", float("nan"), ""], ["ok", 1.0, ""]], "not in [0, 1]"),
        ([["ok", True, ""], ["ok", 1.0, ""]], "not in [0, 1]"),
        ([["ok", 1.0], ["ok", 1.0, ""]], "not [status, reward, detail]"),
        ([["ok", 1.0, "x" * 2000], ["ok", 1.0, ""]], "bad status or detail"),
    ],
)
def test_replies_are_checked_field_by_field(message, error):
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]")):
        parse_replies(message, 2)
    assert parse_replies([["ok", 1, ""], ["grader_error", 0.0, "x"]], 2) == [
        ("ok", 1.0, ""),
        ("grader_error", 0.0, "x"),
    ]
