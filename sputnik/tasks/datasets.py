"""File-backed tasks: the user's own JSONL, and the GSM8K / SVAMP evaluation sets.

  JSONL   one object per line: {"prompt": str, "answer": str|number, "solution"?: str}. Blank
          lines are ignored; a malformed line raises ValueError("FILE:LINE: why"), or with
          skip_bad_lines=True is skipped and counted (`bad_lines`, and a warning).
  GSM8K   {"question", "answer"} per line; gold = text after the last "####", commas removed,
          canonicalised ("1,000" -> "1000"). The worked solution (calculator annotations
          <<3*2=6>> removed) becomes `solution` for reference only.
  SVAMP   a JSON list of {"Body", "Question", "Answer": float, ...}; prompt = Body + " " +
          Question; whole-number floats become integer strings ("51.0" -> "51").

GSM8K and SVAMP are evaluation sets: their tasks only serve split="test" and raise for "train",
so no training mix can contain them. Loaders take a path and never copy the data anywhere.
"""
from __future__ import annotations

import json
import math
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from sputnik.config import knob
from sputnik.tasks import numbers
from sputnik.tasks.base import Example, Task, check_count, check_split, split_of

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _answer_text(value, where: str) -> str:
    """A JSON answer -> its string: numbers canonicalised (51.0 -> "51"), strings stripped."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}: answer must be a string or a number, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: answer {value!r} is not finite")
        return str(int(value)) if value.is_integer() else numbers.canonical_number(repr(value))
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: answer must be a non-empty string or a number, got {value!r}")
    return value.strip()


def _read_lines(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield path, lineno, line


def _parse_jsonl_line(line: str, where: str, task: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt, solution = row.get("prompt"), row.get("solution", "")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    if "answer" not in row:
        raise ValueError(f"{where}: missing 'answer'")
    if not isinstance(solution, str):
        raise ValueError(f"{where}: 'solution' must be a string")
    return Example(task, prompt, _answer_text(row["answer"], where), solution, {"key": prompt})


def load_jsonl(path: str | Path, *, skip_bad_lines: bool = False, task: str = "jsonl") -> tuple[list[Example], int]:
    """(examples, number of skipped bad lines). See the module docstring for the format."""
    examples, bad = [], 0
    for p, lineno, line in _read_lines(path):
        try:
            examples.append(_parse_jsonl_line(line, f"{p}:{lineno}", task))
        except ValueError as e:
            if not skip_bad_lines:
                raise
            bad += 1
            if bad <= 3:
                warnings.warn(f"skipping {e}", stacklevel=2)
    if bad:
        warnings.warn(f"{path}: skipped {bad} malformed line(s)", stacklevel=2)
    return examples, bad


def load_gsm8k(path: str | Path, *, exclude_lines: set[int] | None = None) -> list[Example]:
    """GSM8K test examples. `exclude_lines`: 0-based line numbers to drop (e.g. the items that
    reasoning-gym's gsm_symbolic templates were built from)."""
    examples = []
    for index, (p, lineno, line) in enumerate(_read_lines(path)):
        if exclude_lines and index in exclude_lines:
            continue
        where = f"{p}:{lineno}"
        try:
            row = json.loads(line)
            question, worked = row["question"], row["answer"]
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(f"{where}: expected {{\"question\", \"answer\"}} ({type(e).__name__})") from None
        if "####" not in worked:
            raise ValueError(f"{where}: answer has no '#### <gold>' line")
        rationale, gold = worked.rsplit("####", 1)
        try:
            gold = numbers.canonical_number(gold.strip().replace(",", ""))
        except ValueError as e:
            raise ValueError(f"{where}: gold answer {gold.strip()!r} is not a number ({e})") from None
        examples.append(Example("gsm8k", question.strip(), gold, _CALCULATOR.sub("", rationale).strip(),
                                {"key": question.strip(), "split": "test", "index": index}))
    return examples


def load_svamp(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of problems")
    examples = []
    for i, row in enumerate(rows):
        where = f"{path}: item {i}"
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("Body", "Question")):
            raise ValueError(f"{where}: needs string 'Body' and 'Question'")
        prompt = row["Body"].strip() + " " + row["Question"].strip()
        examples.append(Example("svamp", prompt, _answer_text(row.get("Answer"), where), "",
                                {"key": prompt, "split": "test", "id": row.get("ID", str(i))}))
    return examples


# ---------------------------------------------------------------------------------------------
# Tasks over files
class FileTask(Task):
    """Serves a fixed list of examples per split. generate(n) returns the first n of the split in
    file order when seed=0 and a seeded sample (kept in file order) otherwise; n larger than the
    split returns all of it, with a warning."""

    def _split_examples(self, split: str) -> list[Example]:
        raise NotImplementedError

    def generate(self, n: int, *, split: str = "train", seed: int = 0) -> list[Example]:
        check_split(split)
        check_count(n)
        pool = self._split_examples(split)
        if n >= len(pool):
            if n > len(pool):
                warnings.warn(f"{self.name}: asked for {n} {split} examples, the file has {len(pool)}", stacklevel=2)
            return list(pool)
        if seed == 0:
            return pool[:n]
        return [pool[i] for i in sorted(random.Random(f"{self.name}|{seed}").sample(range(len(pool)), n))]


@dataclass
class JsonlTask(FileTask):
    """Your own problems from a JSONL file; split by a hash of the prompt unless `split_mode` fixes it."""
    name: ClassVar[str] = "jsonl"
    description: ClassVar[str] = "your own JSONL file of {prompt, answer, solution?} (answers checked like gsm8k)"
    path: str = knob("", "the JSONL file")
    split_mode: str = knob("hash", "hash: train/test by a hash of the prompt; train or test: the whole file is that split",
                           choices=("hash", "train", "test"))
    skip_bad_lines: bool = knob(False, "skip (and count) malformed lines instead of raising")
    examples: list = field(default_factory=list, init=False, repr=False)
    bad_lines: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ValueError("jsonl: path is required (path=FILE)")
        loaded, self.bad_lines = load_jsonl(self.path, skip_bad_lines=self.skip_bad_lines)
        for e in loaded:
            split = split_of(e.prompt) if self.split_mode == "hash" else self.split_mode
            self.examples.append(Example(e.task, e.prompt, e.answer, e.solution, {**e.meta, "split": split}))

    def _split_examples(self, split):
        if self.split_mode != "hash" and split != self.split_mode:
            raise ValueError(f"jsonl {self.path}: the file is declared split_mode={self.split_mode!r}, "
                             f"it has no {split!r} examples")
        return [e for e in self.examples if e.meta["split"] == split]


@dataclass
class EvalFileTask(FileTask):
    """GSM8K or SVAMP from a path: test split only."""
    name: ClassVar[str] = "eval_file"
    path: str = knob("", "the data file")
    examples: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ValueError(f"{self.name}: path is required (path=FILE)")
        self.examples = self._load()

    def _load(self) -> list[Example]:
        raise NotImplementedError

    def _split_examples(self, split):
        if split != "test":
            raise ValueError(f"{self.name} is evaluation data: only split='test' exists; "
                             "never put it in a training mix")
        return self.examples


@dataclass
class GSM8K(EvalFileTask):
    name: ClassVar[str] = "gsm8k"
    description: ClassVar[str] = "GSM8K test set from a local JSONL path (evaluation only)"
    exclude_overlap: str = knob("", "optional JSON list of 0-based line numbers to drop (e.g. "
                                    "gsm8k_test_gsm_symbolic_overlap.json, the gsm_symbolic template items)")

    def _load(self):
        exclude = None
        if self.exclude_overlap:
            try:
                exclude = set(json.loads(Path(self.exclude_overlap).read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"gsm8k: exclude_overlap={self.exclude_overlap!r} unreadable ({type(e).__name__})") from None
        return load_gsm8k(self.path, exclude_lines=exclude)


@dataclass
class SVAMP(EvalFileTask):
    name: ClassVar[str] = "svamp"
    description: ClassVar[str] = "SVAMP from a local JSON path (evaluation only)"

    def _load(self):
        return load_svamp(self.path)


def gsm8k(path: str | Path, *, exclude_overlap: str | Path = "") -> GSM8K:
    return GSM8K(path=str(path), exclude_overlap=str(exclude_overlap))


def svamp(path: str | Path) -> SVAMP:
    return SVAMP(path=str(path))
