"""What RL trains on each step: prompts drawn per step (deterministic, so a resumed run sees the same
ones), split over the tasks round-robin or by learnability, rendered with the recipe's template, and
the sampling seed of each step and rank. The prompts carry answers only, never a trace: the verifier
rewards whatever reasoning the rollouts produce.
"""
from __future__ import annotations

import dataclasses
import random

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}"
)


def sample_prompts(tasks, step: int, n: int, seed: int, shares: list[float] | None = None):
    """Deterministic per step (so a resumed run sees the same prompts). shares None: task round-robin;
    else task t gets round(n·shares[t]) of the n prompts (largest remainders), interleaved."""
    rng = random.Random(seed * 1_000_003 + step)
    if shares is None:
        order = [tasks[(step * n + i) % len(tasks)] for i in range(n)]
    else:
        counts = _allocate(n, shares)
        queues = [[t] * c for t, c in zip(tasks, counts)]
        order = [q[i] for i in range(max(counts)) for q in queues if i < len(q)]
    # The trace is dropped here, not merely unused: nothing downstream of RL's prompts can see one.
    return [dataclasses.replace(task.generate(1, split="train", seed=rng.randrange(2**31))[0], solution="")
            for task in order]


def _allocate(n: int, shares: list[float]) -> list[int]:
    """n items split in proportion to shares, integer counts summing to n (largest remainders)."""
    total = sum(shares)
    exact = [n * s / total for s in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


LEARNABILITY_FLOOR = 0.05  # a solved task keeps ~1/5 of a p = 0.5 task's share: a regression still shows


def learnability_shares(task_accuracy: dict[str, float], names: list[str]) -> list[float]:
    """Each task's weight p(1−p), p its running rollout accuracy (0.5 until seen), floored
    (Foster & Foerster 2025, "Learning to reason at the frontier of learnability": GRPO learns from
    prompts whose samples disagree, and p(1−p) is the expected variance of a Bernoulli reward)."""
    return [max(p * (1 - p), LEARNABILITY_FLOOR) for p in (task_accuracy.get(n, 0.5) for n in names)]


def update_task_accuracy(task_acc: dict[str, float], task_names: list[str], correct: list[bool],
                         momentum: float = 0.5) -> None:
    """Running accuracy of each task's rollouts: acc ← m·acc + (1 − m)·(this step's), per task seen."""
    seen: dict[str, list[bool]] = {}
    for name, ok in zip(task_names, correct):
        seen.setdefault(name, []).append(bool(ok))
    for name, hits in seen.items():
        now = sum(hits) / len(hits)
        task_acc[name] = now if name not in task_acc else momentum * task_acc[name] + (1 - momentum) * now


def render(tokenizer, prompt: str, recipe: str) -> list[int]:
    return tokenizer.render_prompt(R1_ZERO_TEMPLATE.format(prompt=prompt) if recipe == "r1_zero" else prompt)


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The engine's sampling seed of one step on one rank (rank 0: the single-process seed)."""
    return seed * 7919 + step + rank * 1_000_003
