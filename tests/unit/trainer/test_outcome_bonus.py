"""Outcome-based exploration (Song et al. 2025): the bonuses on hand-checked groups, and the counts
in a real Redis across steps, checkpoints, a restarted trainer and a resume."""

import math

import pytest
import redis
import torch

from services.trainer.outcome_bonus import OutcomeCounts, batch, historical, keys_of, ucb


def test_ucb_is_min_1_over_root_n_and_1_for_an_answer_never_seen():
    assert ucb(torch.tensor([0, 1, 4, 9, 100])).tolist() == pytest.approx([1, 1, 0.5, 1 / 3, 0.1])


# one group of four: answers seen 0, 4 and 16 times before, and one response without an answer
COUNTS = torch.tensor([[0, 4, 16, 0]])
ANSWERED = torch.tensor([[True, True, True, False]])


def test_ucb_mean_subtracts_the_groups_mean_bonus_over_its_answers():
    # b = 1, 1/2, 1/4 (and none); their mean 7/12
    expected = [1 - 7 / 12, 1 / 2 - 7 / 12, 1 / 4 - 7 / 12, 0]
    assert historical("ucb_mean", COUNTS, ANSWERED)[0].tolist() == pytest.approx(expected)
    assert historical("ucb_mean", COUNTS, ANSWERED)[0, :3].sum() == pytest.approx(0)


def test_ucb_and_ucb_con():
    assert historical("ucb", COUNTS, ANSWERED)[0].tolist() == pytest.approx([1, 0.5, 0.25, 0])
    # b0 = 0.5: an answer seen more than four times is pushed down
    assert historical("ucb_con", COUNTS, ANSWERED, b0=0.5)[0].tolist() == pytest.approx([0.5, 0, -0.25, 0])


def test_batch_penalizes_each_answer_by_its_repeats_in_the_group():
    outcomes = [["rrd", "rrd", "rrd", "ddr"], ["a", "", "a", "b"]]
    answered = torch.tensor([[True, True, True, True], [True, False, True, True]])
    penalty = batch(outcomes, answered)
    assert penalty[0].tolist() == pytest.approx([-2 / 4, -2 / 4, -2 / 4, 0])
    assert penalty[1].tolist() == pytest.approx([-1 / 4, 0, -1 / 4, 0])  # the unanswered one neither counts nor pays


def test_batch_matches_its_formula_on_random_groups():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(2, 9, (1,), generator=generator))
        outcomes = [[str(int(torch.randint(0, 3, (1,), generator=generator))) for _ in range(n)]]
        answered = torch.rand(1, n, generator=generator) > 0.2
        direct = [
            -sum(1 for j in range(n) if j != i and answered[0, j] and outcomes[0][j] == outcomes[0][i]) / n
            if answered[0, i]
            else 0.0
            for i in range(n)
        ]
        assert batch(outcomes, answered)[0].tolist() == pytest.approx(direct)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="not a historical mode"):
        historical("batch", COUNTS, ANSWERED)


def keys(prompt: str, answers: list[str]) -> list[list[str | None]]:
    answered = torch.tensor([[bool(a) for a in answers]])
    return keys_of([prompt], [answers], answered)


def test_counts_per_prompt_and_answer_across_steps(redis_client):
    counts = OutcomeCounts(redis_client, "runs/a")
    counts.reset()
    step1 = keys("p1", ["RRD", "RRD", "DDR", ""])
    assert counts.lookup(step1).tolist() == [[0, 0, 0, 0]]  # before the step's own answers
    counts.add(1, step1)
    assert counts.lookup(step1).tolist() == [[2, 2, 1, 0]]
    assert counts.lookup(keys("p2", ["RRD"])).tolist() == [[0]]  # another prompt's answers are its own
    other_run = OutcomeCounts(redis_client, "runs/b")
    assert other_run.lookup(step1).tolist() == [[0, 0, 0, 0]]


def test_counts_outlive_the_trainer_and_a_resume_undoes_the_steps_after_its_checkpoint(redis_server, redis_client):
    first = OutcomeCounts(redis_client, "runs/r")
    first.reset()
    first.add(1, keys("p", ["A", "A"]))
    first.add(2, keys("p", ["A", "B"]))
    first.finalize(2)  # a checkpoint at step 2
    first.add(3, keys("p", ["B", "B", "C"]))  # then the trainer dies before the next checkpoint
    restarted = OutcomeCounts(redis.Redis.from_url(redis_server.url), "runs/r")  # a new process
    probe = keys("p", ["A", "B", "C"])
    assert restarted.lookup(probe).tolist() == [[3, 3, 1]]
    assert restarted.rewind(2) == 1  # resumed from step 2: step 3 is trained again
    assert restarted.lookup(probe).tolist() == [[3, 1, 0]]
    assert restarted.rewind(2) == 0  # nothing twice
    restarted.add(3, keys("p", ["C"]))
    assert restarted.lookup(probe).tolist() == [[3, 1, 1]]
    restarted.reset()  # a fresh run of the same name
    assert restarted.lookup(probe).tolist() == [[0, 0, 0]]
    assert not redis_client.keys("passk:outcomes:runs/r*")


def test_the_field_names_keep_prompt_and_answer_apart():
    # "p1" + "2" and "p" + "12" must not be one field
    assert keys("p1", ["2"]) != keys("p", ["12"])
    assert math.isclose(float(ucb(torch.tensor([2]))), 1 / math.sqrt(2))
