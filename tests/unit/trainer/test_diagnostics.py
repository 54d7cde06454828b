"""Where a step's advantage mass goes: η by accuracy bucket, groups without gradient, α_k, and
|advantage| of correct and wrong answers, on a hand-checked batch."""

import pytest
import torch

from services.trainer.advantage import compute_advantages
from services.trainer.diagnostics import advantage_diagnostics


def test_hand_checked_batch():
    rewards = torch.tensor([
        [1.0, 0, 0, 0, 0, 0, 0, 0],  # 1/8
        [1.0, 1, 1, 1, 0, 0, 0, 0],  # 4/8
        [1.0, 1, 1, 1, 1, 1, 1, 1],  # 8/8: all right
        [0.0, 0, 0, 0, 0, 0, 0, 0],  # 0/8: all wrong
        [1.0, 0, 0, 0, 0, 0, 0, 0],  # 1/8 again, two of its answers failed grading: 1 of 6
    ])  # fmt: skip
    valid = torch.ones_like(rewards, dtype=torch.bool)
    valid[4, 6:] = False
    advantages = torch.tensor([[7.0, -1, -1, -1, -1, -1, -1, -1], [1.0] * 4 + [-1.0] * 4, [0.0] * 8, [0.0] * 8,
                               [5.0, -1, -1, -1, -1, -1, 9, 9]])  # fmt: skip
    got = advantage_diagnostics(advantages, rewards, valid, k=2)
    # rows 0 and 4 are both in 1/8 (1/6 = 0.167 is in [1/8, 2/8)); the padding's 9s never count
    assert got["eta_by_accuracy"] == {"0/8": 0.0, "1/8": (14 + 10) / 2, "4/8": 8.0, "8/8": 0.0}
    assert (got["all_wrong_fraction"], got["all_right_fraction"]) == (0.2, 0.2)
    alphas = [2 * (1 - p) for p in (1 / 8, 4 / 8, 1.0, 0.0, 1 / 6)]  # k (1 - p)^(k - 1)
    assert got["alpha_k_mean"] == pytest.approx(sum(alphas) / 5)
    assert got["adv_abs_mean_correct"] == pytest.approx((7 + 4 + 5) / 14)  # 1 + 4 + 8 + 0 + 1 correct
    assert got["adv_abs_mean_wrong"] == pytest.approx((7 + 4 + 0 + 5) / 24)  # 7 + 4 + 0 + 8 + 5 wrong


def test_the_paper_s_eta_peak_shows_in_the_buckets():
    """Pass@k's η peaks at low accuracy, GRPO's in the middle (Figure 4), measured by the buckets."""
    n = 32
    rewards = (torch.arange(n).unsqueeze(0) < torch.arange(n + 1).unsqueeze(1)).double()
    valid = torch.ones_like(rewards, dtype=torch.bool)
    peaks = {}
    for name in ("grpo", "passk_analytic"):
        eta = advantage_diagnostics(compute_advantages(name, rewards, k=8), rewards, valid, k=8)["eta_by_accuracy"]
        peaks[name] = max(eta, key=eta.get)
    assert peaks == {"grpo": "4/8", "passk_analytic": "1/8"}


def test_an_empty_batch_and_one_without_correct_answers():
    none = advantage_diagnostics(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool), k=2)
    assert none["eta_by_accuracy"] == {} and none["alpha_k_mean"] == 0.0 and none["adv_abs_mean_correct"] is None
    wrong = advantage_diagnostics(torch.full((2, 4), -1.0), torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool), k=3)
    assert wrong["adv_abs_mean_correct"] is None and wrong["adv_abs_mean_wrong"] == 1.0 and wrong["alpha_k_mean"] == 3


def test_per_task_diagnostics_are_each_tasks_own():
    from services.trainer.diagnostics import diagnostics_by_task

    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    valid = torch.ones(4, 4, dtype=torch.bool)
    advantages = torch.tensor([[3.0, -1, -1, -1], [0, 0, 0, 0], [0, 0, 0, 0], [2, 2, -2, -2]])
    rows = ["math/arith", "maze/7x7", "math/fractions", "maze/9x9"]
    got = diagnostics_by_task(advantages, rewards, valid, 2, rows)
    assert set(got) == {"math", "math/arith", "math/fractions", "maze", "maze/7x7", "maze/9x9"}
    # math: groups 0 (1/4 right: eta 6, alpha_2 = 2 * 3/4) and 2 (all wrong: eta 0, alpha_2 = 2)
    assert got["math"] == {
        "eta_by_accuracy": {"2/8": 6.0, "0/8": 0.0},
        "alpha_k_mean": pytest.approx((1.5 + 2.0) / 2),
        "adv_abs_mean_correct": 3.0,
        "adv_abs_mean_wrong": pytest.approx(3 / 7),
    }
    # maze: groups 1 (all right) and 3 (half right)
    assert got["maze"]["eta_by_accuracy"] == {"8/8": 0.0, "4/8": 8.0}
    assert got["maze"]["alpha_k_mean"] == pytest.approx((0.0 + 1.0) / 2)
    assert got["maze/9x9"]["adv_abs_mean_correct"] == 2.0 and got["math/fractions"]["adv_abs_mean_correct"] is None
    # with each response's entropy: the mean over the task's graded responses (a failed one left out)
    entropy = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    graded = valid.clone()
    graded[0, 0] = False
    with_entropy = diagnostics_by_task(advantages, rewards, graded, 2, rows, entropy)
    assert with_entropy["math"]["entropy"] == pytest.approx((1 + 2 + 3 + 8 + 9 + 10 + 11) / 7)
    assert with_entropy["maze/7x7"]["entropy"] == pytest.approx(5.5) and "entropy" not in got["math"]
    graded[2] = False
    assert diagnostics_by_task(advantages, rewards, graded, 2, rows, entropy)["math/fractions"]["entropy"] is None
    with pytest.raises(ValueError, match="3 rows for 4 groups"):
        diagnostics_by_task(advantages, rewards, valid, 2, rows[:3])
