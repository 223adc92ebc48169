"""Tasks: prompts, gold answers, solution traces and safe verifiers (the reward contract).

    get_task("addition", max_digits=6)                  built-in procedural task, knobs validated
    get_task("rg:chain_sum", min_terms=3)                a reasoning-gym dataset (extra `gym`)
    get_task("gsm8k", path=".../gsm8k_test.jsonl")      evaluation file (split="test" only)
    parse_task("addition:max_digits=6")                  the same from a task spec, the one syntax of every
                                                         command: name[:knob=value[:knob=value...]]
    parse_tasks(["@headroom"])                           a named preset expands to its task specs (PRESETS)
    task.generate(n, split="train", seed=0)              deterministic; train/test never overlap
    task.verify(example, completion) -> Verdict          total, bounded, never eval()s
    verify(example, completion)                          the same, dispatched on example.task
    mixture(tasks, n, split, seed, weights=None)         examples of several tasks, interleaved
    corpus_text(tasks, n, seed)                          plain text for pretraining / tokenizer fitting

Files: base.py (Example, Verdict, Task, split_of), numbers.py (answer extraction, number
canonicalisation), sandbox.py + symbolic.py (math-verify in a killable worker), arithmetic.py,
countdown.py, word_problems.py, reasoning_gym.py, datasets.py (JSONL, GSM8K, SVAMP), cli.py.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache

from sputnik.config import build
from sputnik.tasks.arithmetic import Addition, Multiplication, Subtraction
from sputnik.tasks.base import Example, Task, Verdict, format_completion, split_of
from sputnik.tasks.countdown import Countdown
from sputnik.tasks.datasets import GSM8K, SVAMP, JsonlTask, gsm8k, load_gsm8k, load_jsonl, load_svamp, svamp
from sputnik.tasks.reasoning_gym import ReasoningGymTask
from sputnik.tasks.word_problems import WordProblems

__all__ = ["Example", "Verdict", "Task", "split_of", "format_completion", "get_task", "parse_task", "parse_tasks",
           "list_tasks", "describe_task", "PRESETS", "expand_presets", "one_task_spec",
           "verify", "mixture", "heldout_examples", "corpus_text", "example_text", "gsm8k", "svamp", "JsonlTask", "load_jsonl",
           "load_gsm8k", "load_svamp", "REGISTRY"]

REGISTRY: dict[str, type[Task]] = {cls.name: cls for cls in (
    Addition, Subtraction, Multiplication, Countdown, WordProblems, JsonlTask, GSM8K, SVAMP)}
FILE_TASKS = {"jsonl", "gsm8k", "svamp"}

# Named task lists, usable wherever a list of task specs is (`--tasks @headroom`). "Headroom": tasks
# a speedrun-sized model is far from solving after a small cold start while its samples still find
# answers (pass@k well above pass@1), where RL from a verifier has something to do (the speedrun's
# 1-4 digit addition is solved by SFT alone: 0.95).
PRESETS: dict[str, list[str]] = {
    # a 2-3 digit number times a digit, worked digit by digit (studies/cold_start.py)
    "long_multiplication": ["multiplication:trace=digits:min_digits_a=2:max_digits_a=3:max_digits_b=1"],
    # two-digit second factors: partial products and their column sum
    "long_multiplication_2x2": ["multiplication:trace=digits:min_digits_a=2:max_digits_a=3:min_digits_b=2:max_digits_b=2"],
    # search: three numbers to a target up to 100
    "countdown": ["countdown:num_count=3:max_number=20:max_target=100"],
    # three-step stories
    "word_problems": ["word_problems:steps=3"],
    # reasoning-gym datasets whose answers our verifiers judge exactly (no partial credit)
    "reasoning_gym": ["rg:chain_sum", "rg:products", "rg:basic_arithmetic"],
}
PRESETS["headroom"] = [spec for name in ("long_multiplication", "countdown", "word_problems", "reasoning_gym")
                       for spec in PRESETS[name]]
# Pretraining text with many kinds of content (`sputnik data generate`): the built-in tasks with
# their worked traces, and every reasoning-gym 0.1.25 dataset that draws a training item in under
# ~2 ms (measured; not gsm_symbolic, which is built from GSM8K test questions). Text only: many of
# these answers (lists, grids, moves) are beyond our exact verifiers, so it is no RL preset.
DIVERSE_RG = [
    "aiw", "arc_1d", "base_conversion", "basic_arithmetic", "bf", "binary_alternation", "binary_matrix",
    "bitwise_arithmetic", "boxnet", "caesar_cipher", "calendar_arithmetic", "chain_sum", "circuit_logic",
    "coin_flip", "color_cube_rotation", "complex_arithmetic", "count_bits", "count_primes",
    "course_schedule", "cryptarithm", "decimal_arithmetic", "decimal_chain_sum", "dice", "emoji_mystery",
    "family_relationships", "fraction_simplification", "gcd", "graph_color", "isomorphic_strings",
    "kakurasu", "knights_knaves", "largest_island", "lcm", "leg_counting", "letter_counting",
    "letter_jumble", "list_functions", "manipulate_matrix", "maze", "mini_sudoku", "modulo_grid", "n_queens",
    "needle_haystack", "number_filtering", "number_format", "number_sequence", "number_sorting",
    "palindrome_generation", "palindrome_partitioning", "path_star", "pool_matrix", "power_function",
    "prime_factorization", "products", "propositional_logic", "ransom_note", "rotate_matrix", "rush_hour",
    "self_reference", "sentence_reordering", "shortest_path", "simple_equations", "simple_geometry",
    "spiral_matrix", "string_insertion", "string_manipulation", "string_splitting", "string_synthesis",
    "survo", "syllogism", "time_intervals", "tower_of_hanoi", "tsumego", "word_sequence_reversal",
    "word_sorting"
]
PRESETS["diverse"] = ["addition:max_digits=6", "subtraction:max_digits=6", "multiplication:trace=digits:max_digits_a=4:max_digits_b=2",
                      "countdown:num_count=4:max_number=50:max_target=200", "word_problems:steps=4",
                      *(f"rg:{name}" for name in DIVERSE_RG)]
_RG_OWN_KNOBS = {"use_rg_scorer", "allow_test_derived"}


def _config_value(value):
    """CLI strings -> JSON values for reasoning-gym configs ("3" -> 3, "true" -> True)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def get_task(name: str, **knobs) -> Task:
    """A task by name with validated knobs; "rg:NAME" builds a reasoning-gym adapter, and its
    knobs other than use_rg_scorer / allow_test_derived go to the dataset config."""
    if not isinstance(name, str):
        raise ValueError(f"task name must be a string, got {name!r}")
    try:
        if name.startswith("rg:"):
            own = {k: v for k, v in knobs.items() if k in _RG_OWN_KNOBS}
            config = {k: _config_value(v) for k, v in knobs.items() if k not in _RG_OWN_KNOBS}
            return build(ReasoningGymTask, {"dataset": name[3:], "config": config, **own})
        if name not in REGISTRY:
            raise ValueError(f"unknown task {name!r}; known: {', '.join(list_tasks())}, rg:<dataset>")
        return build(REGISTRY[name], knobs)
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None


