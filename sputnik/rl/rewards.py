"""Rewards for RL: the task verifier's verdict, weighted, plus user reward functions that are
treated as untrusted code.

A reward function is `fn(prompt: str, completion: str, answer: str, **meta) -> float`. Built-in
verifiers are total and bounded (sputnik.tasks), so they run in-process. A user function given by
import path (`package.module:function`) runs in a worker process with a hard per-call time limit:
one that raises, returns a non-finite value or hangs scores 0 for that sample, is counted, and the
worker is replaced; the run goes on.
"""
from __future__ import annotations

import importlib
import math
import multiprocessing as mp
import queue
from dataclasses import dataclass, field


def import_by_path(path: str):
    """'pkg.mod:fn' or 'pkg.mod.fn' -> the callable (clear errors for typos)."""
    mod_name, sep, attr = path.partition(":")
    if not sep:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"reward function {path!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {path!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward function {path!r} is not callable")
    return fn


def _worker(path: str, inbox, outbox):
    fn = import_by_path(path)
    while True:
        job = inbox.get()
        if job is None:
            return
        i, kwargs = job
        try:
            outbox.put((i, float(fn(**kwargs)), None))
        except BaseException as e:  # noqa: BLE001 - untrusted code: any failure is a 0 reward
            outbox.put((i, 0.0, f"{type(e).__name__}: {e}"[:200]))


@dataclass
class RewardFailures:
    raised: int = 0
    timed_out: int = 0
    non_finite: int = 0
    examples: list[str] = field(default_factory=list)

    def total(self) -> int:
        return self.raised + self.timed_out + self.non_finite


class IsolatedReward:
    """Runs an import-path reward function in a separate process with a per-call time limit."""

    def __init__(self, path: str, timeout_s: float = 2.0):
        import_by_path(path)  # fail fast, in the parent, on a bad path
        self.path, self.timeout_s = path, timeout_s
        self.failures = RewardFailures()
        self._ctx = mp.get_context("spawn")  # no fork of a process holding torch threads
        self._proc = None

    def _start(self):
        self._inbox, self._outbox = self._ctx.Queue(), self._ctx.Queue()
        self._proc = self._ctx.Process(target=_worker, args=(self.path, self._inbox, self._outbox), daemon=True)
        self._proc.start()

    def _kill(self):
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(timeout=5)
            self._proc = None

    def __call__(self, batch: list[dict]) -> list[float]:
        scores = []
        for i, kwargs in enumerate(batch):
            slack = 0.0
            if self._proc is None or not self._proc.is_alive():
                self._start()
                slack = 10.0  # interpreter start-up and import are not the reward's time
            self._inbox.put((i, kwargs))
            try:
                _, score, err = self._outbox.get(timeout=self.timeout_s + slack)
            except queue.Empty:
                self.failures.timed_out += 1
                self._note(f"timeout after {self.timeout_s}s")
                self._kill()  # a hung worker cannot be reused
                scores.append(0.0)
                continue
            if err is not None:
                self.failures.raised += 1
                self._note(err)
                score = 0.0
            elif not math.isfinite(score):
                self.failures.non_finite += 1
                self._note(f"non-finite reward {score}")
                score = 0.0
            scores.append(score)
        return scores

    def _note(self, msg: str):
        if len(self.failures.examples) < 20:
            self.failures.examples.append(msg)

    def close(self):
        if self._proc is not None and self._proc.is_alive():
            self._inbox.put(None)
            self._proc.join(timeout=2)
        self._kill()


@dataclass
class RewardWeights:
    accuracy: float = 1.0
    format: float = 0.1
    custom: float = 1.0


def verifier_rewards(verify, examples, completions: list[str], weights: RewardWeights):
    """-> (rewards, verdicts) with `verify(example, completion) -> Verdict`.
    reward = w_acc·1[correct] + w_fmt·1[well formatted] (R1: Reward_rule = Reward_acc + Reward_format).
    Verifiers are total; a failure here would be a bug in sputnik, so it is not swallowed."""
    verdicts = [verify(ex, c) for ex, c in zip(examples, completions)]
    rewards = [weights.accuracy * v.correct + weights.format * v.well_formatted for v in verdicts]
    return rewards, verdicts


def score(cfg, tasks_by_name: dict, examples, completions, custom: IsolatedReward | None):
    """-> (rewards, verdicts) of a step's completions: the verifier reward (accuracy_weight,
    format_weight), plus the isolated user reward if any, plus DAPO's soft overlong penalty when
    overlong_cache > 0."""
    import torch

    from sputnik.rl import objectives

    weights = RewardWeights(accuracy=cfg.accuracy_weight, format=cfg.format_weight)
    texts = [c.text for c in completions]
    rewards, verdicts = verifier_rewards(lambda ex, c: tasks_by_name[ex.task].verify(ex, c), examples, texts, weights)
    if custom is not None:
        extra = custom([{"prompt": ex.prompt, "completion": t, "answer": ex.answer} for ex, t in zip(examples, texts)])
        rewards = [r + e for r, e in zip(rewards, extra)]
    if cfg.overlong_cache:
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        pen = objectives.soft_overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_cache)
        rewards = [r + float(p) for r, p in zip(rewards, pen)]
    return rewards, verdicts
