"""Answer extraction and number canonicalisation: the in-process fast path of every verifier.

Extraction (`extract_answer`):
  answer         the text inside the LAST complete `<answer>...</answer>` pair
  fallback       no complete pair: the last number in the text after the last `</think>` (or in
                 the whole text when there is none); such a completion is never well formatted
  well_formatted ws* `<think>` T `</think>` ws* `<answer>` A `</answer>` ws*, each tag exactly once

Numbers (`parse_number`) become exact `fractions.Fraction`s, so 42 == 42.0 == 4.2e1 == +42 and
3/4 == 0.75. Accepted: sign, digits with optional thousands commas (groups of exactly three:
"1,234"), decimals (".5", "5."), exponents, "a/b", "\\frac{a}{b}", "\\boxed{..}", "$..$",
a leading currency "$" and a trailing "%" (read as a unit: "50%" == 50, GSM8K style).
Unicode: decimal digits of any script (category Nd: Arabic-Indic "٤٢", fullwidth "４２",
Devanagari ...) map to ASCII via unicodedata.decimal; other numeric characters (superscript "²",
vulgar fraction "½", circled "①") are rejected, because NFKC would read "x²" as "x2".
Limits, checked before Fraction() runs: strings over MAX_NUMBER_CHARS and exponents with
|e| > MAX_EXPONENT ("1e999999999" would build a billion-digit integer). NaN and inf are not numbers.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

MAX_COMPLETION_CHARS = 100_000  # ~25k tokens: far beyond any generation budget we use
MAX_ANSWER_CHARS = 1_000        # an answer longer than this is not an answer
MAX_NUMBER_CHARS = 100
MAX_EXPONENT = 30               # 1e30 is far past any answer our tasks or GSM8K have

THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"

# Non-ASCII punctuation that models and fullwidth keyboards produce inside numbers.
_PUNCT = str.maketrans({"\u2212": "-", "\uff0d": "-", "\uff0b": "+", "\uff0c": ",", "\uff0e": ".",
                        "\uff0f": "/", "\u066b": ".", "\u066c": ",", "\u2044": "/"})
_NUMBER = re.compile(r"([+-]?)(\d{1,3}(?:,\d{3})+|\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?", re.ASCII)
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
# A number token inside free text (Unicode digits included: \d is Unicode-aware on str patterns).
NUMBER_TOKEN = re.compile(r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?")


# ---------------------------------------------------------------------------------------------
# Extraction
@dataclass(frozen=True)
class Extraction:
    text: str | None      # the answer text (None: nothing found)
    well_formatted: bool
    how: str              # "tag", or why/where the fallback looked


def is_well_formatted(completion: str) -> bool:
    """Exactly one think block then one answer block, only whitespace around and between."""
    s = completion.strip()
    if any(s.count(tag) != 1 for tag in (THINK, THINK_END, ANSWER, ANSWER_END)):
        return False
    if not (s.startswith(THINK) and s.endswith(ANSWER_END)):
        return False
    close_think, open_answer = s.index(THINK_END), s.index(ANSWER)
    return close_think < open_answer and s[close_think + len(THINK_END):open_answer].strip() == ""


def extract_answer(completion: str) -> Extraction:
    """See the module docstring. Linear time; the caller bounds the length."""
    well = is_well_formatted(completion)
    end = completion.rfind(ANSWER_END)
    start = completion.rfind(ANSWER, 0, end) if end >= 0 else -1
    if start >= 0:
        return Extraction(completion[start + len(ANSWER):end].strip(), well, "tag")
    after = completion.rsplit(THINK_END, 1)[-1]
    last = None
    for last in NUMBER_TOKEN.finditer(after):
        pass
    if last is None:
        return Extraction(None, False, "no <answer> tag and no number")
    return Extraction(last.group(0), False, "no <answer> tag: last number used")


# ---------------------------------------------------------------------------------------------
# Numbers
def normalize_digits(text: str) -> str:
    """Map Unicode decimal digits (category Nd) and fullwidth/Arabic number punctuation to ASCII;
    leave every other character alone (the number grammar then rejects it)."""
    if text.isascii():
        return text
    text = text.translate(_PUNCT)
    return "".join(c if c.isascii() or unicodedata.decimal(c, None) is None else str(unicodedata.decimal(c))
                   for c in text)


def _unwrap(s: str) -> str:
    """Strip presentation around a number: $..$, \\(..\\), \\boxed{..}, currency $, %, final '.'."""
    for _ in range(3):  # nested wrappers like $\boxed{42}$
        before = s
        s = s.strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s[1:-1]
        elif s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2]
        elif s.startswith("\\boxed{") and s.endswith("}"):
            s = s[len("\\boxed{"):-1]
        if s == before:
            break
    s = s.strip()
    if s.startswith("$"):
        s = s[1:].lstrip()
    elif s.startswith("-$") or s.startswith("+$"):
        s = s[0] + s[2:].lstrip()
    if s.endswith("%"):
        s = s[:-1].rstrip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1]
    return s.strip()


def _decimal(s: str) -> Fraction:
    """One decimal literal -> Fraction, or ValueError with the reason."""
    m = _NUMBER.fullmatch(s)
    if m is None or not (m.group(2) or m.group(3)):
        raise ValueError("not a number")
    sign, whole, frac, exp = m.groups()
    exponent = int(exp) if exp is not None else 0  # at most ~100 digits: the length is bounded
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent {exp} outside +-{MAX_EXPONENT}")
    value = Fraction(int(whole.replace(",", "") or "0")) + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)
    value *= Fraction(10) ** exponent
    return -value if sign == "-" else value


def parse_number(text: str) -> Fraction:
    """Text -> exact Fraction, or ValueError naming why (see the module docstring)."""
    if not isinstance(text, str):
        raise ValueError(f"not a string: {type(text).__name__}")
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"longer than {MAX_NUMBER_CHARS} chars")
    s = _unwrap(normalize_digits(text))
    if not s.isascii():
        raise ValueError("non-ASCII character that is not a decimal digit")
    m = _FRAC.fullmatch(s)
    num, den = (m.group(1), m.group(2)) if m else (s.split("/", 1) if s.count("/") == 1 else (s, None))
    value = _decimal(num.strip())
    if den is None:
        return value
    d = _decimal(den.strip())
    if d == 0:
        raise ValueError("division by zero")
    return value / d


def try_number(text: str) -> Fraction | None:
    try:
        return parse_number(text)
    except ValueError:
        return None


def canonical(value: Fraction) -> str:
    """Fraction -> shortest exact string: "42", "-0.75", "1/3" (non-terminating decimals stay fractions)."""
    if value.denominator == 1:
        return str(value.numerator)
    d, twos, fives = value.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    digits = str(abs(value.numerator) * 10 ** places // value.denominator).rjust(places + 1, "0")
    return ("-" if value < 0 else "") + digits[:-places] + "." + digits[-places:]


def canonical_number(text: str) -> str:
    """"1,234.50" -> "1234.5"; ValueError if `text` is not a number."""
    return canonical(parse_number(text))


# ---------------------------------------------------------------------------------------------
# Comparing an answer with the gold
def looks_symbolic(text: str) -> bool:
    """LaTeX or powers: worth the (out-of-process) math-verify check."""
    return "\\" in text or "^" in text or "{" in text


def _only_words_around(text: str, token: str) -> bool:
    """True when, apart from `token`, the text has no operators and no other numeric characters
    ("18 dollars" yes; "98²", "2^10", "3*6" no), so reading it as that one number is fair."""
    rest = text.replace(token, " ", 1)
    return not any(c in "^*/+-×÷√\\{}()<>" or unicodedata.numeric(c, None) is not None for c in rest)


def normalize_text(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".").strip()


def match_answer(gold: str, answer: str, *, symbolic_timeout_s: float = 1.5) -> tuple[bool, str]:
    """(correct, reason). Numbers compare exactly in-process; an answer whose text holds exactly
    one number is read as that number ("18 dollars"); LaTeX goes to math-verify in a worker with
    a hard timeout; anything else compares as case- and whitespace-normalised text."""
    answer = answer.strip()
    if not answer:
        return False, "empty answer"
    if len(answer) > MAX_ANSWER_CHARS:
        return False, f"answer longer than {MAX_ANSWER_CHARS} chars"
    gold_value = try_number(gold)
    if gold_value is not None:
        try:
            value = parse_number(answer)
            return value == gold_value, "numeric match" if value == gold_value else "numeric mismatch"
        except ValueError as e:
            why = str(e)
        tokens = NUMBER_TOKEN.findall(answer)
        if len(tokens) == 1 and _only_words_around(answer, tokens[0]):
            value = try_number(tokens[0])
            if value is not None:
                return value == gold_value, "number in answer text " + ("matches" if value == gold_value else "differs")
        if not looks_symbolic(answer):
            return False, f"answer is not a number ({why})"
    if looks_symbolic(answer) or looks_symbolic(gold):
        from sputnik.tasks.symbolic import math_equal  # lazy: the worker is only started when needed

        return math_equal(gold, answer, timeout_s=symbolic_timeout_s)
    ok = normalize_text(answer) == normalize_text(gold)
    return ok, "text match" if ok else "text mismatch"
