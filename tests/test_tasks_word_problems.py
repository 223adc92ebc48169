"""Word problems: every template and step count yields a verifying, well-shaped trace."""
import re

import pytest

from sputnik.tasks import format_completion, get_task
from sputnik.tasks.word_problems import TEMPLATES

_LINE = re.compile(r"^[a-z A-Z0-9]+: (\d+)([-+*/])(\d+)=(\d+)$")


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_traces_are_correct_arithmetic_and_verify(template, steps):
    task = get_task("word_problems", steps=steps, template=template)
    for ex in task.generate(60, seed=steps) + task.generate(20, split="test", seed=steps):
        assert ex.meta["template"] == template and ex.prompt.endswith("?")
        lines = ex.solution.split("\n")
        for line in lines:  # every line is "label: a op b=c" and c is right
            a, op, b, c = _LINE.match(line).groups()
            a, b, c = int(a), int(b), int(c)
            assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] and (op != "/" or a % b == 0)
        assert lines[-1].endswith("=" + ex.answer) and int(ex.answer) >= 0
        assert task.verify(ex, format_completion(ex)).correct


def test_steps_knob_sets_story_length():
    # travel: one line per leg plus the running sum
    for steps in (1, 4):
        ex = get_task("word_problems", steps=steps, template="travel").generate(1, seed=0)[0]
        assert len(ex.solution.split("\n")) == steps + (steps - 1)
        assert ex.prompt.count("km per hour") == steps
    ex = get_task("word_problems", steps=3, template="ages").generate(1, seed=0)[0]
    assert len(ex.solution.split("\n")) == 3 + 1  # three relations, then "in n years"


def test_shopping_by_hand():
    ex = get_task("word_problems", steps=2, template="shopping").generate(1, seed=11)[0]
    found = re.findall(r"(\d+) [a-z ]+? at \$(\d+) each", ex.prompt)
    bill = int(re.search(r"\$(\d+) bill", ex.prompt).group(1))
    assert int(ex.answer) == bill - sum(int(q) * int(p) for q, p in found) > 0


def test_any_template_mixes():
    templates = {ex.meta["template"] for ex in get_task("word_problems").generate(100)}
    assert templates == set(TEMPLATES)
