"""The order of grading: round-robin between requests, budgets, cancellation (no processes here)."""

from services.common.schemas import Verdict, VerdictStatus
from services.verifier.scheduler import Request, Scheduler


def verdict(elapsed: float) -> Verdict:
    return Verdict(reward=1.0, status=VerdictStatus.CORRECT, grader="t", elapsed=elapsed)


def test_requests_take_turns_answer_by_answer():
    scheduler = Scheduler(batch_size=4)
    slow = Request("t", ["a"] * 5, "", budget_s=100, batched=False)
    quick = Request("t", ["b"], "", budget_s=100, batched=False)
    scheduler.submit(slow)
    assert scheduler.take() == (slow, [0])
    scheduler.submit(quick)
    assert scheduler.take() == (slow, [1])  # slow was first in line again
    assert scheduler.take() == (quick, [0])  # then quick: it waits one answer, not slow's five
    assert scheduler.take() == (slow, [2])
    assert scheduler.in_flight == 4


def test_batching_graders_take_a_batch():
    scheduler = Scheduler(batch_size=4)
    request = Request("maze", ["a"] * 6, "", budget_s=100, batched=True)
    scheduler.submit(request)
    assert scheduler.take() == (request, [0, 1, 2, 3])
    assert scheduler.take() == (request, [4, 5])


def test_a_spent_budget_fails_the_answers_left_without_grading():
    scheduler = Scheduler(batch_size=1)
    request = Request("t", ["a"] * 4, "", budget_s=5.0, batched=False)
    scheduler.submit(request)
    _, [i] = scheduler.take()
    request.record(i, verdict(6.0))  # over the budget
    closer = Request("t", ["b"], "", budget_s=5.0, batched=False)
    scheduler.submit(closer)
    assert scheduler.take() == (closer, [0])  # the spent request was skipped, its answers failed
    assert request.done.is_set()
    assert [v.status for v in request.verdicts[1:]] == [VerdictStatus.TIMEOUT] * 3
    assert all("budget of 5 s" in v.detail for v in request.verdicts[1:])


def test_cancel_kills_what_runs_and_fails_the_rest():
    scheduler = Scheduler(batch_size=1)
    request = Request("t", ["a"] * 3, "", budget_s=100, batched=False)
    scheduler.submit(request)
    _, [i] = scheduler.take()
    killed = []
    assert request.running(lambda: killed.append(i))
    request.cancel()
    assert killed == [0] and request.done.is_set()
    assert all(v.status == VerdictStatus.GRADER_ERROR and "cancelled" in v.detail for v in request.verdicts)
    assert not request.running(lambda: None)  # nothing new starts for it
    scheduler.submit(Request("t", ["b"], "", budget_s=100, batched=False))
    assert scheduler.take()[0] is not request
    request.record(0, verdict(0.1))  # a late verdict does not overwrite
    assert request.verdicts[0].status == VerdictStatus.GRADER_ERROR


def test_close_releases_waiting_graders_and_requests():
    scheduler = Scheduler(batch_size=1)
    request = Request("t", ["a"], "", budget_s=100, batched=False)
    scheduler.submit(request)
    scheduler.close()
    assert scheduler.take() is None
    assert request.done.is_set() and "stopping" in request.verdicts[0].detail


def test_a_batched_request_is_spread_over_the_graders():
    scheduler = Scheduler(batch_size=512, spread=2)
    request = Request("maze", ["a"] * 256, "", budget_s=100, batched=True)
    scheduler.submit(request)
    assert [len(scheduler.take()[1]) for _ in range(2)] == [128, 128]
