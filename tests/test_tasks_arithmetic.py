"""Addition, subtraction, multiplication: exact traces, every target completion verifies."""
import re

import pytest

from sputnik.tasks import format_completion, get_task
from sputnik.tasks.arithmetic import addition_trace, long_multiplication_trace, multiplication_trace, subtraction_trace


def test_addition_trace_by_hand():
    assert addition_trace(4821, 397) == [
        "1+7=8, write 8",
        "2+9=11, write 1 carry 1",
        "8+3+1=12, write 2 carry 1",
        "4+0+1=5, write 5",
        "4821+397=5218",
    ]
    assert addition_trace(95, 7)[-2:] == ["write the carry 1", "95+7=102"]


def test_subtraction_trace_by_hand():
    assert subtraction_trace(5363, 834) == [
        "13-4=9, write 9 borrow 1",
        "6-3-1=2, write 2",
        "13-8=5, write 5 borrow 1",
        "5-0-1=4, write 4",
        "5363-834=4529",
    ]
    # borrowing through zeros
    assert subtraction_trace(1000, 1) == ["10-1=9, write 9 borrow 1", "10-0-1=9, write 9 borrow 1",
                                          "10-0-1=9, write 9 borrow 1", "1-0-1=0, write 0", "1000-1=999"]


def test_multiplication_trace_by_hand():
    assert multiplication_trace(4821, 307) == [
        "4821*7=33747",
        "4821*300=1446300",  # the zero digit is skipped
        "33747+1446300=1480047",
        "4821*307=1480047",
    ]
    assert multiplication_trace(273, 1) == ["273*1=273"]  # one partial product is not repeated
    assert multiplication_trace(12, 0) == ["12*0=0"]


def test_long_multiplication_trace_by_hand():
    """Every line is a one-digit product or sum plus a carry; zero digits of b are skipped."""
    assert long_multiplication_trace(47, 36) == [
        "47*36:",
        "7*6=42, write 2 carry 4", "4*6+4=28, write 28", "47*6=282",
        "7*3=21, write 1 carry 2", "4*3+2=14, write 14", "47*30=1410",
        "2+0=2, write 2", "8+1=9, write 9", "2+4=6, write 6", "0+1=1, write 1", "282+1410=1692",
        "47*36=1692",
    ]
    # one partial product is the answer: not written twice
    assert long_multiplication_trace(25, 40) == ["25*40:", "5*4=20, write 0 carry 2", "2*4+2=10, write 10", "25*40=1000"]
    assert long_multiplication_trace(12, 0) == ["12*0=0"]
    assert long_multiplication_trace(3, 3) == ["3*3:", "3*3=9, write 9", "3*3=9"]


@pytest.mark.parametrize("name, knobs", [
    ("multiplication", {"max_digits_a": 4, "max_digits_b": 3, "trace": "digits"}),
    ("addition", {"min_digits": 1, "max_digits": 8}),
    ("subtraction", {"min_digits": 1, "max_digits": 8}),
    ("multiplication", {"max_digits_a": 5, "max_digits_b": 4}),
])
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_trace_ends_in_the_answer_and_verifies(name, knobs, split):
    task = get_task(name, **knobs)
    for seed in range(3):
        for ex in task.generate(150, split=split, seed=seed):
            a, op, b = ex.meta["key"].partition({"addition": "+", "subtraction": "-", "multiplication": "*"}[name])[::1]
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert ex.answer == str(expected) and ex.solution.endswith(f"={expected}")
            v = task.verify(ex, format_completion(ex))
            assert v.correct and v.well_formatted, (ex, v)
            assert not task.verify(ex, f"<think>x</think><answer>{expected + 1}</answer>").correct


def test_digit_knobs_are_respected():
    for ex in get_task("addition", min_digits=3, max_digits=4).generate(200):
        a, b = ex.meta["key"].split("+")
        assert 3 <= len(a) <= 4 and 3 <= len(b) <= 4
    for ex in get_task("subtraction", min_digits=2, max_digits=2).generate(200):
        a, b = map(int, ex.meta["key"].split("-"))
        assert 10 <= b <= a <= 99
    for ex in get_task("multiplication", max_digits_a=2, max_digits_b=1).generate(200):
        a, b = map(int, ex.meta["key"].split("*"))
        assert a < 100 and b < 10
    for ex in get_task("multiplication", min_digits_a=2, max_digits_a=3, min_digits_b=2, max_digits_b=2).generate(200):
        a, b = map(int, ex.meta["key"].split("*"))
        assert 10 <= a < 1000 and 10 <= b < 100
    with pytest.raises(ValueError, match="min_digits_b=3 > max_digits_b=2"):
        get_task("multiplication", min_digits_b=3)
    with pytest.raises(ValueError, match="trace"):
        get_task("multiplication", trace="columns")


