from math import comb

import pytest

from sputnik.metrics import bootstrap_interval, majority_vote, pass_at_k, wilson_interval


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (20, 0, 4), (5, 5, 2), (16, 1, 8), (8, 6, 3)])
def test_pass_at_k_matches_combinatorial_definition(n, c, k):
    expected = 1 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_fraction_correct_and_bad_args():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_vote():
    assert majority_vote(["4", "5", "4", None]) == "4"
    assert majority_vote([None, None]) is None
    assert majority_vote(["7", "8"]) == "7"  # tie -> first seen


def test_intervals():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0
    lo, hi = bootstrap_interval([0.0, 1.0] * 50)
    assert lo < 0.5 < hi
