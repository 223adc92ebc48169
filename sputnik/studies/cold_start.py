"""Study `cold_start`: R1's recipe at small scale. A few gold traces, then RL on answers only.

From the speedrun's pretrained base (which has read addition and subtraction, never a
multiplication), for each K in `traces` and each seed:

    cold start     SFT on K gold chain-of-thought traces of the study task
    + GRPO         the cold start, then GRPO on fresh training-split prompts that carry the answer
                   only (no trace: the verifier rewards whatever reasoning the rollouts write)
    SFT alone      SFT on the same K traces for as many steps as the cold start and GRPO together
                   cost (FLOPs from the ledger; asserted equal within 5% after the run)

Every model is evaluated on the same held-out problems (test split, hash-disjoint from every
training split): greedy accuracy, and pass@1 / pass@k / maj@k of k samples at the study's
temperature. pass@k of the cold start is the headroom GRPO can reach: GRPO mostly sharpens a policy
towards answers its own samples already find, so a cold start whose errors are confident (low
pass@k) leaves it little to do. The cold start's length was chosen with that in view on seed 0
at K = 256 (LOG.md 2026-12-06): 120 steps (7.5 passes) gave greedy 0.13 / pass@16 0.22, 300 steps
(19 passes) 0.27 / 0.45, longer being better for both here (the times table is memorised, not
overfitted); so `cold_start_epochs` passes over the K traces, 150 to 1000 steps. GRPO's learning rate
was chosen on the same seed: 1e-3 collapsed the traces into bare answers within 60 steps, 2e-4 did not.

Those 20 passes leave the cold start short of what SFT can draw from its K traces: SFT alone, with
GRPO's compute spent on more passes, kept improving (K = 256: 0.41 -> 0.50), so the default setting
compares GRPO with the rest of an unfinished SFT. R1's cold start is a finished SFT on its few
traces. `--cold_start_epochs 60 --rl_steps 400` asks that question: a cold start trained to its
plateau on the K traces (train loss ~1e-3; more passes no longer help SFT alone), then ~8
CPU-minutes of GRPO. There GRPO beats more SFT at every K (docs/benchmarks.md has both tables).

    sputnik study cold_start                         # the default: 20-pass cold starts, 80 GRPO steps, 4 K
    # cold starts at their plateau (the published headline):
    sputnik study cold_start --traces 64,256,1024 --cold_start_epochs 60 --max_cold_start_steps 4000 --rl_steps 400
    sputnik study cold_start --scale 0.1 --seeds 0   # a smoke run
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from sputnik.common import print0
from sputnik.config import add_config_args, config_from_args, knob, save_config
from sputnik.studies import runner as R

# Multiplication of a 2-3 digit number by a digit, worked digit by digit: every line is a one-digit
# product plus a carry. The base has read additions and subtractions, never a product: the times
# table comes from the traces alone, which is where a few traces fall short and samples still find
# answers (LOG.md 2026-12-06: K = 256 traces give greedy 0.27 but pass@16 0.45; with two-digit
# second factors, 0.13 and 0.24).
TASK = "multiplication:trace=digits:min_digits_a=2:max_digits_a=3:max_digits_b=1"
ARMS = ("cold start", "cold start + GRPO", "SFT alone")


@dataclass
class Config(R.StudyConfig):
    task: str = knob(TASK, "the study task (a task spec with a worked trace and a verifier)")
    traces: list[int] = knob(default_factory=lambda: [64, 256, 1024, 16000], help="K: gold traces of each cold start")
    cold_start_epochs: float = knob(20.0, "cold-start SFT length in passes over its K traces "
                                         "(between min_cold_start_steps and max_cold_start_steps)", min=0.1)
    min_cold_start_steps: int = knob(150, "shortest cold start (steps of 16 examples)", min=1)
    max_cold_start_steps: int = knob(1000, "longest cold start (steps of 16 examples)", min=1)
    rl_steps: int = knob(80, "GRPO steps after each cold start", min=1)
    rl_prompts_per_step: int = knob(32, "GRPO prompts per step", min=1)
    rl_group_size: int = knob(8, "GRPO samples per prompt", min=2)
    rl_temperature: float = knob(1.0, "GRPO rollout temperature", min=0.01)
    rl_lr: float = knob(2e-4, "GRPO learning rate (constant)", min=0.0)
    max_new_tokens: int = knob(120, "completion budget of rollouts and evaluations (a 3x1-digit trace is ~50 tokens)", min=1)


def cold_start_steps(cfg: Config, k: int) -> int:
    steps = math.ceil(cfg.cold_start_epochs * k / 16)
    return max(1, round(min(cfg.max_cold_start_steps, max(cfg.min_cold_start_steps, steps)) * cfg.scale))


def grpo_steps(cfg: Config) -> int:
    return max(1, round(cfg.rl_steps * cfg.scale))


def run(cfg: Config) -> dict:
    r = cfg.runner("cold_start")
    speedrun, base_ids = cfg.base()
    save_config(cfg, r.out / "study_config.json")
    sft = dict(R.own_settings(speedrun["sft"]), tasks=[cfg.task], max_len=320, max_new_tokens=cfg.max_new_tokens,
               eval_examples=0, eval_every=0, log_every=50)
    sft.pop("model", None)  # the base's architecture comes with init
    rl = dict(R.own_settings(speedrun["rl"]), tasks=[cfg.task], prompts_per_step=cfg.rl_prompts_per_step,
              group_size=cfg.rl_group_size, temperature=cfg.rl_temperature, max_new_tokens=cfg.max_new_tokens,
              steps=grpo_steps(cfg), eval_every=0, eval_examples=50,
              optim=dict(speedrun["rl"]["optim"], lr=cfg.rl_lr))
    rl["health"] = dict(stop_on_pathology=False)  # a study reports what happens; it does not stop an arm
    evaluate = dict(problems=cfg.sampled_problems, samples=cfg.samples, temperature=cfg.temperature,
                    max_new_tokens=cfg.max_new_tokens, greedy_problems=cfg.eval_problems)
    base = speedrun["sft"]["init"]  # the speedrun's pretrained model
    for k in cfg.traces:
        for seed in cfg.seeds:
            steps = cold_start_steps(cfg, k)
            name = f"K{k}/seed{seed}"
            cold = r.stage(f"{name}/cold_start", "sft", dict(sft, init=base, num_examples=k, steps=steps, seed=seed,
                                                            checkpoint_every=steps), base_ids)
            grpo = r.stage(f"{name}/grpo", "rl", dict(rl, init=cold.model, seed=seed, checkpoint_every=rl["steps"]),
                           cold.run_ids)
            budget = cold.flops + grpo.flops
            alone, ratio = r.stage_at_flops(f"{name}/sft_alone", "sft", dict(sft, init=base, num_examples=k, seed=seed),
                                            budget, cold.flops / steps, base_ids)
            for arm, run, flops, wall in (("cold start", cold, cold.flops, cold.wall_s),
                                          ("cold start + GRPO", grpo, budget, cold.wall_s + grpo.wall_s),
                                          ("SFT alone", alone, alone.flops, alone.wall_s)):
                ev = r.evaluate(run, cfg.task, **evaluate)
                r.add(arm=arm, traces=k, seed=seed, flops=flops, wall_s=wall, steps=run.result.get("steps"),
                      compute_ratio=ratio if arm == "SFT alone" else 1.0, **ev)
    return summarize(cfg, r)


def summarize(cfg: Config, r: R.Runner) -> dict:
    k = cfg.samples
    metrics = ("greedy", "pass@1", "pass@1_strict", f"pass@{k}", f"maj@{k}") if k > 1 else ("greedy",)
    labels = {"pass@1": f"pass@1 (T = {cfg.temperature})", "pass@1_strict": "pass@1 strict format"}
    table = R.aggregate(r.rows, ("traces", "arm"), metrics)
    by = {(e["traces"], e["arm"]): e for e in table}
    gains = []
    for t in cfg.traces:
        rl, alone, cold = by.get((t, "cold start + GRPO")), by.get((t, "SFT alone")), by.get((t, "cold start"))
        if rl and alone and cold:
            gains.append(dict(traces=t, vs_sft_alone=_greedy_points(r.rows, t, "SFT alone"),
                              vs_cold_start=_greedy_points(r.rows, t, "cold start")))
    n = cfg.eval_problems
    steps = ", ".join(f"K = {t}: {cold_start_steps(cfg, t)}" for t in cfg.traces)
    lines = ["# Study: cold_start", "",
             f"Cold start: {cfg.cold_start_epochs:g} passes over the K traces, {cfg.min_cold_start_steps}-"
             f"{cfg.max_cold_start_steps} steps of 16 ({steps}); GRPO: {grpo_steps(cfg)} steps of "
             f"{cfg.rl_prompts_per_step} prompts x {cfg.rl_group_size} samples at T = {cfg.rl_temperature:g}, lr {cfg.rl_lr:g}; "
             f"SFT alone: the same K traces for the cold start's and GRPO's FLOPs together.", "",
             f"Task `{cfg.task}`; held-out: {n} test-split problems (greedy), the first {cfg.sampled_problems} of them "
             f"for pass@1 / pass@{k} / maj@{k} ({k} samples at T = {cfg.temperature}; lenient parsing: any answer the task's parser accepts; strict: also the exact <think>/<answer> format). Seeds {cfg.seeds}. Each cell: mean "
             f"over seeds [95% t-interval over seeds] (each seed). FLOPs and wall-clock: training only, from the ledger "
             f"(the pretrained base, shared by every arm, excluded).", "",
             "| traces K | arm | greedy | " + " | ".join(labels.get(m, m) for m in metrics[1:])
             + " | training FLOPs | wall-clock (s) |",
             "|---|---|---|" + "---|" * (len(metrics) - 1) + "---|---|"]
    for e in table:
        lines.append(f"| {e['traces']} | {e['arm']} | " + " | ".join(R.cell(e.get(m)) for m in metrics)
                     + f" | {e['flops']['mean']:.3g} | {e['wall_s']['mean']:.0f} |")
    lines += ["", "Paired differences in greedy accuracy (points; same seed, same traces):", "",
              "| traces K | GRPO − SFT alone (equal FLOPs) | GRPO − its cold start |", "|---|---|---|"]
    for g in gains:
        lines.append(f"| {g['traces']} | {R.cell(g['vs_sft_alone'], '+.1f')} | {R.cell(g['vs_cold_start'], '+.1f')} |")
    lines += ["", "![accuracy against compute](cold_start.png)"]
    headline = None
    if gains:
        g = next((x for x in gains if x["traces"] == 256), gains[0])
        d = g["vs_sft_alone"]
        interval = "" if math.isnan(d["low"]) else f" [{d['low']:+.1f}, {d['high']:+.1f}]"  # one seed: none
        headline = (f"cold_start (K = {g['traces']} traces, {cfg.cold_start_epochs:g}-pass cold start, "
                    f"{grpo_steps(cfg)} GRPO steps, {len(cfg.seeds)} seed{'s' * (len(cfg.seeds) > 1)}, "
                    f"{n} held-out): cold start + GRPO "
                    f"{d['mean']:+.1f} points over SFT alone at equal FLOPs{interval}, "
                    f"{g['vs_cold_start']['mean']:+.1f} over its cold start")
        lines[1:1] = ["", f"**{headline}**"]
    # one line per arm through its K points (K grows left to right: more traces, more FLOPs)
    R.plot(r.out / "cold_start.png", [(arm, [by[(t, arm)] for t in cfg.traces if (t, arm) in by]) for arm in ARMS],
           "greedy", "held-out accuracy (greedy)")
    summary = dict(study="cold_start", task=cfg.task, heldout_problems=n, table=table, gains=gains, headline=headline)
    path = R.write(r, summary, "\n".join(lines) + "\n")
    print0("\n".join(lines))
    print0(f"study cold_start: {path}")
    return summary


def _greedy_points(rows: list[dict], traces: int, baseline: str) -> dict:
    """cold start + GRPO − baseline, greedy accuracy in points, paired by seed (same traces)."""
    return R.paired(rows, "greedy", dict(traces=traces, arm="cold start + GRPO"), dict(traces=traces, arm=baseline), 100)


def register(sub) -> None:
    p = sub.add_parser("cold_start", help="R1's recipe: K gold traces + GRPO on answers only, against SFT alone at equal FLOPs",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, Config)
    p.set_defaults(func=lambda args: run(config_from_args(args, Config)) and 0)
