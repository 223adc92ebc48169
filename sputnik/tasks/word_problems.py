"""Templated multi-step word problems (shopping, ages, travel, collections) with worked traces.

Each template tells a short story with `steps` events and asks for one whole number. The trace
has one "label: arithmetic=result" line per operation, in story order, and its last line ends in
the answer, e.g. (shopping, steps=2):

    Ava buys 3 pens at $4 each and 2 mugs at $5 each. Ava pays with a $50 bill. ...
    pens: 3*4=12
    mugs: 2*5=10
    total: 12+10=22
    change: 50-22=28

Numbers are drawn so that every intermediate value is a positive whole number (divisions are
exact), which keeps the task about reading and chaining steps rather than about rounding.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from sputnik.config import knob
from sputnik.tasks.base import Example, Task

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hiro", "Isla", "Jack", "Kira", "Leo",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Ravi", "Sara", "Tom", "Uma", "Victor", "Wen", "Yara"]
ITEMS = [("pens", 1, 5), ("notebooks", 2, 9), ("apples", 1, 3), ("books", 5, 20), ("toy cars", 3, 12),
         ("mugs", 4, 15), ("candles", 2, 8), ("plants", 6, 25)]
MODES = [("drives", 30, 90), ("cycles", 10, 25), ("walks", 3, 6), ("rides a scooter", 12, 30)]
THINGS = ["marbles", "stickers", "stamps", "shells", "cards", "coins"]
BILLS = [10, 20, 50, 100, 200, 500, 1000, 2000]
TEMPLATES = ("shopping", "ages", "travel", "collection")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _running_sum(values: list[int], label: str = "total") -> tuple[int, list[str]]:
    total, lines = values[0], []
    for v in values[1:]:
        lines.append(f"{label}: {total}+{v}={total + v}")
        total += v
    return total, lines


def shopping(rng: random.Random, steps: int) -> tuple[str, list[str], int]:
    """Buy `steps` kinds of items, pay with the smallest bill that covers it, ask for change."""
    name, lines, parts, costs = rng.choice(NAMES), [], [], []
    for item, lo, hi in rng.sample(ITEMS, steps):
        q, p = rng.randint(2, 9), rng.randint(lo, hi)
        parts.append(f"{q} {item} at ${p} each")
        lines.append(f"{item}: {q}*{p}={q * p}")
        costs.append(q * p)
    total, sum_lines = _running_sum(costs)
    bill = next(b for b in BILLS if b > total)  # at most 6 items * 9 * $25 < $2000
    prompt = (f"{name} buys {_join(parts)}. {name} pays with a ${bill} bill. "
              f"How much change does {name} get, in dollars?")
    return prompt, lines + sum_lines + [f"change: {bill}-{total}={bill - total}"], bill - total


def ages(rng: random.Random, steps: int) -> tuple[str, list[str], int]:
    """A chain of `steps` age relations (older, younger, times, half), then "in n years"."""
    people = rng.sample(NAMES, steps + 1)
    age = rng.randint(4, 12)
    sentences, lines = [f"{people[0]} is {age} years old."], []
    for prev, person in zip(people, people[1:]):
        options = ["older"] + (["younger"] if age > 3 else []) + (["times"] if age * 2 <= 90 else []) \
            + (["half"] if age % 2 == 0 and age >= 4 else [])
        kind = rng.choice(options)
        if kind == "older":
            d = rng.randint(1, 25)
            sentences.append(f"{person} is {d} years older than {prev}.")
            lines.append(f"{person}: {age}+{d}={age + d}")
            age += d
        elif kind == "younger":
            d = rng.randint(1, min(25, age - 1))
            sentences.append(f"{person} is {d} years younger than {prev}.")
            lines.append(f"{person}: {age}-{d}={age - d}")
            age -= d
        elif kind == "times":
            k = rng.choice([k for k in (2, 3, 4) if age * k <= 90])
            sentences.append(f"{person} is {k} times as old as {prev}.")
            lines.append(f"{person}: {age}*{k}={age * k}")
            age *= k
        else:
            sentences.append(f"{person} is half as old as {prev}.")
            lines.append(f"{person}: {age}/2={age // 2}")
            age //= 2
    n = rng.randint(2, 20)
    prompt = " ".join(sentences) + f" How old will {people[-1]} be in {n} years?"
    return prompt, lines + [f"in {n} years: {age}+{n}={age + n}"], age + n


def travel(rng: random.Random, steps: int) -> tuple[str, list[str], int]:
    """`steps` legs at constant speeds (distance = speed * time), then the total distance."""
    name, (verb, lo, hi) = rng.choice(NAMES), rng.choice(MODES)
    legs = [(rng.randint(lo, hi), rng.randint(1, 5)) for _ in range(steps)]
    parts = [f"at {s} km per hour for {h} hour{'s' if h > 1 else ''}" for s, h in legs]
    lines = [f"leg {i + 1}: {s}*{h}={s * h}" for i, (s, h) in enumerate(legs)]
    total, sum_lines = _running_sum([s * h for s, h in legs])
    prompt = f"{name} {verb} {', then '.join(parts)}. How many kilometres does {name} travel in total?"
    return prompt, lines + sum_lines, total


def collection(rng: random.Random, steps: int) -> tuple[str, list[str], int]:
    """A collection changed by `steps` events: find, give away, buy packs, split into boxes, double."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    count = rng.randint(10, 60)
    sentences, lines = [f"{name} has {count} {thing}."], []
    for _ in range(steps):
        divisors = [k for k in range(2, 7) if count % k == 0]
        kind = rng.choice(["find", "packs", "double"] + (["give"] if count > 1 else []) + (["split"] if divisors else []))
        if kind == "find":
            a = rng.randint(2, 30)
            sentences.append(f"{name} finds {a} more {thing}.")
            lines.append(f"after finding: {count}+{a}={count + a}")
            count += a
        elif kind == "give":
            a = rng.randint(1, min(30, count - 1))
            sentences.append(f"{name} gives {a} {thing} to a friend.")
            lines.append(f"after giving: {count}-{a}={count - a}")
            count -= a
        elif kind == "packs":
            k, p = rng.randint(2, 5), rng.randint(3, 12)
            sentences.append(f"{name} buys {k} packs of {p} {thing}.")
            lines += [f"packs: {k}*{p}={k * p}", f"after buying: {count}+{k * p}={count + k * p}"]
            count += k * p
        elif kind == "double":
            sentences.append(f"{name}'s collection doubles.")
            lines.append(f"after doubling: {count}*2={count * 2}")
            count *= 2
        else:
            k = rng.choice(divisors)
            sentences.append(f"{name} splits the {thing} equally into {k} boxes and keeps one box.")
            lines.append(f"one box: {count}/{k}={count // k}")
            count //= k
    prompt = " ".join(sentences) + f" How many {thing} does {name} have now?"
    return prompt, lines, count


_MAKERS = {"shopping": shopping, "ages": ages, "travel": travel, "collection": collection}


@dataclass
class WordProblems(Task):
    """Short stories with `steps` events; the answer is a whole number."""
    name: ClassVar[str] = "word_problems"
    description: ClassVar[str] = "templated multi-step word problems (shopping, ages, travel, collections)"
    steps: int = knob(2, "events per story (items bought, age relations, legs, collection changes)", min=1, max=6)
    template: str = knob("any", "which story template", choices=("any",) + TEMPLATES)

    def sample_problem(self, rng):
        template = rng.choice(TEMPLATES) if self.template == "any" else self.template
        prompt, lines, answer = _MAKERS[template](rng, self.steps)
        return prompt, (template, prompt, lines, answer)

    def build_example(self, key, problem, split):
        template, prompt, lines, answer = problem
        return Example(self.name, prompt, str(answer), "\n".join(lines),
                       {"key": key, "split": split, "template": template})
