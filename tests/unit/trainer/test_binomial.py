import math
from fractions import Fraction

import pytest
import torch

from services.trainer import advantage_reference as ref
from services.trainer.binomial import comb_ratio, comb_ratio_table, pass_at_k


def test_comb_ratio_matches_exact_fractions():
    tops, bottoms = [], []
    for bottom in range(41):
        for top in range(-1, bottom + 1):
            tops.append(top)
            bottoms.append(bottom)
    top_t, bottom_t = torch.tensor(tops), torch.tensor(bottoms)
    for k in range(41):
        keep = bottom_t >= k
        got = comb_ratio(top_t[keep], bottom_t[keep], k)
        for value, top, bottom in zip(got.tolist(), top_t[keep].tolist(), bottom_t[keep].tolist(), strict=True):
            exact = Fraction(math.comb(top, k), math.comb(bottom, k)) if top >= 0 else Fraction(0)
            assert value == pytest.approx(float(exact), rel=1e-12, abs=1e-300), (top, bottom, k)


def test_comb_ratio_table_rows_follow_their_own_bottom():
    bottom = torch.tensor([3, 6, 10, 30])
    for k in range(4):
        table = comb_ratio_table(bottom, k, 30)
        assert table.shape == (4, 31)
        for b, n in enumerate(bottom.tolist()):
            for i in range(31):
                exact = math.comb(i, k) / math.comb(n, k) if i <= n else 0.0
                assert table[b, i].item() == pytest.approx(exact, rel=1e-12, abs=0.0), (n, i, k)


def test_comb_ratio_is_exactly_zero_below_k():
    # C(i, k) = 0 for i < k must come out as 0, not as rounding noise
    for n in (30, 257, 1000):
        for k in range(1, n + 1, 7):
            table = comb_ratio_table(torch.tensor([n]), k, n)
            assert bool((table[0, :k] == 0).all()), (n, k)
            assert bool((table[0, k:] > 0).all()), (n, k)  # C(1000, k) < 1e300: nothing underflows


def test_comb_ratio_is_finite_and_bounded_at_4096():
    n = torch.full((4097,), 4096)
    for k in (1, 7, 64, 2048, 4095, 4096):
        r = comb_ratio(torch.arange(4097), n, k)
        assert torch.isfinite(r).all()
        assert bool(((r >= 0) & (r <= 1)).all())
        assert bool((r[1:] >= r[:-1]).all()), "C(a,k)/C(n,k) must grow with a"
        assert r[-1].item() == 1.0
    # a value that is representable: C(4095, 2048) / C(4096, 2048) = 2048 / 4096
    assert comb_ratio(torch.tensor([4095]), torch.tensor([4096]), 2048).item() == pytest.approx(0.5, rel=1e-12)


def test_pass_at_k_matches_exact_estimator():
    for n in (1, 2, 5, 16, 33, 100):
        for k in range(1, n + 1):
            c = torch.arange(n + 1)
            got = pass_at_k(torch.full_like(c, n), c, k)
            want = torch.tensor([ref.pass_at_k(n, ci, k) for ci in range(n + 1)], dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_pass_at_k_scalar_and_large_n():
    assert pass_at_k(10, 0, 3).item() == 0.0
    assert pass_at_k(10, 8, 3).item() == 1.0  # fewer than k wrong answers
    assert pass_at_k(4, 1, 1).item() == pytest.approx(0.25)
    big = pass_at_k(torch.full((4097,), 4096), torch.arange(4097), 16)
    assert torch.isfinite(big).all() and bool((big[1:] >= big[:-1]).all())


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [(5, 1, 0, "k must be an integer >= 1"), (5, 6, 1, "0 <= c <= n"), (3, 1, 4, "at least k=4 samples")],
)
def test_pass_at_k_rejects_bad_input(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)
