"""The paper's claims, each with a verdict from paired differences between methods under the
experiment's rule (``spec.Rule``: confidence intervals with an equivalence margin, fixed before
the run), or, for an experiment without one, the sign rule of the first reproduction.

Methods are found by name: ``grpo`` (Pass@1 training), ``passk_full``, ``passk_bootstrap``,
``passk_analytic`` (Pass@k training, k of the base preset), ``passk_combination``,
``passk_adaptive``; the variant ``pk-then-p1`` (Pass@k training, then Pass@1 training, as many
steps in all as the others: Tables 1, 2 and 6); the variants ``passk_analytic-k<K>`` (the analytic
estimator at another k: Sec. 4.1). A claim whose methods did not run says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.experiment.names import method_name
from services.experiment.results import (
    Difference,
    decide,
    end_of_training,
    eta_by_bucket,
    interval,
    mean_sd,
    paired,
    per_seed,
)

if TYPE_CHECKING:
    from services.experiment.report import StartResults
    from services.experiment.results import RunResult
    from services.experiment.spec import Rule

STAGED = "pk-then-p1"
K_VARIANT = re.compile(r"^passk_analytic-k(\d+)$")


@dataclass(frozen=True)
class Claim:
    title: str
    paper: str
    verdict: str  # yes / no / unclear / not run
    evidence: str
    per_size: bool = True  # False: a training-time measure, or one that picks its own sizes


class Judge:
    """Decisions on paired differences: "higher", "lower", "same" (inside the margin) or "unclear"."""

    def __init__(self, rule: Rule | None):
        self.rule = rule

    def margin(self, measure: str) -> float:
        assert self.rule is not None
        pass1 = self.rule.margin_pass1 if self.rule.margin_pass1 is not None else self.rule.margin
        return {"pass@1": pass1, "entropy": self.rule.margin_entropy, "diversity": self.rule.margin_diversity,
                "share": self.rule.margin_share}.get(measure, self.rule.margin)  # fmt: skip

    def __call__(self, d: Difference, measure: str) -> str:
        if self.rule is None:  # the sign rule: every seed agrees and the mean is beyond 2 SE
            return {1: "higher", -1: "lower"}.get(d.clear, "unclear")
        return decide(d, self.margin(measure), self.rule.confidence)

    def text(self, d: Difference, measure: str, scale: float = 100.0, digits: int = 1) -> str:
        """The difference, its interval, the standard error the pilot predicted, and the decision."""
        out = d.text(scale, digits)
        if self.rule is not None and len(d.values) > 1:
            low, high = interval(d, self.rule.confidence)
            out += f", {100 * self.rule.confidence:.0f}% CI [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"
            sd = self.rule.pilot.get(measure)
            if sd is not None:
                out += f", SE expected {scale * sd / len(d.values) ** 0.5:.{digits}f}"
        return f"{out} → {self(d, measure)}"


def better(decisions: list[str]) -> str:
    """yes when every difference is higher, no when one is lower or the same, else unclear."""
    if any(d in ("lower", "same") for d in decisions):
        return "no"
    return "yes" if all(d == "higher" for d in decisions) else "unclear"


# the end-of-training figures of the entropy and diversity claims: (metrics.jsonl key, measure)
EXPLORATION = (("entropy", "entropy"), ("negative_diversity", "diversity"))


def headline(runs: dict[str, list[RunResult]], k: int, sizes: list[int] | None) -> dict[str, Difference]:
    """Analytic Pass@k − Pass@1 per measure, paired by seed: held-out pass@k and pass@1 (average
    over ``sizes``), and entropy and wrong-answer diversity over the last fifth of the training
    (left out where a run did not measure them)."""
    a, b = runs["passk_analytic"], runs["grpo"]
    out = {m: paired(per_seed(a, m, sizes), per_seed(b, m, sizes)) for m in (f"pass@{k}", "pass@1")}
    for key, measure in EXPLORATION:
        ends = end_of_training(a, key), end_of_training(b, key)
        if all(v is not None for table in ends for v in table.values()):
            out[measure] = paired(*ends)
    return out


def centroid(eta_by_bucket: dict[int, float]) -> float | None:
    """The mean group accuracy weighted by η per bucket (bucket b: accuracy in [b/8, (b+1)/8),
    counted at its middle)."""
    total = sum(eta_by_bucket.values())
    return sum((b + 0.5) / 8 * eta for b, eta in eta_by_bucket.items()) / total if total > 0 else None


def eta_centroid(result: RunResult) -> float | None:
    """Where a training put its advantage mass: ``centroid`` of the run's mean η per bucket 0/8..7/8
    (8/8, the all-right groups, carries none)."""
    return centroid(measured_eta_by_bucket([result]))


def theory_eta_by_bucket(n: int, k: int) -> dict[int, float]:
    """The analytic estimator's η (Eq. 16) of a group of n with N_pos correct, averaged over the
    N_pos of each accuracy bucket 0/8..7/8 (floor(8 N_pos / n) = b): Figure 9's curve, bucketed
    as the training measures it. (The training's bucket means weigh each N_pos by how often it
    came up, this one equally: bucket 0/8 holds the all-wrong groups, with η = 0, in both.)"""
    import torch

    from services.trainer.advantage import analytic_response_advantages

    n_pos = torch.arange(n + 1, dtype=torch.float64)
    a_pos, a_neg = analytic_response_advantages(torch.full((n + 1,), n), n_pos, k)
    eta = n_pos * a_pos.abs() + (n - n_pos) * a_neg.abs()
    out: dict[int, list[float]] = {}
    for count in range(n + 1):
        b = min(8 * count // n, 8)
        if b <= 7:
            out.setdefault(b, []).append(float(eta[count]))
    return {b: sum(v) / len(v) for b, v in sorted(out.items())}


def measured_eta_by_bucket(results: list[RunResult]) -> dict[int, float]:
    """The runs' η per bucket 0/8..7/8 (``results.eta_by_bucket`` without the all-right groups)."""
    return {b: eta for b, eta in eta_by_bucket(results).items() if b <= 7}


