"""Hostile completions: every verifier returns a Verdict quickly, never raises, never evaluates."""
import time

import pytest

from sputnik.tasks import Task, format_completion, get_task, sandbox
from sputnik.tasks.base import Example

HOSTILE = {
    "1 MB": "<think>" + "x" * 1_000_000 + "</think><answer>1</answer>",
    "1 MB digits": "9" * 1_000_000,
    "tower": "<answer>10**10**10</answer>",
    "big power": "<answer>2**99999999</answer>",
    "bare big power": "2**99999999",
    "nested parens": "<answer>" + "(" * 10_000 + "1" + ")" * 10_000 + "</answer>",
    "deep parens short": "<answer>" + "(" * 60 + "1" + ")" * 60 + "</answer>",
    "division by zero": "<answer>1/0</answer>",
    "zero over zero": "<answer>(5-5)/(3-3)</answer>",
    "import": "<answer>__import__('os').system('echo hi')</answer>",
    "empty": "",
    "answer only": "<answer>nope</answer>",
    "open tag": "<answer>",
    "many tags": "<answer>" * 10_000,
    "nan": "<answer>nan</answer>", "NaN": "<answer>NaN</answer>", "inf": "<answer>inf</answer>", "-inf": "<answer>-Infinity</answer>",
    "huge exponent": "<answer>1e999999999</answer>",
    "long number": "<answer>" + "7" * 5000 + "</answer>",
    "unicode junk": "<answer>\u202e\u0000\ufffd²½①</answer>",
}
# These reach math-verify and outlive the 0.5 s limit set here, so each costs a worker restart
# (~1-2 s of sympy imports): test them once, through the generic numeric-answer check that every
# numeric task shares.
LATEX_BOMBS = ["<answer>2^{99999999}</answer>", "<answer>10^{10^{10^{10}}}</answer>"]


def _tasks():
    yield "generic", Task(), Example("gsm8k", "q", "18", "")
    for name in ("addition", "subtraction", "multiplication", "countdown", "word_problems"):
        task = get_task(name)
        yield name, task, task.generate(1, seed=3)[0]


@pytest.mark.parametrize("name, task, example", list(_tasks()), ids=lambda x: x if isinstance(x, str) else "")
def test_hostile_completions_get_wrong_verdicts_fast(name, task, example, capfd):
    for label, completion in HOSTILE.items():
        t0 = time.monotonic()
        verdict = task.verify(example, completion)
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0, (name, label, elapsed)
        assert verdict.correct is False and verdict.well_formatted is False, (name, label, verdict)
        assert isinstance(verdict.reason, str) and verdict.reason
    assert "hi" not in capfd.readouterr().out  # nothing was executed


@pytest.mark.parametrize("completion", LATEX_BOMBS)
def test_latex_bombs_are_cut_off(completion):
    task = Task()
    task.verify_timeout_s = 0.5
    # the worker's startup (also after a previous kill) is not part of the per-check bound
    # (see sandbox.py), so wait for it outside the timed region
    sandbox.default_worker().warm()
    t0 = time.monotonic()
    verdict = task.verify(Example("gsm8k", "q", "18", ""), completion)
    assert time.monotonic() - t0 < 1.0
    assert verdict.correct is False and verdict.reason.startswith("math-verify")


def test_specific_reasons():
    task = get_task("addition")
    ex = task.generate(1)[0]
    assert task.verify(ex, HOSTILE["1 MB"]).reason == "completion longer than 100000 chars"
    assert task.verify(ex, HOSTILE["huge exponent"]).reason == "answer is not a number (exponent 999999999 outside +-30)"
    assert task.verify(ex, HOSTILE["division by zero"]).reason == "answer is not a number (division by zero)"
    cd = get_task("countdown")
    ex = cd.generate(1)[0]
    assert cd.verify(ex, HOSTILE["nested parens"]).reason == "invalid expression: expression longer than 200 chars"
    assert cd.verify(ex, HOSTILE["deep parens short"]).reason == "invalid expression: parentheses nested deeper than 32"
    assert cd.verify(ex, HOSTILE["import"]).reason.startswith("invalid expression: character '_' not allowed")
    assert cd.verify(ex, HOSTILE["zero over zero"]).reason == "invalid expression: division by zero"


def test_unicode_digits_count_as_the_number():
    task = get_task("addition")
    ex = Example("addition", "What is 978 + 2?", "980", "", {})
    arabic = "".join(chr(0x660 + int(d)) for d in "980")
    fullwidth = "".join(chr(0xFF10 + int(d)) for d in "980")
    for answer in (arabic, fullwidth):
        v = task.verify(ex, f"<think>x</think><answer>{answer}</answer>")
        assert v.correct and v.well_formatted and v.reason == "numeric match"
    assert not task.verify(ex, "<answer>98０²</answer>").correct  # superscripts are not digits


def test_formatting_is_judged_separately_from_correctness():
    task = get_task("addition")
    ex = task.generate(1)[0]
    right = format_completion(ex)
    assert task.verify(ex, right).well_formatted
    only_answer = task.verify(ex, f"<answer>{ex.answer}</answer>")
    assert only_answer.correct and not only_answer.well_formatted
    twice = task.verify(ex, f"<think>a</think><answer>0</answer><answer>{ex.answer}</answer>")
    assert twice.correct and not twice.well_formatted  # the last answer counts, but the format is wrong
    fallback = task.verify(ex, f"<think>a</think> it is {ex.answer}")
    assert fallback.correct and not fallback.well_formatted and "last number used" in fallback.reason
