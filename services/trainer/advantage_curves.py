"""Advantage curves of the paper's Figures 9 and 18.

For a group of N responses and every N_pos = 0..N: the advantage of a correct
response (A_pos), of a wrong one (A_neg), and the sum of absolute advantages
eta = N_pos |A_pos| + N_neg |A_neg| (Eq. 16). Where eta peaks says which
prompts an estimator trains hardest on: N/2 for Pass@1, N/4 for Pass@8 at
N = 32 (Sec. 4.1.1).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from services.trainer.advantage import Estimator, compute_advantages, estimator_uses_k


@dataclass(frozen=True)
class Curve:
    """One estimator's curve at one k; lists are indexed by N_pos = 0..N."""

    estimator: str
    k: int | None  # None for estimators that ignore k
    n: int
    a_pos: list[float]  # NaN where N_pos = 0 (no correct response)
    a_neg: list[float]  # NaN where N_pos = N (no wrong response)
    eta: list[float]

    @property
    def label(self) -> str:
        return self.estimator if self.k is None else f"{self.estimator} k={self.k}"

    @property
    def peak(self) -> int:
        """N_pos where eta is largest (the smallest such N_pos on ties)."""
        return max(range(self.n + 1), key=lambda i: (self.eta[i], -i))


def advantage_curve(estimator: str | Estimator, n: int, k: int) -> Curve:
    """A_pos, A_neg and eta against N_pos for one estimator at group size n."""
    # Row p holds p correct responses followed by n - p wrong ones.
    n_pos = torch.arange(n + 1).unsqueeze(1)
    rewards = (torch.arange(n).unsqueeze(0) < n_pos).to(torch.float64)  # (n+1, n)
    adv = compute_advantages(estimator, rewards, k=k)
    a_pos = [adv[p, 0].item() if p > 0 else math.nan for p in range(n + 1)]
    a_neg = [adv[p, n - 1].item() if p < n else math.nan for p in range(n + 1)]
    eta = adv.abs().sum(1).tolist()
    uses_k = estimator_uses_k(estimator)
    return Curve(Estimator(estimator).value, k if uses_k else None, n, a_pos, a_neg, eta)


def advantage_curves(estimators: list[str], n: int, ks: list[int]) -> list[Curve]:
    """Curves for every estimator and k; estimators that ignore k appear once."""
    curves = []
    for name in estimators:
        for k in ks if estimator_uses_k(name) else ks[:1]:
            curves.append(advantage_curve(name, n, k))
    return curves


def write_csv(curves: list[Curve], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["estimator", "k", "n", "n_pos", "a_pos", "a_neg", "eta"])
        for c in curves:
            for p in range(c.n + 1):
                writer.writerow([c.estimator, "" if c.k is None else c.k, c.n, p, c.a_pos[p], c.a_neg[p], c.eta[p]])


def write_png(curves: list[Curve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for c in curves:
        x = list(range(c.n + 1))
        for ax, y in zip(axes, (c.a_pos, c.a_neg, c.eta), strict=True):
            ax.plot(x, y, marker=".", linewidth=1.2, label=c.label)
    titles = ("A_pos (correct response)", "A_neg (wrong response)", "eta = sum |A| (Eq. 16)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("N_pos (correct responses in the group)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5) or 1, fontsize=8)
    fig.suptitle(f"Advantage curves, N = {curves[0].n}" if curves else "Advantage curves")
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 5), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
