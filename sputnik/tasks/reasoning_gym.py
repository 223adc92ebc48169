"""reasoning-gym datasets as Tasks (optional extra `gym`: reasoning-gym==0.1.25, imported lazily).

Prompt = the dataset's question, answer = its answer, solution = "" (the gym has no traces).

Scoring uses OUR verifiers by default (numbers.match_answer: exact numbers in-process, LaTeX via
math-verify in the sandbox, otherwise normalised text), plus our safe countdown checker for its
`countdown` and `puzzle24`. We do not call the gym's own `score_answer` by default because several
are unsafe on model output: `n_queens` eval()s the answer; `countdown`, `puzzle24`,
`polynomial_multiplication` and the integration tasks hand it to sympy's eval-based `parse_expr`
(countdown's can be made to run `__import__('os').system(...)`, and `18**14**8` hangs it);
`bitwise_arithmetic` and `number_sorting` eval() strings too. Most also give partial credit,
which GRPO would learn to farm. `use_rg_scorer=True` is accepted only for RG_SAFE_SCORERS, whose sources (0.1.25) we read:
plain string, int(), Decimal(), re and set logic, no eval, no sympy. Even those run in the sandbox
worker under a hard timeout, and the reward is binary: correct iff score >= 1.0.

`gsm_symbolic` is built from GSM8K *test* questions (96 of its 100 templates match a GSM8K test
item; /work/shared/data/README.md): training on it contaminates GSM8K evaluation, so
generate(split="train") raises unless allow_test_derived=True (then report GSM8K without the
overlapping items: gsm8k(path, exclude_overlap=...)).

Split: split_of(question), like every other task; generate draws dataset items in index order and
keeps those in the requested split. The gym's item seeds are seed + index, so our seed is hashed
into the gym seed: nearby seeds would otherwise share almost all their items.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import random
from dataclasses import dataclass
from typing import ClassVar

from sputnik.config import knob
from sputnik.tasks import sandbox
from sputnik.tasks.base import MAX_DRAWS_PER_EXAMPLE, Example, Task, check_count, check_split, split_of
from sputnik.tasks.countdown import check_expression

RG_SAFE_SCORERS = {
    "chain_sum": "Decimal equality (utils.compute_decimal_reward)",
    "products": "Decimal equality (utils.compute_decimal_reward)",
    "decimal_arithmetic": "Decimal difference within the configured precision",
    "fraction_simplification": "regex + int() of numerator and denominator",
    "prime_factorization": "split on '×' + int(), sorted list equality",
    "spell_backward": "lower-cased string equality",
    "letter_jumble": "lower-cased string equality",
    "word_sorting": "re.split on commas, list equality",
    "knights_knaves": "token parsing into a set of (name, role)",
    "mini_sudoku": "line-by-line string / digit comparison",
}
TEST_DERIVED = {"gsm_symbolic": "built from GSM8K test questions"}
# Gym tasks whose answer is an arithmetic expression: judged by our parser (countdown.py).
EXPRESSION_TASKS = {"countdown", "puzzle24"}


def import_reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError("reasoning-gym is not installed; install the extra: pip install -e '.[gym]' "
                          "(reasoning-gym==0.1.25)") from None
    return reasoning_gym


@contextlib.contextmanager
def _global_rngs_seeded():
    """Some gym generators draw from the global `random` / numpy RNGs instead of their item's own
    (list_functions): seed both per item, so the same seed gives the same items in every process and
    call, and restore the caller's states afterwards. (Others iterate sets of strings, whose order
    follows the process's hash salt: common.fixed_hash_seed.)"""
    import numpy as np

    state, np_state = random.getstate(), np.random.get_state()

    def reseed(item_seed: int) -> None:
        random.seed(item_seed)
        np.random.seed(item_seed % 2**32)

    try:
        yield reseed
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


def _jsonable(entry: dict) -> dict:
    """Gym entries hold tuples (and occasionally other objects): make them JSON for meta/sandbox."""
    return json.loads(json.dumps(entry, default=str))