def test_least_significant_first_writes_every_number_reversed_and_checks_digits_exactly():
    from sputnik.tasks import parse_task
    from sputnik.tasks.base import format_completion

    msb = parse_task("addition:min_digits=4:max_digits=4").generate(5, seed=2)
    lsb = parse_task("addition:min_digits=4:max_digits=4:digit_order=lsb").generate(5, seed=2)
    bare = parse_task("addition:min_digits=4:max_digits=4:digit_order=lsb:trace=none")
    for m, r in zip(msb, lsb):
        a, b = m.meta["key"].split("+")
        assert r.meta == m.meta  # same problems, same split: the format does not move a problem's hash
        assert r.prompt == f"What is {a[::-1]} + {b[::-1]}? (digits least significant first)"
        assert r.answer == m.answer[::-1]
        assert r.solution.splitlines()[-1] == f"{a[::-1]}+{b[::-1]}={m.answer[::-1]}"
        assert bare.verify(r, format_completion(r)).correct
    task = parse_task("addition:min_digits=3:max_digits=3:digit_order=lsb:trace=none")
    ex = task.build_example("500+500", (500, 500), "train")  # 1000 -> "0001": the zeros are digits
    assert (ex.answer, ex.solution) == ("0001", "")
    assert task.verify(ex, "<think></think><answer>0001</answer>").correct
    assert not task.verify(ex, "<think></think><answer>1</answer>").correct
    assert not task.verify(ex, "<think></think><answer>1000</answer>").correct
    sub = parse_task("subtraction:min_digits=2:max_digits=2:digit_order=lsb").build_example("52-17", (52, 17), "train")
    assert sub.answer == "53" and sub.prompt.startswith("What is 25 - 71?")


def test_index_hints_tag_every_digit_with_its_place_letter():
    from sputnik.tasks import parse_task
    from sputnik.tasks.arithmetic import hinted, hinted_addition_trace, hint_places

    assert hinted(5218, "bdfhk") == "b8d1f2h5k0"
    assert hinted_addition_trace(4821, 397, "abcde") == [
        "a: 1+7=8, write=a8",
        "b: 2+9=11, write=b1 carry 1",
        "c: 8+3+1=12, write=c2 carry 1",
        "d: 4+0+1=5, write=d5",
        "e: 0+0=0, write=e0",
    ]
    assert hinted_addition_trace(95, 7, "xyz")[-1] == "z: 0+0+1=1, write=z1"  # the padding place takes the carry
    task = parse_task("addition:min_digits=4:max_digits=4:digit_order=lsb:index_hints=true")
    plain = parse_task("addition:min_digits=4:max_digits=4").generate(20, seed=3)
    seen = set()
    for m, e in zip(plain, task.generate(20, seed=3), strict=True):
        a, b = map(int, m.meta["key"].split("+"))
        assert e.meta == m.meta  # same problems, same split as the plain format
        letters = hint_places(m.meta["key"], 5)
        assert letters == "".join(sorted(letters)) and len(set(letters)) == 5
        assert e.prompt == f"What is ({hinted(a, letters)}) + ({hinted(b, letters).upper()})?"
        assert e.answer == hinted(a + b, letters)
        assert task.verify(e, format_completion(e)).correct
        seen |= set(letters)
    assert len(seen) > 15  # letters are drawn across the alphabet, not always "abcde"
    e = task.build_example("4821+3970", (4821, 3970), "test")
    assert e.answer == hinted(8791, hint_places("4821+3970", 5))
    assert not task.verify(e, f"<answer>{e.answer[:-2]}</answer>").correct  # the padding digit is part of the answer
    assert not task.verify(e, "<answer>19780</answer>").correct
    assert task.build_example("4821+3970", (4821, 3970), "train").prompt == e.prompt  # hints depend on the problem only


