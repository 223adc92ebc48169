"""Symbolic answer equality with math-verify, run in the sandbox worker under a hard timeout.

Only LaTeX extraction is used (`LatexExtractionConfig`): math-verify's plain-expression extraction
hands the text to sympy's `parse_expr`, which is eval-based and will happily try `18**14**8`.
Plain numbers never come here (numbers.match_answer handles them in-process). Bare LaTeX such as
`\\frac{\\sqrt{2}}{2}` is retried wrapped in `$...$`, since math-verify only finds LaTeX inside
delimiters or `\\boxed{}`.
"""
from __future__ import annotations

from sputnik.tasks import sandbox

MAX_SYMBOLIC_CHARS = 1_000


def math_equal(gold: str, answer: str, timeout_s: float = 1.5) -> tuple[bool, str]:
    """(equal, reason). Never raises: a timeout or worker failure is an incorrect answer."""
    if len(gold) > MAX_SYMBOLIC_CHARS or len(answer) > MAX_SYMBOLIC_CHARS:
        return False, f"symbolic answer longer than {MAX_SYMBOLIC_CHARS} chars"
    try:
        equal = sandbox.call("math_verify", {"gold": gold, "answer": answer}, timeout_s)
    except sandbox.SandboxTimeout:
        return False, f"math-verify timed out after {timeout_s:g}s"
    except sandbox.SandboxError as e:
        return False, f"math-verify failed: {str(e)[:200]}"
    return (True, "math-verify: equal") if equal is True else (False, "math-verify: not equal")


# ---------------------------------------------------------------------------------------------
# Worker side (runs inside sandbox.serve)
def _parse(text: str):
    from math_verify import LatexExtractionConfig, parse

    # math-verify's own alarm-based timeout is a soft inner limit; the worker kill is the hard one.
    parsed = parse(text, [LatexExtractionConfig()], parsing_timeout=1)
    if not parsed and "$" not in text:
        parsed = parse(f"${text}$", [LatexExtractionConfig()], parsing_timeout=1)
    return parsed


def worker_math_equal(gold: str, answer: str) -> bool:
    from math_verify import verify

    gold_parsed, answer_parsed = _parse(gold), _parse(answer)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=1))
