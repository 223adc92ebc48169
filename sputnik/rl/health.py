"""Health checks for RL runs: loud warnings (and an optional stop) on the pathologies that make a
GRPO run "train" with zero signal - the most common complaint about RL toolkits.

Each check is a plain function of the recent per-step metrics; `HealthMonitor` keeps the history
and turns failed checks into warnings, at most once per `repeat_every` steps each.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sputnik.accounting.ledger import RunStopped
from sputnik.config import knob

FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class HealthStop(RunStopped):
    """A health check stopped the run (health.stop_on_pathology): ledger status "stopped", exit code 4."""


@dataclass
class HealthConfig:
    window: int = knob(5, "steps a condition must hold before it is reported", min=1)
    max_truncated_frac: float = knob(0.5, "warn when more completions than this hit max_new_tokens", min=0.0, max=1.0)
    max_zero_variance_frac: float = knob(0.9, "warn when more groups than this have identical rewards (no gradient)", min=0.0, max=1.0)
    max_parse_failure_frac: float = knob(0.95, "warn when more answers than this cannot be parsed", min=0.0, max=1.0)
    min_entropy: float = knob(0.02, "warn when mean token entropy (nats) falls below this (entropy collapse)", min=0.0)
    max_kl: float = knob(1.0, "warn when the KL to the reference/old policy exceeds this", min=0.0)
    stop_on_pathology: bool = knob(False, "stop the run (ledger status stopped, exit code 4) instead of only warning")


def prompt_prefills_format(rendered_prompt: str) -> str | None:
    """A prompt that already contains the format tags hands the model its format reward for free
    (and hides whether it learned the format). Returns the offending tag, or None."""
    tail = rendered_prompt.rsplit("<|assistant|>", 1)[-1]
    for tag in FORMAT_TAGS:
        if tag in tail:
            return tag
    return None


def _all(values, pred) -> bool:
    return len(values) > 0 and all(pred(v) for v in values)


def check_step_window(history: list[dict], cfg: HealthConfig) -> list[str]:
    """Conditions that must hold for `cfg.window` consecutive steps."""
    if len(history) < cfg.window:
        return []
    w = history[-cfg.window:]
    col = lambda k: [h[k] for h in w if k in h]  # noqa: E731
    out = []
    if _all(col("truncated_frac"), lambda v: v > cfg.max_truncated_frac):
        out.append(f"truncation: >{cfg.max_truncated_frac:.0%} of completions hit max_new_tokens for {cfg.window} steps "
                   "(raise max_new_tokens or add an overlong penalty)")
    if _all(col("zero_variance_frac"), lambda v: v > cfg.max_zero_variance_frac):
        out.append(f"no signal: >{cfg.max_zero_variance_frac:.0%} of groups have identical rewards for {cfg.window} steps "
                   "(tasks too easy/hard for the policy; try dynamic sampling or other difficulty)")
    if _all(col("parse_failure_frac"), lambda v: v > cfg.max_parse_failure_frac):
        out.append("answers unparsable: the policy almost never produces an extractable answer")
    fmt = col("format_rate")
    if _all(fmt, lambda v: v == 0.0):
        out.append("format reward stuck at 0: the policy never produces the <think>/<answer> format")
    elif _all(fmt, lambda v: v == 1.0) and _all(col("reward_std"), lambda v: v == 0.0):
        out.append("format reward stuck at 1 with zero reward variance: no learning signal left")
    if _all(col("entropy"), lambda v: v < cfg.min_entropy):
        out.append(f"entropy collapse: mean token entropy < {cfg.min_entropy} nats for {cfg.window} steps")
    if _all(col("kl"), lambda v: v > cfg.max_kl):
        out.append(f"KL blow-up: KL > {cfg.max_kl} for {cfg.window} steps")
    return out


def check_reward_hacking(reward_by_eval: list[float], heldout_acc_by_eval: list[float], min_points: int = 3) -> str | None:
    """Training reward rising while held-out accuracy falls, over the last `min_points` evals."""
    if len(reward_by_eval) < min_points or len(heldout_acc_by_eval) < min_points:
        return None
    r, a = reward_by_eval[-min_points:], heldout_acc_by_eval[-min_points:]
    if r[-1] > r[0] and a[-1] < a[0] and all(x <= y for x, y in zip(r, r[1:])) and all(x >= y for x, y in zip(a, a[1:])):
        return (f"possible reward hacking: train reward {r[0]:.3f} -> {r[-1]:.3f} while held-out accuracy "
                f"{a[0]:.3f} -> {a[-1]:.3f}")
    return None


class HealthMonitor:
    def __init__(self, cfg: HealthConfig, repeat_every: int = 20):
        self.cfg, self.repeat_every = cfg, repeat_every
        self.history: deque = deque(maxlen=max(cfg.window, 1))
        self.evals: list[tuple[float, float]] = []  # (train reward, held-out accuracy)
        self._last_warned: dict[str, int] = {}
        self.step = 0

    def observe_step(self, metrics: dict) -> list[str]:
        self.step += 1
        self.history.append(metrics)
        return self._fresh(check_step_window(list(self.history), self.cfg))

    def observe_eval(self, train_reward: float, heldout_acc: float) -> list[str]:
        self.evals.append((train_reward, heldout_acc))
        msg = check_reward_hacking([e[0] for e in self.evals], [e[1] for e in self.evals])
        return self._fresh([msg] if msg else [])

    def _fresh(self, warnings: list[str]) -> list[str]:
        out = []
        for w in warnings:
            key = w.split(":")[0]
            if self.step - self._last_warned.get(key, -10**9) >= self.repeat_every:
                self._last_warned[key] = self.step
                out.append(w)
        return out