_KNOB_START = re.compile(r"[A-Za-z_]\w*=")


def one_task_spec(spec: str) -> str:
    """`spec` itself, or the one spec of a one-task preset ("@long_multiplication"); a preset of
    several tasks is an error where one task is expected."""
    if not (isinstance(spec, str) and spec.startswith("@")):
        return spec
    specs = expand_presets([spec])
    if len(specs) != 1:
        raise ValueError(f"task={spec}: a preset of {len(specs)} tasks ({', '.join(specs)}); give one task")
    return specs[0]


def parse_task(spec: str) -> Task:
    """A task from a spec "name" or "name:knob=value:knob=value" ("addition:max_digits=6",
    "rg:chain_sum:min_terms=3", "svamp:path=../shared/data/svamp.json"), or a one-task preset
    ("@long_multiplication"): every command's syntax. A piece that does not start with "knob="
    continues the previous value, so paths may hold colons."""
    spec = one_task_spec(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"task spec {spec!r}: expected name[:knob=value...]")
    parts = spec.strip().split(":")
    name_parts = 2 if parts[0] == "rg" and len(parts) > 1 else 1  # reasoning-gym names carry a colon
    name, knobs, key = ":".join(parts[:name_parts]), {}, None
    for pair in parts[name_parts:]:
        if _KNOB_START.match(pair):
            key, _, value = pair.partition("=")
            knobs[key] = value
        elif key is not None and pair:  # a value with a colon in it ("path=/data/a:b.json", "path=C:/x")
            knobs[key] += ":" + pair
        else:
            raise ValueError(f"task spec {spec!r}: {pair!r} is not knob=value (expected name[:knob=value...])")
    return get_task(name, **knobs)


