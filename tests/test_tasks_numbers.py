"""Answer extraction and number canonicalisation (the in-process fast path)."""
from fractions import Fraction

import pytest

from sputnik.tasks.numbers import (canonical, canonical_number, extract_answer, is_well_formatted, match_answer,
                                   parse_number, try_number)


@pytest.mark.parametrize("text, value", [
    ("42", 42), ("42.0", 42), ("4.2e1", 42), ("+42", 42), ("-42", -42), ("1,234", 1234), ("1,234,567.5", Fraction(2469135, 2)),
    ("3/4", Fraction(3, 4)), ("0.75", Fraction(3, 4)), (".5", Fraction(1, 2)), ("5.", 5), ("-3/4", Fraction(-3, 4)),
    ("\\frac{3}{4}", Fraction(3, 4)), ("\\dfrac{6}{8}", Fraction(3, 4)), ("\\boxed{42}", 42), ("$\\boxed{42}$", 42),
    ("$18", 18), ("-$5", -5), ("50%", 50), ("42.", 42), (" 42 ", 42), ("1e-3", Fraction(1, 1000)),
    ("٤٢", 42), ("４２", 42), ("४२", 42), ("\u22124", -4), ("١٫٥", Fraction(3, 2)),
])
def test_parse_number_accepts(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text, why", [
    ("nan", "not a number"), ("inf", "not a number"), ("-Infinity", "not a number"), ("", "not a number"),
    ("12,34", "not a number"), ("1e31", "exponent"), ("1e999999999", "exponent"), ("9" * 101, "longer than 100"),
    ("1/0", "division by zero"), ("²", "non-ASCII"), ("½", "non-ASCII"), ("x²", "non-ASCII"), ("3/4/5", "not a number"),
    ("10**10", "not a number"), ("0x1A", "not a number"),
])
def test_parse_number_rejects(text, why):
    with pytest.raises(ValueError, match=why):
        parse_number(text)
    assert try_number(text) is None


@pytest.mark.parametrize("value, text", [
    (Fraction(42), "42"), (Fraction(-3, 4), "-0.75"), (Fraction(1, 3), "1/3"), (Fraction(1, 8), "0.125"),
    (Fraction(-7, 1), "-7"), (Fraction(123, 100), "1.23"), (Fraction(1, 20), "0.05"),
])
def test_canonical(value, text):
    assert canonical(value) == text
    assert parse_number(text) == value


def test_canonical_number():
    assert canonical_number("1,000") == "1000"
    assert canonical_number("51.0") == "51"
    assert canonical_number("4.20") == "4.2"


@pytest.mark.parametrize("completion, text, well, how", [
    ("<think>a</think><answer>42</answer>", "42", True, "tag"),
    ("  <think>a\nb</think>\n<answer> 42 </answer>\n", "42", True, "tag"),
    ("<answer>42</answer>", "42", False, "tag"),  # no think block
    ("<think>a</think><answer>1</answer><answer>2</answer>", "2", False, "tag"),  # last answer wins
    ("<think>a</think><answer>1</answer> trailing", "1", False, "tag"),
    ("hi <think>a</think><answer>1</answer>", "1", False, "tag"),
    ("<think>a</think>so 3 then 17", "17", False, "no <answer> tag: last number used"),
    ("7 <think>a 5</think> nothing", None, False, "no <answer> tag and no number"),
    ("the answer is 1,234.", "1,234", False, "no <answer> tag: last number used"),
    ("<answer>42", "42", False, "no <answer> tag: last number used"),  # unclosed tag
    ("<think><think>a</think><answer>1</answer>", "1", False, "tag"),
    ("", None, False, "no <answer> tag and no number"),
])
def test_extract_answer(completion, text, well, how):
    ext = extract_answer(completion)
    assert (ext.text, ext.well_formatted, ext.how) == (text, well, how)


def test_well_formatted_requires_order():
    assert not is_well_formatted("<answer>1</answer><think>a</think>")
    assert not is_well_formatted("<think>a</think>x<answer>1</answer>")


@pytest.mark.parametrize("gold, answer, correct, reason", [
    ("42", "42.0", True, "numeric match"),
    ("0.75", "3/4", True, "numeric match"),
    ("42", "43", False, "numeric mismatch"),
    ("18", "18 dollars", True, "number in answer text matches"),
    ("18", "between 17 and 19", False, "answer is not a number (not a number)"),
    ("42", "4.2e99", False, "answer is not a number (exponent 99 outside +-30)"),
    ("42", "", False, "empty answer"),
    ("42", "x" * 1001, False, "answer longer than 1000 chars"),
    ("Paris", "paris.", True, "text match"),
    ("Paris", "Rome", False, "text mismatch"),
])
def test_match_answer(gold, answer, correct, reason):
    assert match_answer(gold, answer) == (correct, reason)
