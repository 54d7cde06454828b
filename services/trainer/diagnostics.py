"""Why an objective works or does not, per step: where its advantage mass goes.

* ``eta_by_accuracy``: the paper's η (Eq. 16, the group's sum of |advantage|) averaged over the
  step's groups in each accuracy bucket, N_pos/N in eighths ("3/8": 3/8 <= N_pos/N < 4/8; "8/8":
  all correct). Figure 4's curves, measured on the batch.
* ``all_wrong_fraction``, ``all_right_fraction``: groups with no spread in their rewards, which
  carry no gradient under every estimator with a group baseline.
* ``alpha_k_mean``: the weight of the pass@k gradient on a group, α_k = k (1 − p̂)^{k−1} with
  p̂ = N_pos/N (Yu 2025): it vanishes as the groups become all right, when exploration collapses.
* ``adv_abs_mean_correct``, ``adv_abs_mean_wrong``: how hard correct answers are pushed up and
  wrong ones down.

All from the rewards the step trained on (after reward noise) and the valid responses only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.trainer.task_figures import members

BUCKETS = [f"{b}/8" for b in range(9)]
# per task: the shares of all-wrong and all-right groups are in the per-task figures already,
# counted from the graders' verdicts
TASK_DIAGNOSTICS = ("eta_by_accuracy", "alpha_k_mean", "adv_abs_mean_correct", "adv_abs_mean_wrong")


def advantage_diagnostics(advantages: Tensor, rewards: Tensor, valid: Tensor, k: int) -> dict:
    """The figures above for a (B, N) batch; a bucket without groups is left out, and a mean over
    no responses is None."""
    correct = (rewards > 0) & valid
    n = valid.sum(1).double()
    n_pos = correct.sum(1).double()
    groups = n > 0
    share = torch.where(groups, n_pos / n.clamp_min(1), 0.0)
    eta = (advantages.double().abs() * valid).sum(1)
    bucket = torch.floor(share * 8).long().clamp(0, 8)
    eta_by_accuracy = {
        BUCKETS[b]: float(eta[(bucket == b) & groups].mean()) for b in range(9) if bool(((bucket == b) & groups).any())
    }
    count = max(int(groups.sum()), 1)
    wrong = valid & ~correct

    def mean_abs(mask: Tensor) -> float | None:
        return float(advantages.double()[mask].abs().mean()) if bool(mask.any()) else None

    return {
        "eta_by_accuracy": eta_by_accuracy,
        "all_wrong_fraction": float(((n_pos == 0) & groups).sum()) / count,
        "all_right_fraction": float(((n_pos == n) & groups).sum()) / count,
        "alpha_k_mean": float((k * (1 - share[groups]) ** (k - 1)).mean()) if bool(groups.any()) else 0.0,
        "adv_abs_mean_correct": mean_abs(correct),
        "adv_abs_mean_wrong": mean_abs(wrong),
    }


def diagnostics_by_task(
    advantages: Tensor, rewards: Tensor, valid: Tensor, k: int, rows: list[str], entropy: Tensor | None = None
) -> dict:
    """{task or row: the advantage's figures above} for a mixture's step (``task_figures.members``
    groups the rows), and with ``entropy`` (groups x samples: each response's mean token entropy)
    the policy's entropy on the task's graded responses."""
    if len(rows) != advantages.shape[0]:
        raise ValueError(f"{len(rows)} rows for {advantages.shape[0]} groups")
    out = {}
    for key, indices in members(rows).items():
        figures = advantage_diagnostics(advantages[indices], rewards[indices], valid[indices], k)
        out[key] = {name: figures[name] for name in TASK_DIAGNOSTICS}
        if entropy is not None:
            graded = valid[indices]
            out[key]["entropy"] = float(entropy[indices][graded].mean()) if graded.any() else None
    return out
