"""Task base: the hash split, determinism, knob validation, totality of verify()."""
import json

import pytest

from sputnik.tasks import get_task
from sputnik.tasks.arithmetic import Addition
from sputnik.tasks.base import Example, Task, Verdict, format_completion, split_of

PROCEDURAL = ["addition", "subtraction", "multiplication", "countdown", "word_problems"]


def test_split_of_is_pinned():
    # blake2b-64 of the key < 0.1 * 2**64: these values must never change (it would re-split data)
    tests = [i for i in range(200) if split_of(f"{i}+{i}") == "test"]
    assert tests == [0, 38, 54, 72, 81, 91, 102, 108, 123, 126, 149, 150, 155, 164, 177, 187]
    assert split_of("4821+397") == "train"


def test_test_fraction_is_about_ten_percent():
    share = sum(split_of(f"problem {i}") == "test" for i in range(20_000)) / 20_000
    assert 0.09 < share < 0.11


def test_train_and_test_disjoint_over_100k_problems():
    # ~100k draws (45k train problems + 5k test ones, at 1 in 10). 2-3 digit operands give ~8e5
    # distinct problems, so a split that ignored the key would collide ~250 times here.
    task = Addition(min_digits=2, max_digits=3)
    train = {key for key, _ in task.problems(45_000, split="train", seed=1)}
    test = {key for key, _ in task.problems(5_000, split="test", seed=1)}
    assert len(train) > 35_000 and len(test) > 4_000  # some repeats: 2-digit operands are common
    assert not train & test
    assert all(split_of(k) == "test" for k in test) and not any(split_of(k) == "test" for k in train)


@pytest.mark.parametrize("name", PROCEDURAL)
def test_generate_deterministic_split_tagged_and_json(name):
    task = get_task(name)
    a = task.generate(30, split="test", seed=7)
    assert a == task.generate(30, split="test", seed=7)
    assert a != task.generate(30, split="test", seed=8)
    for ex in a:
        assert ex.task == name and ex.meta["split"] == "test" and split_of(ex.meta["key"]) == "test"
        json.dumps(ex.meta)  # meta must be serialisable (datasets on disk, sandbox IPC)
    train_keys = {ex.meta["key"] for ex in task.generate(300, split="train", seed=7)}
    assert not train_keys & {ex.meta["key"] for ex in a}


def test_format_completion():
    ex = Example("t", "p", "42", "step")
    assert format_completion(ex) == "<think>step</think><answer>42</answer>"


def test_generate_gives_up_when_knobs_leave_no_test_problems():
    # 1-digit + 1-digit: 100 problems; asking for more test problems than draws allow still
    # terminates with a clear error rather than looping forever
    task = Addition(min_digits=1, max_digits=1)
    assert len(task.generate(50, split="test")) == 50  # duplicates are fine
    with pytest.raises(ValueError, match="n=-1"):
        task.generate(-1)
    with pytest.raises(ValueError, match="split='dev'"):
        task.generate(1, split="dev")


@pytest.mark.parametrize("knobs, message", [
    ({"max_digits": 0}, "max_digits=0: must be >= 1"),
    ({"max_digits": 31}, "max_digits=31: must be <= 30"),
    ({"min_digits": 5, "max_digits": 2}, "min_digits=5 > max_digits=2"),
    ({"max_digits": "four"}, "expected an integer"),
    ({"digits": 3}, "unknown config key digits"),
])
def test_knob_validation(knobs, message):
    with pytest.raises(ValueError, match=message):
        get_task("addition", **knobs)


def test_direct_construction_validates_too():
    with pytest.raises(ValueError, match="addition: max_digits=0"):
        Addition(max_digits=0)
    with pytest.raises(ValueError, match="template='poems'"):
        get_task("word_problems", template="poems")


def test_verify_is_total_for_non_strings_and_broken_examples():
    task = get_task("addition")
    ex = task.generate(1)[0]
    assert task.verify(ex, None) == Verdict(False, False, None, "completion is NoneType, not str")
    assert task.verify(ex, b"<answer>1</answer>").correct is False
    broken = Example("countdown", "p", "1+2", "", {"numbers": "not a list"})
    v = get_task("countdown").verify(broken, "<answer>1+2</answer>")
    assert v.correct is False and v.reason.startswith("verifier error")


def test_generic_task_verifies_numbers_and_text():
    task = Task()
    ex = Example("mine", "q", "1,234", "")
    assert task.verify(ex, "<think>x</think><answer>1234</answer>") == Verdict(True, True, "1234", "numeric match")
    text = Example("mine", "q", "Paris", "")
    assert task.verify(text, "<answer> paris </answer>").correct
    assert not task.verify(text, "<answer>London</answer>").correct
