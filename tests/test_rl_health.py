from sputnik.config import build
from sputnik.rl.health import HealthConfig, HealthMonitor, check_reward_hacking, check_step_window, prompt_prefills_format

CFG = build(HealthConfig, {"window": 3})
OK = dict(truncated_frac=0.1, zero_variance_frac=0.2, parse_failure_frac=0.1, format_rate=0.6, reward_std=0.3,
          entropy=0.8, kl=0.01)


def test_healthy_run_has_no_warnings():
    assert check_step_window([OK] * 5, CFG) == []


def test_each_pathology_is_reported():
    cases = {
        "truncation": dict(truncated_frac=0.9),
        "no signal": dict(zero_variance_frac=1.0),
        "answers unparsable": dict(parse_failure_frac=1.0),
        "format reward stuck at 0": dict(format_rate=0.0),
        "format reward stuck at 1": dict(format_rate=1.0, reward_std=0.0),
        "entropy collapse": dict(entropy=0.001),
        "KL blow-up": dict(kl=5.0),
    }
    for name, bad in cases.items():
        warnings = check_step_window([{**OK, **bad}] * 3, CFG)
        assert len(warnings) == 1 and warnings[0].startswith(name), (name, warnings)


def test_condition_must_persist_for_the_window():
    hist = [OK, {**OK, "entropy": 0.0}, {**OK, "entropy": 0.0}]
    assert check_step_window(hist, CFG) == []


def test_prompt_prefill_detection():
    assert prompt_prefills_format("<|user|>What is 2+2?<|assistant|><think>") == "<think>"
    assert prompt_prefills_format("<|user|>Use <answer> tags<|assistant|>") is None
    assert prompt_prefills_format("<|user|>q<|assistant|>") is None


def test_reward_hacking():
    assert check_reward_hacking([0.2, 0.5, 0.9], [0.6, 0.5, 0.3]).startswith("possible reward hacking")
    assert check_reward_hacking([0.2, 0.5, 0.9], [0.3, 0.5, 0.6]) is None


def test_monitor_rate_limits_repeats():
    mon = HealthMonitor(CFG, repeat_every=10)
    bad = {**OK, "entropy": 0.0}
    fired = [bool(mon.observe_step(bad)) for _ in range(15)]
    assert fired.count(True) == 2 and fired[2] and fired[12]


def test_thresholds_are_strict_and_missing_metrics_pass():
    """Each limit warns only beyond it; a step without entropy/KL (no group kept, no update) is not a
    pathology; format stuck at 1 needs zero reward variance too."""
    no_update = {k: v for k, v in OK.items() if k not in ("entropy", "kl")}
    assert check_step_window([no_update] * 3, CFG) == []
    for at_the_limit in (dict(truncated_frac=0.5), dict(entropy=0.02), dict(kl=1.0), dict(zero_variance_frac=0.9),
                         dict(format_rate=1.0, reward_std=0.3)):
        assert check_step_window([{**OK, **at_the_limit}] * 3, CFG) == [], at_the_limit
    assert check_step_window([{**OK, "kl": 1.01}] * 3, CFG)[0].startswith("KL blow-up")


def test_reward_hacking_needs_a_monotone_trend_over_three_evals():
    assert check_reward_hacking([0.2, 0.9, 0.5], [0.6, 0.3, 0.5]) is None  # not monotone
    assert check_reward_hacking([0.2, 0.5], [0.6, 0.5]) is None  # two points are not a trend
    mon = HealthMonitor(CFG, repeat_every=1)
    said = [mon.observe_eval(r, a) for r, a in ((0.2, 0.6), (0.5, 0.5), (0.9, 0.3))]
    assert said[:2] == [[], []] and said[2][0].startswith("possible reward hacking")
