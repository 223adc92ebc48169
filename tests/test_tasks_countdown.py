"""Countdown: the safe expression checker and the generator."""
from fractions import Fraction

import pytest

from sputnik.tasks import format_completion, get_task
from sputnik.tasks.countdown import ExpressionError, check_expression, evaluate


@pytest.mark.parametrize("expr, value, used", [
    ("(75-25)*4+3", 203, [75, 25, 4, 3]),
    ("8/(3-8/3)", 24, [8, 3, 8, 3]),  # exact fractions in between
    ("1-2-3", -4, [1, 2, 3]),  # left associative
    ("2*3+4*5", 26, [2, 3, 4, 5]),
    ("100/8", Fraction(25, 2), [100, 8]),
    (" ( 7 ) ", 7, [7]),
    ("6×7", 42, [6, 7]), ("84÷2", 42, [84, 2]), ("٤٢", 42, [42]),
])
def test_evaluate(expr, value, used):
    assert evaluate(expr) == (value, used)


@pytest.mark.parametrize("expr, why", [
    ("1/0", "division by zero"), ("5/(3-3)", "division by zero"), ("-3+5", "unary minus"),
    ("2**3", "unexpected '\\*'"), ("2^3", "not allowed"), ("(1+2", "unbalanced"), ("1+2)", "unbalanced"),
    ("1+", "ends too early"), ("1 2", "unexpected '2'"), ("()", "unexpected '\\)'"),
    ("1234567", "longer than 6 digits"), ("1.5*2", "not allowed"), ("x", "not allowed"),
    ("__import__('os').system('echo hi')", "not allowed"), ("(" * 33 + "1" + ")" * 33, "nested deeper than 32"),
    ("1+" * 150 + "1", "longer than 200"),
])
def test_evaluate_rejects(expr, why):
    with pytest.raises(ExpressionError, match=why):
        evaluate(expr)


@pytest.mark.parametrize("answer, ok, reason", [
    ("(75-25)*4+3", True, "reaches the target"),
    ("(75-25)*4+3 = 203", True, "reaches the target"),
    ("(75-25)*4+3 = 204", False, "claims 204, target is 203"),
    ("75*3-25+4-1", False, "uses [1] beyond the given numbers"),
    ("75+75+25+25+3", False, "uses [25, 75] beyond the given numbers"),
    ("75*4-25*3", False, "evaluates to 225, not 203"),
    ("1=2=3", False, "more than one '='"),
    ("75/0", False, "invalid expression: division by zero"),
])
def test_check_expression(answer, ok, reason):
    assert check_expression(answer, [25, 3, 75, 4], 203) == (ok, reason)


def test_multiset_and_use_all():
    assert check_expression("5*5", [5, 5, 1], 25) == (True, "reaches the target")
    assert check_expression("5*5", [5, 5, 1], 25, use_all=True) == (False, "does not use every given number")
    assert check_expression("5*5*1", [5, 5, 1], 25, use_all=True)[0]


@pytest.mark.parametrize("knobs", [{}, {"num_count": 2, "max_number": 10}, {"num_count": 6, "max_number": 1000, "max_target": 100000}])
def test_generated_examples_verify(knobs):
    task = get_task("countdown", **knobs)
    examples = task.generate(300, seed=1) + task.generate(100, split="test", seed=1)
    for ex in examples:
        numbers, target = ex.meta["numbers"], ex.meta["target"]
        assert len(numbers) == task.num_count and max(numbers) <= task.max_number and 1 <= target <= task.max_target
        assert ex.solution.endswith(f"={target}") and ex.meta["key"] == ",".join(map(str, sorted(numbers))) + f"->{target}"
        v = task.verify(ex, format_completion(ex))
        assert v.correct and v.well_formatted, (ex, v)


def test_trace_shape():
    ex = get_task("countdown", num_count=4).generate(1, seed=5)[0]
    lines = ex.solution.split("\n")
    assert lines[0].startswith("numbers ") and len(lines) == 1 + 3 + 1  # header, 3 combinations, expression
    assert lines[-1] == f"{ex.answer}={ex.meta['target']}"


def test_impossible_knobs_raise():
    with pytest.raises(ValueError, match="raise max_target"):
        get_task("countdown", num_count=6, max_number=1000, max_target=2).generate(5)
