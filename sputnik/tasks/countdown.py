"""Countdown: reach a target from given numbers with + - * / and parentheses.

Verification parses the answer with a small hand-written recursive-descent parser (never eval,
never ast on the raw text) and evaluates it with exact Fractions:

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := INTEGER | "(" expr ")"

Rules: each given number may be used at most once (as a multiset: two 5s given, two 5s allowed),
not every number has to be used, intermediate fractions are fine (8/(3-8/3) = 24), unary minus
is NOT allowed (every countdown value comes from the given positive numbers; "-(a-b)" is "b-a").
An answer may end in "= N"; then N must equal the target too. Bounds checked before parsing:
MAX_EXPR_CHARS characters and MAX_DEPTH nested parentheses (so 10,000 "(" cannot reach Python's
recursion limit), literals of at most MAX_LITERAL_DIGITS digits. With no power operator and at
most ~10 literals of 6 digits, every value stays small, so evaluation is bounded too.

Generation combines all the numbers pairwise at random, keeping every intermediate value a
positive integer, and writes one trace line per step.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from sputnik.config import knob
from sputnik.tasks.base import Example, Task
from sputnik.tasks.numbers import normalize_digits

MAX_EXPR_CHARS = 200
MAX_DEPTH = 32
MAX_LITERAL_DIGITS = 6
_OPS = "+-*/"
_ALIASES = str.maketrans({"\u00d7": "*", "\u00f7": "/", "\u2212": "-", "\u2013": "-", "\u22c5": "*", "\u00b7": "*"})


class ExpressionError(ValueError):
    """The answer is not a valid countdown expression (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Safe parsing and evaluation
def _tokenize(text: str) -> list[str]:
    tokens, i = [], 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in _OPS or c in "()":
            tokens.append(c)
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            if j - i > MAX_LITERAL_DIGITS:
                raise ExpressionError(f"number longer than {MAX_LITERAL_DIGITS} digits")
            tokens.append(text[i:j])
            i = j
        else:
            raise ExpressionError(f"character {c!r} not allowed (only digits, + - * / and parentheses)")
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.used = tokens, 0, []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("expression ends too early")
        self.pos += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.factor()
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if token == "(":
            value = self.expr()
            if self.take() != ")":
                raise ExpressionError("missing ')'")
            return value
        if token.isdigit():
            self.used.append(int(token))
            return Fraction(int(token))
        if token == "-":
            raise ExpressionError("unary minus not allowed")
        raise ExpressionError(f"unexpected {token!r}")


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """(exact value, numbers used) of a countdown expression; ExpressionError if invalid."""
    if len(expression) > MAX_EXPR_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPR_CHARS} chars")
    text = normalize_digits(expression.translate(_ALIASES))
    depth = 0
    for c in text:  # check nesting before any recursion happens
        depth += (c == "(") - (c == ")")
        if depth > MAX_DEPTH:
            raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
        if depth < 0:
            raise ExpressionError("unbalanced ')'")
    if depth:
        raise ExpressionError("unbalanced '('")
    parser = _Parser(_tokenize(text))
    value = parser.expr()
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r}")
    return value, parser.used


def check_expression(answer: str, numbers: list[int], target: int, *, use_all: bool = False) -> tuple[bool, str]:
    """Is `answer` (optionally "expr = N") a valid way to reach target from numbers (each at most
    once; exactly once with use_all, as reasoning-gym's countdown asks)?"""
    lhs, eq, rhs = answer.partition("=")
    if "=" in rhs:
        return False, "more than one '='"
    try:
        value, used = evaluate(lhs)
        claimed = evaluate(rhs)[0] if eq else target
    except ExpressionError as e:
        return False, f"invalid expression: {e}"
    if claimed != target:
        return False, f"claims {rhs.strip()[:20]}, target is {target}"
    extra = Counter(used) - Counter(numbers)
    if extra:
        return False, f"uses {sorted(extra.elements())[:10]} beyond the given numbers"
    if use_all and Counter(used) != Counter(numbers):
        return False, "does not use every given number"
    if value != target:
        return False, f"evaluates to {value}, not {target}"
    return True, "reaches the target"


# ---------------------------------------------------------------------------------------------
# Generation
def _render(op: str, left: tuple[str, int], right: tuple[str, int]) -> tuple[str, int]:
    """Join two (text, precedence) operands with minimal parentheses; + - bind 1, * / bind 2,
    atoms 3. The right side of - and / needs parentheses at equal precedence: a-(b-c) != a-b-c."""
    prec = 1 if op in "+-" else 2
    ltext = left[0] if left[1] >= prec else f"({left[0]})"
    rtext = right[0] if right[1] > prec or (right[1] == prec and op in "+*") else f"({right[0]})"
    return f"{ltext}{op}{rtext}", prec


def _combine(rng: random.Random, a: int, b: int) -> tuple[str, int, int, bool] | None:
    """Pick an operation on a, b whose result is a positive integer: (op, x, y, swapped)."""
    options = ["+", "*"]
    if a != b:
        options.append("-")
    hi, lo = max(a, b), min(a, b)
    if lo > 1 and hi % lo == 0:
        options.append("/")
    op = rng.choice(options)
    if op in "-/":
        return op, hi, lo, hi != a
    return op, a, b, False


@dataclass
class Countdown(Task):
    """Reach the target with the given numbers (each at most once) and + - * /."""
    name: ClassVar[str] = "countdown"
    description: ClassVar[str] = "reach a target from given numbers with + - * / (each number at most once)"
    num_count: int = knob(4, "how many numbers are given", min=2, max=6)
    max_number: int = knob(100, "largest given number", min=2, max=1000)
    max_target: int = knob(1000, "largest target (larger draws are rejected)", min=2, max=100000)

    def sample_problem(self, rng):
        for _ in range(10_000):  # a handful of draws unless max_target is tiny against max_number
            numbers = [rng.randint(1, self.max_number) for _ in range(self.num_count)]
            pool = [(n, (str(n), 3)) for n in numbers]
            steps = []
            while len(pool) > 1:
                (a, ea), (b, eb) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
                op, x, y, swapped = _combine(rng, a, b)
                ex, ey = (eb, ea) if swapped else (ea, eb)
                value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
                steps.append(f"{x}{op}{y}={value}")
                pool.append((value, _render(op, ex, ey)))
            target, (expression, _) = pool[0]
            if 1 <= target <= self.max_target and target not in numbers:
                key = ",".join(map(str, sorted(numbers))) + f"->{target}"
                return key, (numbers, target, steps, expression)
        raise ValueError(f"{self.name}: no target in 1..{self.max_target} found for {self.knobs()}; "
                         "raise max_target or lower max_number")

    def build_example(self, key, problem, split):
        numbers, target, steps, expression = problem
        listed = ", ".join(map(str, numbers))
        prompt = (f"Using the numbers {listed}, make {target}. You may use + - * / and parentheses, "
                  f"each number at most once. Answer with the expression.")
        solution = "\n".join([f"numbers {listed}, target {target}", *steps, f"{expression}={target}"])
        return Example(self.name, prompt, expression, solution,
                       {"key": key, "split": split, "numbers": numbers, "target": target})

    def check_answer(self, example, answer):
        return check_expression(answer, list(example.meta["numbers"]), int(example.meta["target"]))
