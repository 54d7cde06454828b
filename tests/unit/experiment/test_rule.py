"""The verdict rule fixed before a run: t intervals with an equivalence margin decide every
difference whose interval is narrow enough, and the claims of issue 21 (staged training, the
effect of k, larger mazes) follow their numbers."""

import math
import random
import statistics
from pathlib import Path

import pytest

from services.experiment.claims import Judge, claims, eta_centroid
from services.experiment.report import collect, larger_sizes, write_report
from services.experiment.results import Difference, RunResult, decide, decisive_se, t_cdf, t_quantile
from services.experiment.spec import Experiment, Rule, load, plan
from services.trainer.config import TrainerSettings
from tests.helpers.experiment_runs import write_run


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantiles_match_the_closed_forms_and_the_normal_limit(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-7)  # Cauchy
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-7)
    assert t_quantile(p, 100_000) == pytest.approx(statistics.NormalDist().inv_cdf(p), rel=1e-4)
    for df in (3, 4, 9):
        assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)
        assert t_quantile(1 - p, df) == -t_quantile(p, df)


def difference(values: list[float]) -> Difference:
    se = statistics.stdev(values) / math.sqrt(len(values))
    return Difference(statistics.fmean(values), se, tuple(values))


def test_the_four_decisions():
    assert decide(difference([0.05, 0.06, 0.055, 0.05, 0.06]), 0.02, 0.95) == "higher"
    assert decide(difference([-0.05, -0.06, -0.055, -0.05, -0.06]), 0.02, 0.95) == "lower"
    assert decide(difference([0.002, -0.003, 0.001, 0.0, -0.001]), 0.02, 0.95) == "same"
    assert decide(difference([0.08, -0.07, 0.01, 0.05, -0.04]), 0.02, 0.95) == "unclear"
    # significant but far inside the margin: no effect that matters
    assert decide(difference([0.004, 0.005, 0.004, 0.005, 0.0045]), 0.02, 0.95) == "same"


def test_an_interval_narrower_than_half_the_margin_always_decides():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.choice([3, 5, 8])
        margin = rng.uniform(0.01, 0.05)
        values = [rng.gauss(0, 1) for _ in range(n)]
        d = difference(values)
        scale = decisive_se(margin, 0.95, n) / d.se * rng.uniform(0.5, 0.999)
        shift = rng.uniform(-2, 2) * margin
        shrunk = difference([shift + scale * (v - d.mean) for v in values])
        assert decide(shrunk, margin, 0.95) != "unclear"


SIZES = [7, 9, 11]
METHODS = ["grpo", "passk_analytic", "pk-then-p1", "passk_analytic-k2", "passk_analytic-k16"]


def experiment(tmp_path: Path) -> Experiment:
    return Experiment.model_validate({
        "name": "power", "out": str(tmp_path / "runs"), "docs": str(tmp_path / "docs"), "seeds": [0, 1, 2],
        "method_seeds": {"grpo": [0, 1, 2, 3, 4], "passk_analytic": [0, 1, 2, 3, 4]}, "methods": METHODS,
        "variants": [
            {"name": "pk-then-p1", "label": "P@k T. + P@1 T.",
             "set": ["stages=[{estimator='passk_analytic', k=8, steps=5}, {estimator='grpo', k=1, steps=5}]"]},
            {"name": "passk_analytic-k2", "estimator": "passk_analytic", "set": ["k=2"]},
            {"name": "passk_analytic-k16", "estimator": "passk_analytic", "set": ["k=16"]},
        ],
        "rule": {"margin": 0.02, "pilot": {"pass@8": 0.01, "pass@1": 0.005}, "pilot_source": "a test"},
        "starts": [{"name": "tiny", "model_dir": "m", "warmup_steps": 1, "horizon": 2}], "lanes": 1,
        "model_sizes": [7], "train_sizes": [7], "test_sizes": SIZES,
    })  # fmt: skip


# final (pass@1, pass@8) on 7x7 and 9x9 per method, before a per-seed jitter of +-0.2 points;
# 11x11 stays at 0 (the start solves none of it)
FINAL = {"grpo": (0.30, 0.40), "passk_analytic": (0.30, 0.48), "pk-then-p1": (0.34, 0.46),
         "passk_analytic-k2": (0.30, 0.45), "passk_analytic-k16": (0.29, 0.49)}  # fmt: skip
