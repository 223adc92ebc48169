"""Eval statistics on hand-made verdicts (score() is pure); end-to-end eval runs in test_stages."""
from dataclasses import dataclass

import pytest

from sputnik.config import build
from sputnik.inference.engine import Completion
from sputnik.evaluate import EvalConfig, markdown, score


@dataclass
class V:
    correct: bool
    well_formatted: bool
    extracted: str | None


def _comp(text, n_tok=3, reason="stop"):
    return Completion(0, 0, list(range(n_tok)), [0.0] * n_tok, text, reason)


def verify(ex, text):  # text encodes the verdict: "<answer>|<fmt>"
    ans, fmt = text.split("|")
    return V(ans == ex, fmt == "1", ans or None)


def test_pass_and_majority_on_hand_made_counts():
    examples = ["4", "9"]
    comps = [[_comp("4|1"), _comp("5|1"), _comp("5|0"), _comp("4|1")],  # 2/4 correct; vote tie 4 vs 5 -> 4 first
             [_comp("1|1"), _comp("|0", reason="length"), _comp("1|1"), _comp("9|1")]]  # 1/4; vote -> 1 (wrong)
    res, _ = score(examples, comps, verify, 4)
    assert res["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert res["pass@4"] == pytest.approx(1.0)
    assert res["maj@4"] == pytest.approx(0.5)
    assert res["format_rate"] == pytest.approx((3 / 4 + 3 / 4) / 2)
    assert res["truncated_rate"] == pytest.approx(1 / 8)
    assert res["mean_length"] == 3
    lo, hi = res["pass@4_ci"]
    assert lo < 1.0 <= hi


def test_markdown_has_every_metric():
    res, _ = score(["4"], [[_comp("4|1")]], verify, 1)
    res.update(task="addition", model="m", tokens_per_s=12.0, sampling={"temperature": 0})
    md = markdown(res)
    assert "| pass@1 | 1 |" in md and "format compliance" in md and "tokens/s" in md


def test_config_guards():
    with pytest.raises(ValueError, match="greedy samples are identical"):
        build(EvalConfig, {"samples": 4, "temperature": 0})
    with pytest.raises(ValueError, match="must contain"):
        build(EvalConfig, {"prompt_template": "no placeholder"})
