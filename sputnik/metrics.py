"""Evaluation statistics: unbiased pass@k, majority vote, confidence intervals.

Pure functions on counts and lists, so they are tested on hand-made numbers.
"""
from __future__ import annotations

import math
import random
from collections import Counter


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 (Codex, eq. 1) for one problem with n samples of which
    c are correct:  1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_vote(answers: list[str | None]) -> str | None:
    """maj@k / self-consistency: the most common extracted answer (None = unparsable, never wins
    unless nothing parsed); ties go to the answer seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def task_tally(names: list[str], tasks_N: list[str], correct_N: list) -> list[float]:
    """[hits, count] of each task in `names` order, flattened: one list that sums over ranks
    (dist all_reduce) before by_task turns it into accuracies."""
    tally = [0.0] * (2 * len(names))
    index = {name: i for i, name in enumerate(names)}
    for task, correct in zip(tasks_N, correct_N):
        tally[2 * index[task]] += float(bool(correct))
        tally[2 * index[task] + 1] += 1.0
    return tally


def by_task(names: list[str], tally: list[float]) -> dict[str, dict]:
    """{task: {"accuracy", "n"}} from a (summed) task_tally, tasks with no problem left out."""
    return {name: {"accuracy": tally[2 * i] / tally[2 * i + 1], "n": int(tally[2 * i + 1])}
            for i, name in enumerate(names) if tally[2 * i + 1]}


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at 0 and 1, unlike mean ± 1.96 se)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values: list[float], iters: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap of the mean over problems (for pass@k>1, lengths, rates)."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    return (means[int(alpha / 2 * iters)], means[min(iters - 1, int((1 - alpha / 2) * iters))])