# η per bucket: k = 2 leans to easy groups, k = 16 to hard ones
ETA = {"passk_analytic-k2": {"1/8": 4.0, "4/8": 8.0, "7/8": 12.0}, "passk_analytic-k16": {"1/8": 12.0, "4/8": 8.0,
       "7/8": 2.0}}  # fmt: skip


def fill(exp: Experiment) -> None:
    evals, runs = plan(exp)
    for e in evals:
        write_run(e.run_dir, {0: {7: (0.1, 0.3), 9: (0.02, 0.1), 11: (0.0, 0.0)}}, None)
    for run in runs:
        jitter = 0.002 * (-1) ** run.seed
        p1, p8 = FINAL[run.method]
        final = {7: (p1 + jitter, p8 + jitter), 9: (p1 / 2 + jitter, p8 / 2 + jitter), 11: (0.0, 0.0)}
        eta = ETA.get(run.method, {"4/8": 8.0})
        steps = [{"step": t, "entropy": 0.5, "negative_diversity": 0.5, "eta_by_accuracy": eta} for t in range(1, 11)]
        write_run(run.run_dir, {10: final}, steps)


def test_the_plan_gives_the_headline_pair_more_seeds_and_variants_their_settings(tmp_path):
    exp = experiment(tmp_path)
    _, runs = plan(exp)
    count = {m: sum(r.method == m for r in runs) for m in METHODS}
    assert count == {"grpo": 5, "passk_analytic": 5, "pk-then-p1": 3, "passk_analytic-k2": 3, "passk_analytic-k16": 3}
    k2 = next(r for r in runs if r.method == "passk_analytic-k2")
    assert "estimator='passk_analytic'" in k2.overrides() and k2.overrides()[-1] == "k=2"
    staged = next(r for r in runs if r.method == "pk-then-p1")
    assert not any(o.startswith("estimator=") for o in staged.overrides())  # the stages name theirs
    settings = TrainerSettings.model_validate({})
    assert settings.k == 8  # the base preset's k is the analytic runs' k in the claims below


def test_the_new_claims_follow_their_numbers(tmp_path):
    exp = experiment(tmp_path)
    fill(exp)
    [tiny] = collect(exp)
    assert larger_sizes(tiny, exp, 8) == [9]  # 11x11: the start solves nothing there
    judge = Judge(exp.rule)
    found = claims(tiny, 8, [7], judge, [9])
    headline = next(c for c in found if c.title.startswith("Pass@k Training raises"))
    assert headline.verdict == "yes"  # +8 points of pass@8, pass@1 the same (inside +-2)
    assert "SE expected 0.4" in headline.evidence  # 1 point of pilot sd over sqrt(5) seeds, in points
    staged = next(c for c in found if c.title.startswith("Pass@k training then"))
    assert staged.verdict == "yes", staged.evidence  # +4 on pass@1, +6 on pass@8
    k_claim = next(c for c in found if c.title.startswith("A larger k"))
    assert k_claim.verdict == "yes", k_claim.evidence
    larger = next(c for c in found if c.title.startswith("Pass@k training's gain"))
    assert larger.verdict == "yes" and "9×9" in larger.evidence  # +4 points on 9x9
    # the entropy and diversity are identical in both: the same, so the claim is "no"
    entropy = next(c for c in found if "policy entropy" in c.title)
    assert entropy.verdict == "no" and "→ same" in entropy.evidence


def test_eta_centroid_is_the_eta_weighted_mean_accuracy():
    run = RunResult("x", 0, {}, [{"eta_by_accuracy": {"0/8": 5.0, "2/8": 1.0, "6/8": 3.0, "8/8": 9.0}},
                                 {"eta_by_accuracy": {"0/8": 3.0}}])  # fmt: skip
    # bucket middles; 0/8 averaged over the two steps; 8/8 (all right) left out
    want = (0.5 / 8 * 4.0 + 2.5 / 8 * 1.0 + 6.5 / 8 * 3.0) / 8.0
    assert eta_centroid(run) == pytest.approx(want)