def test_pad_places_write_every_problem_with_the_same_places():
    from sputnik.tasks import parse_task
    from sputnik.tasks.arithmetic import hinted, hint_places

    task = parse_task("addition:min_digits=1:max_digits=4:digit_order=lsb:index_hints=true:pad_places=8")
    plain = parse_task("addition:min_digits=1:max_digits=4:digit_order=lsb:index_hints=true")
    for e, p in zip(task.generate(30, seed=1), plain.generate(30, seed=1), strict=True):
        a, b = map(int, e.meta["key"].split("+"))
        letters = hint_places(e.meta["key"], 8)
        assert e.meta == p.meta and len(e.solution.split("\n")) == 8  # the same problems, eight lines each
        assert e.prompt == f"What is ({hinted(a, letters)}) + ({hinted(b, letters).upper()})?"
        assert e.answer == hinted(a + b, letters) and task.verify(e, format_completion(e)).correct
    e = task.build_example("12+5", (12, 5), "test")
    assert e.solution.split("\n")[2:] == [f"{p}: 0+0=0, write={p}0" for p in hint_places("12+5", 8)[2:]]
    long = parse_task("addition:min_digits=9:max_digits=9:digit_order=lsb:index_hints=true:pad_places=8")
    assert len(long.generate(1)[0].solution.split("\n")) == 10  # a longer problem keeps its own places


def test_shuffled_places_keep_each_digit_with_its_letter_and_the_trace_in_place_order():
    from sputnik.tasks import parse_task

    spec = "addition:min_digits=3:max_digits=4:digit_order=lsb:index_hints=true"
    shuffled, plain = parse_task(spec + ":shuffle_places=true"), parse_task(spec)
    moved = 0
    for e, p in zip(shuffled.generate(40, seed=2), plain.generate(40, seed=2), strict=True):
        assert (e.meta, e.answer, e.solution) == (p.meta, p.answer, p.solution)  # only the prompt changes
        for got, want in zip(re.findall(r"\((\w+)\)", e.prompt), re.findall(r"\((\w+)\)", p.prompt), strict=True):
            pairs = [got[i:i + 2] for i in range(0, len(got), 2)]
            assert sorted(pairs) == sorted(want[i:i + 2] for i in range(0, len(want), 2))  # the same places
            moved += pairs != sorted(pairs, key=str.lower)
        assert shuffled.verify(e, format_completion(e)).correct
    assert moved > 60  # of 80 numbers: most are out of place order
    e = shuffled.build_example("123+45", (123, 45), "test")
    assert e.prompt == shuffled.build_example("123+45", (123, 45), "train").prompt  # drawn from the problem


@pytest.mark.parametrize("spec, message", [
    ("addition:index_hints=true", "digit_order=lsb"),
    ("addition:digit_order=lsb:shuffle_places=true", "index_hints=true"),
    ("addition:digit_order=lsb:pad_places=8", "index_hints=true"),
    ("subtraction:digit_order=lsb:index_hints=true", "addition only"),
    ("addition:digit_order=lsb:index_hints=true:max_digits=26", "max_digits"),
])
def test_index_hints_refuse_what_they_cannot_write(spec, message):
    from sputnik.tasks import parse_task
    with pytest.raises(ValueError, match=message):
        parse_task(spec)


def test_place_credit_scores_the_share_of_hinted_places_right():
    from sputnik.rl.rewards import import_by_path
    from sputnik.tasks.arithmetic import place_credit

    credit = import_by_path("sputnik.tasks.arithmetic:place_credit")  # how `sputnik rl --reward_fn` loads it
    assert credit is place_credit
    answer = "c2e7i7m6"
    assert place_credit("", f"<think>x</think><answer>{answer}</answer>", answer) == 1.0
    assert place_credit("", "<think>x</think><answer>c2e7i0m6</answer>", answer) == 0.75
    assert place_credit("", "<think>x</think><answer>c2e7</answer>", answer) == 0.5  # missing places score 0
    assert place_credit("", "<think>x</think><answer>c2e7i7m6q0r0t0v0</answer>", answer) == 0.5  # extra places cost
    assert place_credit("", "<think>x</think><answer>e7c2m6i7</answer>", answer) == 1.0  # by letter, not by order
    assert place_credit("", "no answer at all", answer) == 0.0
    with pytest.raises(ValueError, match="index-hinted"):
        place_credit("", "<answer>12</answer>", "12")
