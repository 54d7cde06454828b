"""The statistics behind the report's numbers and verdicts."""

import math

import pytest
import torch

from services.experiment.results import Difference, average, mean_sd, paired, smooth, window_mean
from services.trainer.batch import negative_diversity


def test_average_is_over_the_sizes_asked_for():
    table = {7: {"pass@1": 0.5}, 9: {"pass@1": 0.1}, 21: {"pass@1": 0.0}}
    assert average(table, "pass@1") == pytest.approx(0.2)
    assert average(table, "pass@1", [7, 9]) == pytest.approx(0.3)


def test_paired_difference_uses_shared_seeds_only():
    d = paired({0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9}, {0: 0.4, 1: 0.4, 2: 0.4})
    assert d.values == pytest.approx((0.1, 0.2, 0.3))
    assert d.mean == pytest.approx(0.2)
    assert d.se == pytest.approx(0.1 / math.sqrt(3))
    with pytest.raises(ValueError, match="no seed"):
        paired({0: 1.0}, {1: 1.0})


@pytest.mark.parametrize(
    ("values", "clear"),
    [
        ((0.10, 0.12, 0.11), 1),  # all positive, far from 0
        ((-0.10, -0.12, -0.11), -1),
        ((0.10, -0.01, 0.12), 0),  # the seeds disagree
        ((0.01, 0.30, 0.01), 0),  # all positive but within two standard errors
        ((0.2,), 0),  # one seed says nothing
        ((0.004, 0.005, 0.006), 0),  # consistent but below a point
    ],
)
def test_a_difference_is_clear_only_when_seeds_agree_and_it_is_large(values, clear):
    mean, sd = mean_sd(list(values))
    se = sd / math.sqrt(len(values)) if len(values) > 1 else math.inf
    assert Difference(mean, se, values).clear == clear


def test_window_mean_skips_missing_values():
    steps = [{"x": float(i)} for i in range(10)]
    steps[9]["x"] = None
    assert window_mean(steps, "x", 0.8, 1.0) == 8.0  # step 9 has no value
    assert window_mean(steps, "x", 0.0, 0.1) == 0.0
    assert window_mean([{"y": 1}], "x", 0, 1) is None


def test_smooth_is_a_trailing_mean_that_keeps_gaps():
    assert smooth([1.0, 3.0, None, 5.0, 7.0], 2) == [1.0, 2.0, None, 4.0, 6.0]


def test_negative_diversity_counts_distinct_wrong_answers_per_prompt():
    responses = [
        [[1, 2], [1, 2], [3], [4]],  # wrong: [1,2] [1,2] [3] -> 2 distinct of 3; [4] is right
        [[5], [5], [5], [5]],  # all wrong and alike: 1 of 4
        [[6], [7], [8], [9]],  # one wrong only: left out
    ]
    rewards = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    valid = torch.ones(3, 4, dtype=torch.bool)
    assert negative_diversity(responses, rewards, valid) == pytest.approx((2 / 3 + 1 / 4) / 2)
    valid[1, 1:] = False  # a failed grading is not a wrong answer: prompt 1 has one left
    assert negative_diversity(responses, rewards, valid) == pytest.approx(2 / 3)
    assert negative_diversity(responses, torch.ones(3, 4, dtype=torch.float64), valid) is None