def expand_presets(specs: list[str]) -> list[str]:
    """Task specs with each "@name" replaced by PRESETS[name]'s specs."""
    out = []
    for spec in specs:
        if isinstance(spec, str) and spec.startswith("@"):
            if spec[1:] not in PRESETS:
                raise ValueError(f"unknown task preset {spec!r}; known: {', '.join('@' + p for p in PRESETS)}")
            out += PRESETS[spec[1:]]
        else:
            out.append(spec)
    return out


def parse_tasks(specs: list[str]) -> list[Task]:
    """parse_task of each spec (presets expanded); at least one."""
    if not specs:
        raise ValueError("no tasks: give at least one task spec (sputnik tasks list)")
    return [parse_task(s) for s in expand_presets(specs)]


def list_tasks() -> list[str]:
    """Registered task names (reasoning-gym datasets are reachable as "rg:NAME" besides these)."""
    return list(REGISTRY)


def describe_task(name: str) -> tuple[str, list[tuple[str, object, str]]]:
    """(description, [(knob, default, help)]) for `sputnik tasks list`."""
    if name.startswith("rg:"):  # the dataset comes from the name and config from the extra knobs
        return ReasoningGymTask.description, [k for k in ReasoningGymTask.knob_help() if k[0] in _RG_OWN_KNOBS]
    return REGISTRY[name].description, REGISTRY[name].knob_help()


@lru_cache(maxsize=None)
def _default_task(name: str) -> Task:
    return REGISTRY[name]()


def verify(example: Example, completion: str) -> Verdict:
    """Judge `completion` with the verifier of `example.task` (default knobs: verification reads
    only the example). File-backed tasks use the generic answer check. Never raises."""
    try:
        if example.task.startswith("rg:"):
            task = ReasoningGymTask(dataset=example.task[3:], use_rg_scorer=bool(example.meta.get("rg_scorer")))
        elif example.task in REGISTRY and example.task not in FILE_TASKS:
            task = _default_task(example.task)
        else:
            task = Task()
    except Exception as e:  # a malformed example must not crash a training loop either
        return Verdict(False, False, None, f"no verifier for task {getattr(example, 'task', None)!r} ({type(e).__name__})")
    return task.verify(example, completion)


def _apportion(n: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of n into integer counts proportional to weights."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def mixture(names_or_tasks: list, n: int, split: str = "train", seed: int = 0,
            weights: list[float] | None = None) -> list[Example]:
    """n examples from several tasks: counts proportional to `weights` (equal by default), spread
    evenly through the list (plain round-robin for equal weights). Task i generates with seed
    seed * 1_000_003 + i, so two entries of the same task do not repeat each other."""
    tasks = [get_task(t) if isinstance(t, str) else t for t in names_or_tasks]
    if not tasks:
        raise ValueError("mixture needs at least one task")
    weights = [1.0] * len(tasks) if weights is None else [float(w) for w in weights]
    if len(weights) != len(tasks) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights={weights}: need {len(tasks)} non-negative numbers with a positive sum")
    counts = _apportion(n, weights)
    slots = []
    for i, (task, count) in enumerate(zip(tasks, counts)):
        for k, ex in enumerate(task.generate(count, split=split, seed=seed * 1_000_003 + i)):
            slots.append(((k + 0.5) / count, i, ex))
    return [ex for _, _, ex in sorted(slots, key=lambda s: s[:2])]


def heldout_examples(names_or_tasks: list, n: int, seed: int = 0) -> list[Example]:
    """The n held-out (test-split) problems every stage reports its accuracy on: SFT's evaluation,
    RL's held-out accuracy and the distillation report use this one set for a given task list and
    seed, so the report card compares the stages on the same problems."""
    return mixture(names_or_tasks, n, split="test", seed=seed)


def example_text(example: Example) -> str:
    """An example as plain text: prompt, trace (if any), "Answer: ..."."""
    parts = [example.prompt] + ([example.solution] if example.solution else []) + [f"Answer: {example.answer}"]
    return "\n".join(parts)


def corpus_text(names_or_tasks: list, n: int, seed: int = 0) -> list[str]:
    """n training-split examples of the tasks as plain text (for pretraining / tokenizer fitting);
    the test split never enters a corpus, and evaluation files raise."""
    return [example_text(ex) for ex in mixture(names_or_tasks, n, split="train", seed=seed)]
