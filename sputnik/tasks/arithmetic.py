"""Multi-digit addition, subtraction and long multiplication with written-out column traces.

The traces are what a ~5M-parameter model learns to imitate, so they are short, regular lines in
the order a person writes them (least significant column first), and every trace ends with the
full equation, e.g. for 4821 + 397:

    1+7=8, write 8
    2+9=11, write 1 carry 1
    8+3+1=12, write 2 carry 1
    4+0+1=5, write 5
    4821+397=5218

Missing digits of the shorter operand are written as 0 so every column line has the same shape.
Subtraction always has a >= b (no negative results) and borrows are written "12-9-1=2, write 2
borrow 1" (the 1 in front of the top digit is the borrowed ten). Multiplication writes one
partial product per non-zero digit of the second factor, shifted, then adds them up; with
trace="digits" every partial product and every sum is itself worked digit by digit, in the same
line shapes as addition, so that no line needs more than a one-digit product plus a carry:

    47*36:
    7*6=42, write 2 carry 4
    4*6+4=28, write 28
    47*6=282
    7*3=21, write 1 carry 2
    4*3+2=14, write 14
    47*30=1410
    2+0=2, write 2
    8+1=9, write 9
    2+4=6, write 6
    0+1=1, write 1
    282+1410=1692
    47*36=1692
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

from sputnik.config import knob
from sputnik.tasks.base import Example, Task


_DIGIT_RUN = re.compile(r"\d+")


def lsb(n: int) -> str:
    """n written least significant digit first: 5218 -> "8125"."""
    return str(n)[::-1]


def sample_int(rng: random.Random, min_digits: int, max_digits: int) -> int:
    """Uniform digit count in [min_digits, max_digits], then uniform among numbers with that many
    digits (so 5-digit numbers are not 10x rarer than 4-digit ones)."""
    d = rng.randrange(min_digits, max_digits + 1)  # randrange: randint's extra call costs ~15%
    return rng.randrange(10) if d == 1 else rng.randrange(10 ** (d - 1), 10 ** d)


def _columns(a: int, b: int) -> list[tuple[int, int]]:
    """Digit pairs, least significant first, the shorter number padded with 0."""
    sa, sb = str(a)[::-1], str(b)[::-1]
    width = max(len(sa), len(sb))
    return [(int(sa[i]) if i < len(sa) else 0, int(sb[i]) if i < len(sb) else 0) for i in range(width)]


def _column_sums(columns: list[tuple[int, int]]) -> list[tuple[str, int, int]]:
    """(left-hand side "x+y[+1]", its total, the carry out) of each column, carrying from the last."""
    sums, carry = [], 0
    for x, y in columns:
        total = x + y + carry
        sums.append((f"{x}+{y}" + ("+1" if carry else ""), total, total // 10))
        carry = total // 10
    return sums


def addition_trace(a: int, b: int) -> list[str]:
    sums = _column_sums(_columns(a, b))
    lines = [f"{lhs}={total}, write {total % 10}" + (" carry 1" if carry else "") for lhs, total, carry in sums]
    if sums[-1][2]:
        lines.append("write the carry 1")
    return lines + [f"{a}+{b}={a + b}"]


def subtraction_trace(a: int, b: int) -> list[str]:
    assert a >= b, "subtraction traces are written for a >= b"
    lines, borrow = [], 0
    for x, y in _columns(a, b):
        lhs = f"{x}-{y}" + ("-1" if borrow else "")
        value = x - y - borrow
        if value < 0:  # borrow a ten from the next column: write the top digit as 1x
            value += 10
            lhs = f"1{x}-{y}" + ("-1" if borrow else "")
            borrow = 1
        else:
            borrow = 0
        lines.append(f"{lhs}={value}, write {value}" + (" borrow 1" if borrow else ""))
    return lines + [f"{a}-{b}={a - b}"]


def multiplication_trace(a: int, b: int) -> list[str]:
    lines, partials = [], []
    for place, digit in enumerate(int(d) for d in str(b)[::-1]):
        if digit == 0:
            continue  # people skip zero rows; the shift of later rows still accounts for them
        shifted = digit * 10 ** place
        partials.append(a * shifted)
        lines.append(f"{a}*{shifted}={a * shifted}")
    if len(partials) <= 1:  # one partial product is the answer itself: don't write it twice
        return [f"{a}*{b}={a * b}"]
    running = partials[0]
    for p in partials[1:]:
        lines.append(f"{running}+{p}={running + p}")
        running += p
    return lines + [f"{a}*{b}={a * b}"]


def digit_product_trace(a: int, digit: int, place: int) -> list[str]:
    """a * digit column by column (least significant first), then the shifted partial product."""
    lines, carry = [], 0
    digits = [int(d) for d in str(a)[::-1]]
    for i, x in enumerate(digits):
        total = x * digit + carry
        lhs = f"{x}*{digit}" + (f"+{carry}" if carry else "")
        if i == len(digits) - 1:  # the last column writes its whole value
            lines.append(f"{lhs}={total}, write {total}")
        else:
            carry = total // 10
            lines.append(f"{lhs}={total}, write {total % 10}" + (f" carry {carry}" if carry else ""))
    return lines + [f"{a}*{digit * 10 ** place}={a * digit * 10 ** place}"]


def long_multiplication_trace(a: int, b: int) -> list[str]:
    """multiplication_trace with every partial product and running sum worked digit by digit."""
    lines, partials = [f"{a}*{b}:"], []
    for place, digit in enumerate(int(d) for d in str(b)[::-1]):
        if digit == 0:
            continue
        lines += digit_product_trace(a, digit, place)
        partials.append(a * digit * 10 ** place)
    if not partials:
        return [f"{a}*{b}=0"]
    running = partials[0]
    for p in partials[1:]:
        lines += addition_trace(running, p)
        running += p
    if len(partials) > 1 or lines[-1] != f"{a}*{b}={a * b}":
        lines.append(f"{a}*{b}={a * b}")
    return lines


HINT_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_PLACE = re.compile(r"([a-z])(\d)")  # a (letter, digit) place of a hinted number


def hint_places(key: str, places: int) -> str:
    """The place letters of one problem: `places` letters of the alphabet in order, a random subset
    drawn from the problem's key (so a problem always has the same hints, and every letter is
    trained as a place even when only short numbers are)."""
    return "".join(sorted(random.Random(f"hints|{key}").sample(HINT_LETTERS, places)))


def hinted(n: int, letters: str) -> str:
    """n's digits least significant first, each after its place letter, zero-padded to every place:
    hinted(5218, "bdfhk") = "b8d1f2h5k0"."""
    digits = str(n)[::-1].ljust(len(letters), "0")
    assert len(digits) == len(letters), f"{n} has more digits than places {letters!r}"
    return "".join(p + d for p, d in zip(letters, digits))


def _pairs(text: str) -> list[str]:
    return [text[i:i + 2] for i in range(0, len(text), 2)]


def hinted_addition_trace(a: int, b: int, letters: str) -> list[str]:
    """One line per place, named by its letter, the written digit tagged with it again:
    "c: 8+3+1=12, write=c2 carry 1". Every digit a line needs is found by its letter (the digit
    after c in the first operand, after C in the second), never by counting positions."""
    columns = _columns(a, b)
    assert len(columns) < len(letters), f"{a}+{b} needs a padding place beyond {letters!r}"
    sums = _column_sums(columns + [(0, 0)] * (len(letters) - len(columns)))
    assert sums[-1][2] == 0, "the top place of a hinted addition is padding: it never carries out"
    return [f"{p}: {lhs}={total}, write={p}{total % 10}" + (" carry 1" if carry else "")
            for p, (lhs, total, carry) in zip(letters, sums, strict=True)]


def _digits_knob(default: int, what: str):
    return knob(default, f"{what} (digits)", min=1, max=30)


@dataclass
class Addition(Task):
    """a + b with column-by-column carries.

    digit_order="lsb" writes every number of the prompt, trace and answer least significant digit
    first ("4821 + 397" is asked as "1284 + 793", answered "8125"), the format in which the i-th digit
    of each operand and of the answer is the same place (with Abacus positions: the same index). Its
    answers are digit strings, checked exactly (a leading zero is a digit). trace="none": answer only.

    index_hints=True (with digit_order="lsb") tags every digit with a place letter, the index hints of
    Zhou et al. (2023), "What Algorithms can Transformers Learn?": 4821 + 397 is asked as
    "What is (a1b2c8d4e0) + (A7B9C3D0E0)?" (the top place is padding, so the sum never needs a new
    one), each trace line names its place ("c: 8+3+1=12, write=c2 carry 1") and the answer is
    "a8b1c2d5e0", checked exactly. A problem's letters are an ordered random subset of the alphabet,
    drawn from its key: every letter is seen as a place in training, so an (n+1)-digit problem needs
    no new token, and each lookup is by letter, not by counting positions. pad_places=N writes at least
    N places (zeros on top): with N above the longest trained length + 1, a trace's line count is N for
    every trained length, and a longer problem differs only in the digits of its top places.
    """
    name: ClassVar[str] = "addition"
    description: ClassVar[str] = "multi-digit addition, digit by digit with carries"
    min_digits: int = _digits_knob(1, "smallest operand length")
    max_digits: int = _digits_knob(4, "largest operand length")
    digit_order: str = knob("msb", "msb: numbers as usual; lsb: every number written least significant digit first",
                            choices=("msb", "lsb"))
    trace: str = knob("columns", "columns: one line per column; none: the answer alone", choices=("columns", "none"))
    index_hints: bool = knob(False, "tag every digit with a place letter (needs digit_order=lsb; addition only)")
    shuffle_places: bool = knob(False, "index hints: the prompt lists each number's places in a random order (the "
                                       "trace and answer keep place order): a digit is found by its letter only")
    pad_places: int = knob(0, "index hints: write every number with at least N places, zeros on top (a problem's "
                              "places: max(its digits + 1, N); 0 = its digits + 1)", min=0, max=len(HINT_LETTERS))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_digits > self.max_digits:
            raise ValueError(f"{self.name}: min_digits={self.min_digits} > max_digits={self.max_digits}")
        if self.index_hints:
            if self.name != "addition":
                raise ValueError(f"{self.name}: index_hints is written for addition only")
            if self.digit_order != "lsb":
                raise ValueError(f"{self.name}: index_hints=true writes digits least significant first: set digit_order=lsb")
            if self.max_digits + 1 > len(HINT_LETTERS):
                raise ValueError(f"{self.name}: index_hints needs max_digits + 1 <= {len(HINT_LETTERS)} places "
                                 f"(one letter each), got max_digits={self.max_digits}")
        elif self.pad_places or self.shuffle_places:
            raise ValueError(f"{self.name}: pad_places / shuffle_places write index-hinted numbers: set index_hints=true")

    def sample_problem(self, rng):
        a, b = sample_int(rng, self.min_digits, self.max_digits), sample_int(rng, self.min_digits, self.max_digits)
        return f"{a}+{b}", (a, b)

    def build_example(self, key, problem, split):
        a, b = problem
        if self.index_hints:
            letters = hint_places(key, max(len(str(max(a, b))) + 1, self.pad_places))
            a_text, b_text = hinted(a, letters), hinted(b, letters).upper()
            if self.shuffle_places:  # each number's (letter, digit) pairs in an order drawn from the problem
                order = random.Random(f"shuffle|{key}")
                a_text, b_text = ("".join(order.sample(_pairs(t), len(letters))) for t in (a_text, b_text))
            prompt = f"What is ({a_text}) + ({b_text})?"
            trace = "" if self.trace == "none" else "\n".join(hinted_addition_trace(a, b, letters))
            return Example(self.name, prompt, hinted(a + b, letters), trace, {"key": key, "split": split})
        return self._example(key, split, a, "+", b, a + b, addition_trace(a, b))

    def _example(self, key, split, a: int, op: str, b: int, result: int, lines: list[str]) -> Example:
        if self.digit_order == "msb":
            prompt, answer = f"What is {a} {op} {b}?", str(result)
        else:  # every maximal digit run of the trace reversed: its numbers read least significant first
            prompt, answer = f"What is {lsb(a)} {op} {lsb(b)}? (digits least significant first)", lsb(result)
            lines = [_DIGIT_RUN.sub(lambda m: m[0][::-1], line) for line in lines]
        return Example(self.name, prompt, answer, "" if self.trace == "none" else "\n".join(lines),
                       {"key": key, "split": split})

    def check_answer(self, example, answer):
        if self.digit_order == "msb":  # (index hints are lsb: their answers are checked exactly below)
            return super().check_answer(example, answer)
        got = answer.strip()
        return got == example.answer, f"digits {got!r} {'==' if got == example.answer else '!='} {example.answer!r}"


@dataclass
class Subtraction(Addition):
    """a - b (a >= b) with column-by-column borrows."""
    name: ClassVar[str] = "subtraction"
    description: ClassVar[str] = "multi-digit subtraction (non-negative result), digit by digit with borrows"

    def sample_problem(self, rng):
        a, b = sample_int(rng, self.min_digits, self.max_digits), sample_int(rng, self.min_digits, self.max_digits)
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}", (a, b)

    def build_example(self, key, problem, split):
        a, b = problem
        return self._example(key, split, a, "-", b, a - b, subtraction_trace(a, b))


@dataclass
class Multiplication(Task):
    """a * b by long multiplication: shifted partial products, then their running sum."""
    name: ClassVar[str] = "multiplication"
    description: ClassVar[str] = "long multiplication: partial products, then their sum"
    max_digits_a: int = knob(3, "largest first factor (digits; the smallest has 1)", min=1, max=12)
    max_digits_b: int = knob(2, "largest second factor (digits; the smallest has 1)", min=1, max=12)
    min_digits_a: int = knob(1, "smallest first factor (digits)", min=1, max=12)
    min_digits_b: int = knob(1, "smallest second factor (digits)", min=1, max=12)
    trace: str = knob("partials", "partials: one line per shifted partial product, then their sums; digits: "
                      "every product and sum worked digit by digit (a chain of thought a small model can "
                      "follow)", choices=("partials", "digits"))

    def __post_init__(self) -> None:
        super().__post_init__()
        for x in ("a", "b"):
            lo, hi = getattr(self, f"min_digits_{x}"), getattr(self, f"max_digits_{x}")
            if lo > hi:
                raise ValueError(f"{self.name}: min_digits_{x}={lo} > max_digits_{x}={hi}")

    def sample_problem(self, rng):
        a = sample_int(rng, self.min_digits_a, self.max_digits_a)
        b = sample_int(rng, self.min_digits_b, self.max_digits_b)
        return f"{a}*{b}", (a, b)

    def build_example(self, key, problem, split):
        a, b = problem
        trace = long_multiplication_trace(a, b) if self.trace == "digits" else multiplication_trace(a, b)
        return Example(self.name, f"What is {a} * {b}?", str(a * b), "\n".join(trace),
                       {"key": key, "split": split})


def place_credit(prompt: str, completion: str, answer: str, **meta) -> float:
    """Partial credit for an index-hinted answer: the share of its places (letter, digit) that the
    completion's answer gets right, over the larger of the two place counts (so extra places cost).
    A dense reward for RL where exact matches are rare (`sputnik rl --reward_fn
    sputnik.tasks.arithmetic:place_credit`): a sample that gets one more place right scores higher."""
    from sputnik.tasks.numbers import extract_answer

    want = dict(_PLACE.findall(answer))
    if not want:
        raise ValueError(f"place_credit scores index-hinted answers (letter, digit pairs), got {answer!r}")
    got_pairs = _PLACE.findall(extract_answer(completion).text or "")
    got = dict(got_pairs)
    right = sum(got.get(letter) == digit for letter, digit in want.items())
    return right / max(len(want), len(got_pairs))