@dataclass
class ReasoningGymTask(Task):
    """One reasoning-gym dataset; get_task("rg:NAME", **config) builds it."""
    description: ClassVar[str] = "any reasoning-gym dataset as rg:NAME (extra knobs go to its config)"
    dataset: str = knob("", "reasoning-gym dataset name, e.g. chain_sum")
    config: dict = knob(help="dataset config overrides, passed to reasoning_gym.create_dataset", default_factory=dict)
    use_rg_scorer: bool = knob(False, "score with the gym's own scorer (only: " + ", ".join(sorted(RG_SAFE_SCORERS)) + ")")
    allow_test_derived: bool = knob(False, "allow gsm_symbolic (built from GSM8K test questions) in split='train'")

    @property
    def name(self) -> str:
        return f"rg:{self.dataset}"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dataset:
            raise ValueError("rg: dataset is required, e.g. get_task('rg:chain_sum')")
        if self.use_rg_scorer and self.dataset not in RG_SAFE_SCORERS:
            raise ValueError(f"rg:{self.dataset}: use_rg_scorer=True is not allowed for this dataset (its scorer is "
                             f"not reviewed as eval-free); allowed: {', '.join(sorted(RG_SAFE_SCORERS))}")

    def generate(self, n: int, *, split: str = "train", seed: int = 0) -> list[Example]:
        check_split(split)
        check_count(n)
        if self.dataset in TEST_DERIVED and split == "train" and not self.allow_test_derived:
            raise ValueError(f"rg:{self.dataset} is {TEST_DERIVED[self.dataset]}: training on it contaminates "
                             "GSM8K evaluation; pass allow_test_derived=True if you mean it")
        rg = import_reasoning_gym()
        if self.dataset not in rg.factory.DATASETS:
            close = difflib.get_close_matches(self.dataset, list(rg.factory.DATASETS), n=3)
            raise ValueError(f"rg:{self.dataset}: no such reasoning-gym dataset" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        budget = MAX_DRAWS_PER_EXAMPLE * n + 1000
        gym_seed = int.from_bytes(hashlib.blake2b(f"{self.dataset}|{seed}".encode(), digest_size=4).digest(), "big")
        try:
            ds = rg.create_dataset(self.dataset, seed=gym_seed, size=budget, **self.config)
        except (TypeError, ValueError, AssertionError, KeyError) as e:
            raise ValueError(f"rg:{self.dataset}: config {self.config} rejected by reasoning-gym: {e}") from None
        examples = []
        with _global_rngs_seeded() as reseed:
            for index in range(budget):
                if len(examples) == n:
                    break
                reseed(gym_seed + index)
                entry = ds[index]
                question = entry["question"]
                if split_of(question) == split:
                    examples.append(self._example(entry, index, split))
        if len(examples) < n:
            raise ValueError(f"rg:{self.dataset}: only {len(examples)} of {n} {split} items in {budget} draws")
        return examples

    def _example(self, entry: dict, index: int, split: str) -> Example:
        meta = {"key": entry["question"], "split": split, "rg_index": index, "rg_config": self.config}
        if self.use_rg_scorer:
            meta.update(rg_scorer=True, rg_entry=_jsonable(entry))
        if self.dataset in EXPRESSION_TASKS:
            md = entry["metadata"]
            meta.update(numbers=[int(x) for x in md["numbers"]], target=int(md.get("target", 24)))
        return Example(self.name, entry["question"], str(entry["answer"]), "", meta)

    def check_answer(self, example: Example, answer: str) -> tuple[bool, str]:
        if self.dataset in EXPRESSION_TASKS:
            return check_expression(answer, example.meta["numbers"], example.meta["target"], use_all=True)
        if not self.use_rg_scorer:
            return super().check_answer(example, answer)
        args = {"dataset": self.dataset, "config": example.meta.get("rg_config", {}),
                "entry": example.meta["rg_entry"], "answer": answer}
        try:
            score = sandbox.call("rg_score", args, self.verify_timeout_s)
        except sandbox.SandboxTimeout:
            return False, f"reasoning-gym scorer timed out after {self.verify_timeout_s:g}s"
        except sandbox.SandboxError as e:
            return False, f"reasoning-gym scorer failed: {str(e)[:200]}"
        ok = isinstance(score, (int, float)) and score >= 1.0
        return ok, f"reasoning-gym score {score}" + ("" if ok else " (< 1.0 counts as wrong)")


# ---------------------------------------------------------------------------------------------
# Worker side (runs inside sandbox.serve)
_WORKER_DATASETS: dict[str, object] = {}


def worker_score(dataset: str, config: dict, entry: dict, answer: str) -> float:
    if dataset not in RG_SAFE_SCORERS:  # defence in depth: the parent checks this too
        raise ValueError(f"{dataset} is not in RG_SAFE_SCORERS")
    key = dataset + json.dumps(config, sort_keys=True)
    if key not in _WORKER_DATASETS:
        _WORKER_DATASETS[key] = import_reasoning_gym().create_dataset(dataset, seed=0, size=1, **config)
    return float(_WORKER_DATASETS[key].score_answer(answer, entry))
