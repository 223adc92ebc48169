from math import comb

import pytest

from sputnik.metrics import bootstrap_interval, majority_vote, pass_at_k, wilson_interval


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (20, 0, 4), (5, 5, 2), (16, 1, 8), (8, 6, 3)])
def test_pass_at_k_matches_combinatorial_definition(n, c, k):
    expected = 1 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_fraction_correct_and_bad_args():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


def test_majority_vote():
    assert majority_vote(["4", "5", "4", None]) == "4"
    assert majority_vote([None, None]) is None
    assert majority_vote(["7", "8"]) == "7"  # tie -> first seen


def test_intervals():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    # 0 of 10: the lower end is 0 and the upper z²/(n + z²), not the degenerate [0, 0] of mean ± 1.96 se
    assert wilson_interval(0, 10) == (0.0, pytest.approx(1.96**2 / (10 + 1.96**2)))
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + 1.96**2)), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # mean 0.5 of 100 coin flips: the normal interval is 0.5 ± 1.96·0.05; the percentile bootstrap
    # (seeded, so repeatable) lands within a bootstrap step of it
    lo, hi = bootstrap_interval([0.0, 1.0] * 50)
    assert lo == pytest.approx(0.5 - 1.96 * 0.05, abs=0.015) and hi == pytest.approx(0.5 + 1.96 * 0.05, abs=0.015)
    assert bootstrap_interval([0.0, 1.0] * 50) == (lo, hi)
    assert bootstrap_interval([0.3] * 7) == (0.3, 0.3)  # no spread, no interval