def test_the_report_states_the_rule_and_the_power_of_the_design(tmp_path):
    exp = experiment(tmp_path)
    fill(exp)
    spec = tmp_path / "exp.toml"
    spec.write_text('[experiment]\nname = "power"\n[trainer]\neval_k = [1, 8]\n')
    text = write_report(spec, exp, TrainerSettings(eval_k=[1, 8], steps=10)).read_text()
    assert "95% confidence interval" in text and "2.0 points of pass@k" in text
    assert "### The design's power" in text
    row = next(line for line in text.splitlines() if line.startswith("| pass@8 | 5 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    # pilot sd 1 point; expected SE 1/sqrt(5); the SE that always decides: 1 point / t(0.975, 4)
    assert cells[2:5] == ["1", f"{1 / math.sqrt(5):.3g}", f"{1 / t_quantile(0.975, 4):.3g}"]
    assert "**unclear**" not in text
    assert "Seeds: 0, 1, 2; P@1 T. (GRPO): 0, 1, 2, 3, 4" in text


def test_a_rule_is_checked():
    for bad in ({"margin": 0}, {"margin": 0.02, "confidence": 1.0}, {"margin": 0.02, "bogus": 1}):
        with pytest.raises(ValueError):
            Rule.model_validate(bad)


def test_method_seeds_and_variants_are_checked(tmp_path):
    base = experiment(tmp_path).model_dump()
    for change, message in [
        ({"method_seeds": {"nope": [0]}}, "not in experiment.methods"),
        ({"method_seeds": {"grpo": [0, 0]}}, "distinct seeds"),
        ({"variants": [*base["variants"], base["variants"][0]]}, "variant names repeat"),
        ({"methods": ["grpo", "passk_analytic"]}, "are not in experiment.methods"),
    ]:
        with pytest.raises(ValueError, match=message):
            Experiment.model_validate({**base, **change})


def test_a_bad_variant_setting_is_refused_before_anything_runs(tmp_path):
    from services.experiment.spec import check

    spec = tmp_path / "exp.toml"
    text = Path("configs/experiments/objective-family.toml").read_text()
    text = text.replace('methods = ["grpo",', 'methods = ["odd", "grpo",')
    text = text.replace("[[experiment.starts]]", '[[experiment.variants]]\nname = "odd"\nset = ["k=64"]\n\n'
                        "[[experiment.starts]]", 1)  # fmt: skip
    spec.write_text(text)
    exp, _ = load(spec)
    with pytest.raises(ValueError, match="k=64"):
        check(spec, *plan(exp))


def test_the_analytic_eta_curve_at_k_1_is_grpos_and_moves_to_harder_groups_as_k_grows():
    from services.experiment.claims import theory_eta_by_bucket

    n = 32
    grpo = theory_eta_by_bucket(n, 1)
    for b, eta in grpo.items():  # GRPO on binary rewards: η = 2 N sqrt(p (1 - p)), averaged in the bucket
        counts = [c for c in range(n) if 8 * c // n == b]
        assert eta == pytest.approx(statistics.fmean(2 * n * math.sqrt(c / n * (1 - c / n)) for c in counts))

    from services.experiment.claims import centroid

    centroids = [centroid(theory_eta_by_bucket(n, k)) for k in (1, 2, 4, 8, 16)]
    assert centroids == sorted(centroids, reverse=True) and centroids[0] > centroids[-1] + 0.1


def test_the_report_draws_eta_by_k_and_says_how_much_of_the_plan_it_covers(tmp_path):
    exp = experiment(tmp_path)
    fill(exp)
    (Path(exp.out) / "tiny-grpo-s4" / "done.json").unlink()
    spec = tmp_path / "exp.toml"
    spec.write_text('[experiment]\nname = "power"\n[trainer]\neval_k = [1, 8]\n')
    text = write_report(spec, exp, TrainerSettings(eval_k=[1, 8], steps=10)).read_text()
    assert "**Partial: 18 of 19 trainings finished**" in text
    assert "(tiny-eta-by-k.png)" in text and (Path(exp.docs) / "tiny-eta-by-k.png").read_bytes()[:4] == b"\x89PNG"


def test_each_measure_has_its_own_margin():
    judge = Judge(Rule(margin=0.07, margin_pass1=0.01, margin_entropy=0.5))
    d = difference([0.02, 0.025, 0.03, 0.022, 0.028])  # 2.5 points, tight
    assert judge(d, "pass@1") == "higher"  # beyond a 1-point margin
    assert judge(d, "pass@8") == "same"  # inside a 7-point one
    assert judge(d, "entropy") == "same"
    assert Judge(Rule(margin=0.01))(d, "pass@1") == "higher"  # pass@1 falls back to the pass@k margin
