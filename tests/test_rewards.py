import time

import pytest

from sputnik.rl.rewards import IsolatedReward, import_by_path


def _batch(*completions):
    return [{"prompt": "p", "completion": c, "answer": "a"} for c in completions]


def test_isolated_reward_values():
    r = IsolatedReward("reward_fixtures:length_reward")
    try:
        assert r(_batch("abc", "abcdefghij")) == [pytest.approx(0.3), pytest.approx(1.0)]
        assert r.failures.total() == 0
    finally:
        r.close()


def test_raising_reward_scores_zero_and_run_continues():
    r = IsolatedReward("reward_fixtures:raising_reward")
    try:
        assert r(_batch("ok", "boom", "fine")) == [1.0, 0.0, 1.0]
        assert r.failures.raised == 1 and "reward exploded" in r.failures.examples[0]
    finally:
        r.close()


def test_hanging_reward_is_killed_at_its_time_limit():
    r = IsolatedReward("reward_fixtures:hanging_reward", timeout_s=0.5)
    try:
        r(_batch("warm"))  # worker start-up is not charged to the time limit
        t0 = time.perf_counter()
        assert r(_batch("hang")) == [0.0]
        assert 0.45 < time.perf_counter() - t0 < 5  # waited out the limit, then gave up (loose: shared CPUs)
        assert r(_batch("fine")) == [0.5]  # a fresh worker after the kill
        assert r.failures.timed_out == 1 and r.failures.total() == 1
    finally:
        r.close()


@pytest.mark.parametrize("fn", ["nan_reward", "inf_reward"])
def test_non_finite_reward_is_zero(fn):
    r = IsolatedReward(f"reward_fixtures:{fn}")
    try:
        assert r(_batch("x")) == [0.0]
        assert r.failures.non_finite == 1 and r.failures.total() == 1
    finally:
        r.close()


def test_reward_that_calls_exit_scores_zero_as_raised():
    """SystemExit is not an Exception: a reward calling sys.exit() must not take the worker's
    loop (and the time limit) with it."""
    r = IsolatedReward("reward_fixtures:exiting_reward", timeout_s=0.5)
    try:
        assert r(_batch("x")) == [0.0]
        assert r.failures.raised == 1 and r.failures.timed_out == 0
    finally:
        r.close()


def test_bad_import_path():
    with pytest.raises(ValueError, match="cannot be imported"):
        import_by_path("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="expected"):
        import_by_path("justaname")
