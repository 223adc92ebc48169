"""The killable worker: math-verify through it, hard timeouts, restarts, thread safety."""
import threading
import time

import pytest

from sputnik.tasks import sandbox
from sputnik.tasks.symbolic import math_equal


@pytest.fixture(scope="module")
def worker():
    w = sandbox.default_worker()
    w.warm()  # startup (importing sympy) is not part of any call's deadline
    return w


@pytest.mark.parametrize("gold, answer, equal", [
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\frac{\\sqrt{2}}{2}", "$0.7071067811865476$", True),
    ("1", "\\sin^2(x)+\\cos^2(x)", True),
    ("\\pi", "3", False),
    ("42", "\\frac{1}{0}", False),
])
def test_math_equal(worker, gold, answer, equal):
    assert math_equal(gold, answer)[0] is equal


def test_timeout_kills_and_the_next_call_works(worker):
    before = worker.restarts
    t0 = time.monotonic()
    with pytest.raises(sandbox.SandboxTimeout, match="longer than 0.3s"):
        worker.call("sleep", {"seconds": 30}, timeout_s=0.3)
    assert time.monotonic() - t0 < 1.0
    assert worker.restarts == before + 1
    assert worker.call("sleep", {"seconds": 0}, timeout_s=30) == 0
    assert math_equal("\\frac{3}{4}", "\\frac{6}{8}") == (True, "math-verify: equal")


def test_errors_come_back_as_sandbox_errors(worker):
    with pytest.raises(ValueError, match="unknown sandbox op 'eval'"):
        worker.call("eval", {"code": "1"}, timeout_s=1)
    with pytest.raises(sandbox.SandboxError, match="TypeError"):
        worker.call("sleep", {"nonsense": 1}, timeout_s=5)
    assert worker.call("sleep", {"seconds": 0.01}, timeout_s=5) == 0.01  # the worker survived


def test_math_equal_timeout_is_a_verdict_not_an_exception(worker):
    t0 = time.monotonic()
    ok, reason = math_equal("42", "x^{99999999}-y^{99999999}+\\prod_{i=1}^{100000} i", timeout_s=0.2)
    assert not ok and time.monotonic() - t0 < 1.0 and reason.startswith("math-verify")
    assert math_equal("2", "x" * 2000) == (False, "symbolic answer longer than 1000 chars")


def test_threads_share_the_worker_safely(worker):
    results = [None] * 6

    def check(i):
        results[i] = math_equal(f"\\frac{{{i}}}{{7}}", f"\\frac{{{2 * i}}}{{14}}")[0]

    threads = [threading.Thread(target=check, args=(i,)) for i in range(1, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[1:] == [True] * 5


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/limits"), reason="needs Linux /proc")
def test_worker_has_an_address_space_limit(worker):
    limits = open(f"/proc/{worker._proc.pid}/limits").read()
    line = next(l for l in limits.splitlines() if l.startswith("Max address space"))
    assert line.split()[3] == str(sandbox.MEMORY_LIMIT_BYTES)  # so 10**10**10 is a MemoryError, not an OOM kill
