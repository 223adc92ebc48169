"""The reward contract: Example, Verdict, Task, and the hash-based train/test split.

A Task makes `Example`s (prompt, gold answer, human-style solution trace) and judges completions.
Every stage that scores a model (SFT eval, GRPO rewards, distillation filters, `sputnik eval`)
goes through `Task.verify`, so its three promises matter more than anything else here:

  total    verify() never raises: every exception becomes a Verdict with correct=False and a reason
  bounded  completions longer than MAX_COMPLETION_CHARS are rejected unread; numbers, expressions
           and answers have size limits; anything symbolic runs in a killable worker process
  safe     model output is parsed, never eval()'d

Split: a problem is in the test split iff blake2b(canonical problem) lands in the lowest
TEST_FRACTION of the 64-bit hash range. `generate(split=...)` rejection-samples until problems
fall in the requested split, so train and test never share a problem, for any seed or knobs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Literal

from sputnik.tasks import numbers

Split = Literal["train", "test"]
SPLITS = ("train", "test")
# Changing this re-splits every task (old test problems could become training data): treat it
# as part of the data format, not as a knob.
TEST_FRACTION = 0.1
# Rejection sampling gives up after this many draws per requested example (plus a constant),
# which only happens when the knobs leave (almost) no problems in the requested split.
MAX_DRAWS_PER_EXAMPLE = 200


@dataclass(frozen=True)
class Example:
    """One problem. `solution` is the step-by-step trace WITHOUT tags; `meta` is JSON-serialisable
    task data (always has "key": the canonical problem, and "split")."""
    task: str
    prompt: str
    answer: str
    solution: str = ""
    meta: dict = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True)
class Verdict:
    """correct: the extracted answer is right (independent of formatting).
    well_formatted: exactly `<think>..</think><answer>..</answer>` (see numbers.extract_answer).
    extracted: the answer text that was judged (None when nothing could be extracted)."""
    correct: bool
    well_formatted: bool
    extracted: str | None
    reason: str


def split_of(canonical_problem: str, test_fraction: float = TEST_FRACTION) -> Split:
    """"test" iff blake2b-64(problem) / 2**64 < test_fraction. Stable across runs, machines and
    Python versions (unlike hash()), so a problem keeps its split forever."""
    digest = hashlib.blake2b(canonical_problem.encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") < test_fraction * 2**64 else "train"


def format_completion(example: Example) -> str:
    """The target completion the model should write (CONTRACTS.md "Reasoning format")."""
    return f"<think>{example.solution}</think><answer>{example.answer}</answer>"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed 'train', 'test'")


def check_count(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r}: must be an integer >= 0")


class Task:
    """Base class. Procedural tasks are dataclasses whose fields are difficulty knobs declared
    with sputnik.config.knob (help text + allowed range); they implement `sample_problem` and
    `build_example`, and override `check_answer` when the answer is not a plain number."""

    name: ClassVar[str] = "generic"
    description: ClassVar[str] = "answers compared as numbers, LaTeX (math-verify) or text"
    # Hard limit for out-of-process checks (math-verify, reasoning-gym scorers); instances may
    # change it. math-verify's own 1 s alarms usually answer first, so the worker survives.
    verify_timeout_s: float = 1.5

    def __post_init__(self) -> None:
        validate_knobs(self)

    # --- generation ------------------------------------------------------------------------
    def sample_problem(self, rng: random.Random) -> tuple[str, Any]:
        """Draw one problem: (canonical key, problem data for build_example). Keep it cheap:
        rejection sampling for the split calls it ~1/TEST_FRACTION times per test example."""
        raise NotImplementedError(f"{type(self).__name__} does not generate problems")

    def build_example(self, key: str, problem: Any, split: Split) -> Example:
        raise NotImplementedError

    def problems(self, n: int, *, split: Split = "train", seed: int = 0) -> Iterator[tuple[str, Any]]:
        """Yield n (key, problem) pairs in `split`, deterministically from (name, seed, split)."""
        check_split(split)
        check_count(n)
        rng = random.Random(f"{self.name}|{seed}|{split}")  # str seeds hash with sha512: stable
        found, budget = 0, MAX_DRAWS_PER_EXAMPLE * n + 1000
        for _ in range(budget):
            if found == n:
                return
            key, problem = self.sample_problem(rng)
            if split_of(key) == split:
                found += 1
                yield key, problem
        if found < n:
            raise ValueError(f"{self.name}: found only {found} of {n} {split} problems in {budget} draws; "
                             f"the knobs {self.knobs()} leave too few distinct problems, widen them")

    def generate(self, n: int, *, split: Split = "train", seed: int = 0) -> list[Example]:
        """n examples of `split`, deterministic from seed and the knobs (duplicates possible when
        the knobs allow few distinct problems)."""
        return [self.build_example(key, problem, split) for key, problem in self.problems(n, split=split, seed=seed)]

    # --- verification ----------------------------------------------------------------------
    def check_answer(self, example: Example, answer: str) -> tuple[bool, str]:
        """Is the extracted `answer` right? May raise: verify() turns exceptions into verdicts."""
        return numbers.match_answer(example.answer, answer, symbolic_timeout_s=self.verify_timeout_s)

    def verify(self, example: Example, completion: str) -> Verdict:
        """Judge a completion. Total: never raises; bounded: see module docstring."""
        try:
            if not isinstance(completion, str):
                return Verdict(False, False, None, f"completion is {type(completion).__name__}, not str")
            if len(completion) > numbers.MAX_COMPLETION_CHARS:
                return Verdict(False, False, None, f"completion longer than {numbers.MAX_COMPLETION_CHARS} chars")
            ext = numbers.extract_answer(completion)
            if ext.text is None:
                return Verdict(False, ext.well_formatted, None, ext.how)
            correct, why = self.check_answer(example, ext.text)
            reason = why if ext.how == "tag" else f"{why} ({ext.how})"
            return Verdict(bool(correct), ext.well_formatted, ext.text, reason)
        except Exception as e:  # the contract: a verdict, whatever the input (incl. RecursionError)
            return Verdict(False, False, None, f"verifier error: {type(e).__name__}")

    # --- knobs -----------------------------------------------------------------------------
    def knobs(self) -> dict:
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def knob_help(cls) -> list[tuple[str, Any, str]]:
        """[(name, default, help with allowed range)] for `sputnik tasks list`."""
        if not dataclasses.is_dataclass(cls):
            return []
        rows = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            rows.append((f.name, default, f.metadata.get("help", "") + _range_text(f.metadata)))
        return rows


def _range_text(meta) -> str:
    if meta.get("choices") is not None:
        return " (one of " + ", ".join(map(str, meta["choices"])) + ")"
    lo, hi = meta.get("min"), meta.get("max")
    if lo is None and hi is None:
        return ""
    return f" ({'' if lo is None else lo}..{'' if hi is None else hi})"


def validate_knobs(task) -> None:
    """Check every knob field against its type and the range declared with `knob(...)`, so a
    direct `Addition(max_digits=0)` fails as loudly as `get_task("addition", max_digits=0)`."""
    if not dataclasses.is_dataclass(task):
        return
    for f in dataclasses.fields(task):
        value, meta = getattr(task, f.name), f.metadata
        where = f"{task.name}: {f.name}={value!r}"
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{where}: expected an integer")
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ValueError(f"{where}: allowed {', '.join(map(repr, meta['choices']))}")
        if numeric and meta.get("min") is not None and value < meta["min"]:
            raise ValueError(f"{where}: must be >= {meta['min']}")
        if numeric and meta.get("max") is not None and value > meta["max"]:
            raise ValueError(f"{where}: must be <= {meta['max']}")