def k_runs(s: StartResults, base_k: int) -> dict[int, str]:
    """{k: method} of the analytic estimator's runs at each k."""
    out = {base_k: "passk_analytic"} if "passk_analytic" in s.runs else {}
    for method in s.runs:
        if m := K_VARIANT.match(method):
            out[int(m.group(1))] = method
    return dict(sorted(out.items()))


def claims(s: StartResults, k: int, sizes: list[int] | None, judge: Judge, larger: list[int]) -> list[Claim]:
    """A verdict per claim on the average over ``sizes`` (None: every held-out size); ``larger``:
    the held-out sizes above every training size on which the start solved something."""
    pk, runs = f"pass@{k}", s.runs
    out = []

    def have(*methods: str) -> bool:
        return all(m in runs for m in methods)

    def diff(a: str, b: str, metric: str, over: list[int] | None = sizes) -> Difference:
        return paired(per_seed(runs[a], metric, over), per_seed(runs[b], metric, over))

    title = f"Pass@k Training raises pass@{k} without hurting pass@1"
    paper = "Sec. 2.2, Table 7: analytic Pass@k training beats Pass@1 training on both (avg. 47.7/65.0 vs 13.9/14.4)"
    pair = headline(runs, k, sizes) if have("passk_analytic", "grpo") else {}
    if pair:
        d_k, d_1 = pair[pk], pair["pass@1"]
        on_k, on_1 = judge(d_k, pk), judge(d_1, "pass@1")
        not_hurt = on_1 in ("higher", "same") or (judge.rule is None and on_1 == "unclear")
        verdict = "no" if on_k in ("lower", "same") or on_1 == "lower" else ("yes" if on_k == "higher" and not_hurt
                                                                             else "unclear")  # fmt: skip
        evidence = f"{pk} Pass@k (AD) − Pass@1: {judge.text(d_k, pk)}; pass@1: {judge.text(d_1, 'pass@1')}"
        out.append(Claim(title, paper, verdict, evidence))
    else:
        out.append(Claim(title, paper, "not run", "needs grpo and passk_analytic"))

    title = "Bootstrap sampling beats full sampling at equal rollouts"
    paper = "Sec. 2.3, Table 7: BS 16.8/26.7 vs FS 12.7/24.7 avg."
    if have("passk_bootstrap", "passk_full"):
        d_k, d_1 = diff("passk_bootstrap", "passk_full", pk), diff("passk_bootstrap", "passk_full", "pass@1")
        evidence = f"{pk} BS − FS: {judge.text(d_k, pk)}; pass@1: {judge.text(d_1, 'pass@1')}"
        out.append(Claim(title, paper, better([judge(d_k, pk)]), evidence))
    else:
        out.append(Claim(title, paper, "not run", "needs passk_bootstrap and passk_full"))

    title = "The analytical derivation is the best and most stable of the three"
    paper = "Sec. 2.4, Table 7: AD 47.7/65.0 avg. against 16.8/26.7 (BS) and 12.7/24.7 (FS); smoother training"
    if have("passk_analytic", "passk_bootstrap", "passk_full"):
        three = ("passk_full", "passk_bootstrap", "passk_analytic")
        spreads = {m: mean_sd(list(per_seed(runs[m], pk, sizes).values()))[1] for m in three}
        best = [diff("passk_analytic", other, pk) for other in ("passk_bootstrap", "passk_full")]
        verdict = better([judge(d, pk) for d in best])
        if verdict == "yes" and min(spreads, key=spreads.get) != "passk_analytic":
            verdict = "no"  # the best, but not the most stable
        spread_text = ", ".join(f"{m} {100 * v:.1f}" for m, v in spreads.items())
        evidence = (f"{pk} AD − BS: {judge.text(best[0], pk)}; AD − FS: {judge.text(best[1], pk)}; "
                    f"sd over seeds of {pk} (points): {spread_text}")  # fmt: skip
        out.append(Claim(title, paper, verdict, evidence))
    else:
        out.append(Claim(title, paper, "not run", "needs passk_full, passk_bootstrap and passk_analytic"))

    papers = {
        "entropy": ("policy entropy", "Sec. 3.2, Figure 7b: entropy converges low under Pass@1, higher under Pass@k"),
        "diversity": ("negative-answer diversity", "Sec. 3.2, Figure 7a: the ratio of distinct wrong answers "
                      "stays flat under Pass@1, rises under Pass@k"),
    }  # fmt: skip
    for key, measure in EXPLORATION:
        label, paper = papers[measure]
        title = f"Pass@k training keeps {label} higher than Pass@1 training"
        if not pair:
            out.append(Claim(title, paper, "not run", "needs grpo and passk_analytic", per_size=False))
            continue
        methods = ("passk_analytic", "grpo")
        first = {m: end_of_training(runs[m], key, 0.0, 0.1) for m in methods}
        last = {m: end_of_training(runs[m], key) for m in methods}
        if measure not in pair or any(v is None for table in first.values() for v in table.values()):
            out.append(Claim(title, paper, "unclear", f"{label}: not measured in every run", per_size=False))
            continue
        d = pair[measure]
        at = {m: (mean_sd(list(first[m].values()))[0], mean_sd(list(last[m].values()))[0]) for m in methods}
        evidence = (f"mean over the first tenth of the steps → the last fifth: Pass@k {at[methods[0]][0]:.3f} → "
                    f"{at[methods[0]][1]:.3f}, Pass@1 {at['grpo'][0]:.3f} → {at['grpo'][1]:.3f}; at the end "
                    f"Pass@k − Pass@1 {judge.text(d, measure, 1.0, 3)}")  # fmt: skip
        out.append(Claim(title, paper, better([judge(d, measure)]), evidence, per_size=False))

    for method, section in (("passk_combination", "Sec. 4.2.2, Eq. 18"), ("passk_adaptive", "Sec. 4.2.3")):
        title = f"{method_name(method)} beats Pass@1 and Pass@k training alone"
        paper = f"{section}: better than either alone"
        if have(method, "grpo", "passk_analytic"):
            ds = {(other, m): diff(method, other, m) for other in ("grpo", "passk_analytic") for m in ("pass@1", pk)}
            verdict = better([judge(d, m) for (_, m), d in ds.items()])
            evidence = "; ".join(f"{m} vs {method_name(o)}: {judge.text(d, m)}" for (o, m), d in ds.items())
            out.append(Claim(title, paper, verdict, evidence))
        else:
            out.append(Claim(title, paper, "not run", f"needs {method}, grpo and passk_analytic"))

    title = f"Pass@k training then Pass@1 training beats Pass@1 training alone on pass@1 and {pk}"
    paper = ("Tables 1-2 and 6: P@k T. + P@1 T. above P@1 T. for the same total steps "
             "(e.g. Qwen2.5-7B, Enigmata: 10.7/16.0 → 17.3/25.0)")  # fmt: skip
    if have(STAGED, "grpo"):
        d_1, d_k = diff(STAGED, "grpo", "pass@1"), diff(STAGED, "grpo", pk)
        evidence = f"pass@1: {judge.text(d_1, 'pass@1')}; {pk}: {judge.text(d_k, pk)}"
        out.append(Claim(title, paper, better([judge(d_1, "pass@1"), judge(d_k, pk)]), evidence))
    else:
        out.append(Claim(title, paper, "not run", f"needs {STAGED} and grpo"))

    title = "A larger k moves the advantage mass to harder prompts"
    paper = "Sec. 4.1, Figure 9: the peak of η moves to lower accuracy as k grows (N = 32)"
    ks = k_runs(s, k)
    if len(ks) >= 2:
        low, high = min(ks), max(ks)
        centroids = {kk: {r.seed: eta_centroid(r) for r in runs[m]} for kk, m in ks.items()}
        if any(v is None for table in centroids.values() for v in table.values()):
            out.append(Claim(title, paper, "unclear", "η by bucket missing in a run", per_size=False))
        else:
            d = paired(centroids[high], centroids[low])  # type: ignore[arg-type]
            means = ", ".join(f"k = {kk}: {mean_sd(list(c.values()))[0]:.3f}" for kk, c in centroids.items())
            decision = judge(d, "share")
            verdict = {"lower": "yes", "higher": "no", "same": "no"}.get(decision, "unclear")
            evidence = (f"η-weighted mean accuracy of the trained groups (lower: harder prompts): {means}; "
                        f"k = {high} − k = {low}: {judge.text(d, 'share', 1.0, 3)}")  # fmt: skip
            out.append(Claim(title, paper, verdict, evidence, per_size=False))
    else:
        out.append(Claim(title, paper, "not run", "needs passk_analytic at two k (variants passk_analytic-k<K>)",
                         per_size=False))  # fmt: skip

    title = f"Pass@k training's gain on {pk} holds on mazes larger than those trained on"
    paper = "Table 7: the gains of Pass@k training extend to the larger held-out mazes (up to 21×21)"
    if have("passk_analytic", "grpo") and larger:
        d_k = diff("passk_analytic", "grpo", pk, larger)
        d_1 = diff("passk_analytic", "grpo", "pass@1", larger)
        over = ", ".join(f"{n}×{n}" for n in larger)
        evidence = f"on {over}: {pk} {judge.text(d_k, pk)}; pass@1 {judge.text(d_1, 'pass@1')}"
        out.append(Claim(title, paper, better([judge(d_k, pk)]), evidence, per_size=False))
    else:
        reason = "needs grpo and passk_analytic" if larger else "the start solves no maze larger than the trained ones"
        out.append(Claim(title, paper, "not run", reason, per_size=False))
    return out
