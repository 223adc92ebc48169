"""Study `distill_vs_rl`: R1's Table 6 in miniature. Is a small student better served by the RL
recipe itself or by distillation from an RL-trained teacher, at equal student compute?

Shared by every arm (seed 0): the teacher, the speedrun's pretrained base given the cold_start
recipe (SFT on `traces` gold traces of the study task, then GRPO on answers only), and the student's
own base, a model of the speedrun's student size (≤ 1/4 of the teacher's active parameters)
pretrained on the speedrun's corpus. Then, for each seed:

    student RL          the same recipe on the student: SFT on the same number of gold traces, then GRPO
    distill (sequence)  the student base fine-tuned on the teacher's verified samples (rejection
                        sampling, R1's way), as many steps as the RL student's FLOPs buy
    distill (logit)     the student base trained on the teacher's token distributions over its samples
                        (forward KL), at the same student FLOPs
    distill (on-policy) the student's own samples scored by the teacher's distributions (reverse KL,
                        GKD λ = 1: the field's on-policy distillation), at the same student FLOPs

Student compute is the student's own FLOPs from the ledger (the KD runs' teacher forwards are taken
out and shown with the teacher's sampling as the teacher's cost beside it); every distillation
arm is asserted within 5% of the RL student's. All students are evaluated on the same held-out
problems as in cold_start, with the teacher's own accuracy for reference.

    sputnik study distill_vs_rl
    sputnik study distill_vs_rl --scale 0.1 --seeds 0   # a smoke run
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from sputnik.common import print0
from sputnik.config import add_config_args, config_from_args, knob, save_config
from sputnik.studies import cold_start
from sputnik.studies import runner as R

ARMS = ("student RL", "distill (sequence)", "distill (logit)", "distill (on-policy)")


@dataclass
class Config(R.StudyConfig):
    task: str = knob(cold_start.TASK, "the study task (a task spec with a worked trace and a verifier)")
    # the teacher is cold_start's recipe at K = 1024 (its defaults: 1000 cold-start steps, 80 GRPO steps)
    traces: int = knob(1024, "gold traces of the teacher's and the RL student's cold start", min=1)
    cold_start_steps: int = knob(1000, "cold-start SFT steps (16 examples each), teacher and RL student", min=1)
    rl_steps: int = knob(80, "GRPO steps, teacher and RL student", min=1)
    rl_lr: float = knob(2e-4, "GRPO learning rate (constant; cold_start's)", min=0.0)
    rl_temperature: float = knob(1.0, "GRPO rollout temperature", min=0.01)
    student_pretrain_steps: int = knob(1200, "pretraining steps of the student's base (the teacher base's count)", min=1)
    distill_prompts: int = knob(2000, "training prompts the teacher answers for sequence and logit distillation", min=1)
    teacher_samples: int = knob(2, "teacher samples per prompt (sequence mode keeps the verified ones)", min=1)
    teacher_temperature: float = knob(0.7, "teacher sampling temperature", min=0.0)
    max_new_tokens: int = knob(120, "completion budget of rollouts, traces and evaluations", min=1)


def run(cfg: Config) -> dict:
    from sputnik.pipeline import _student_model

    r = cfg.runner("distill_vs_rl")
    speedrun, base_ids = cfg.base()
    save_config(cfg, r.out / "study_config.json")
    sft = dict(R.own_settings(speedrun["sft"]), tasks=[cfg.task], num_examples=cfg.traces, max_len=256,
               max_new_tokens=cfg.max_new_tokens, eval_examples=0, eval_every=0)
    sft.pop("model", None)
    rl = dict(R.own_settings(speedrun["rl"]), tasks=[cfg.task], prompts_per_step=32, group_size=8,
              temperature=cfg.rl_temperature, max_new_tokens=cfg.max_new_tokens, steps=max(1, round(cfg.rl_steps * cfg.scale)),
              eval_every=0, eval_examples=50, optim=dict(speedrun["rl"]["optim"], lr=cfg.rl_lr),
              health=dict(stop_on_pathology=False))
    cold_steps = max(1, round(cfg.cold_start_steps * cfg.scale))
    evaluate = dict(problems=cfg.sampled_problems, samples=cfg.samples, temperature=cfg.temperature,
                    max_new_tokens=cfg.max_new_tokens, greedy_problems=cfg.eval_problems)
    # --- shared: the teacher (the cold_start recipe on the speedrun's base) and the student's base ---
    t_cold = r.stage("teacher/cold_start", "sft", dict(sft, init=speedrun["sft"]["init"], steps=cold_steps, seed=0), base_ids)
    teacher = r.stage("teacher/grpo", "rl", dict(rl, init=t_cold.model, seed=0), t_cold.run_ids)
    student_base = r.stage("student/pretrain", "pretrain", dict(
        R.own_settings(speedrun["pretrain"]), model=_student_model(cfg.preset), seed=0,
        steps=max(1, round(cfg.student_pretrain_steps * cfg.scale))), base_ids[:0])
    t_eval = r.evaluate(teacher, cfg.task, **evaluate)
    r.add(arm="teacher (cold start + GRPO)", seed=0, flops=t_cold.flops + teacher.flops, wall_s=t_cold.wall_s + teacher.wall_s,
          student_flops=None, teacher_flops=None, **t_eval)
    distill = dict(teacher=teacher.model, init=student_base.model, student=_student_model(cfg.preset), tasks=[cfg.task], num_prompts=cfg.distill_prompts,
                   samples_per_prompt=cfg.teacher_samples, teacher_temperature=cfg.teacher_temperature,
                   max_new_tokens=cfg.max_new_tokens, batch_size=16, max_len=256, eval_examples=50, progress=False,
                   optim=dict(speedrun["distill"]["optim"]))
    for seed in cfg.seeds:
        name = f"seed{seed}"
        s_cold = r.stage(f"{name}/student_cold_start", "sft", dict(sft, init=student_base.model, steps=cold_steps, seed=seed),
                         student_base.run_ids)
        s_rl = r.stage(f"{name}/student_grpo", "rl", dict(rl, init=s_cold.model, seed=seed), s_cold.run_ids)
        budget = s_cold.flops + s_rl.flops
        arms = [("student RL", s_rl, budget, None, 1.0, s_cold.wall_s + s_rl.wall_s)]
        per_step = s_cold.flops / cold_steps  # one student step of 16 sequences of about the traces' length
        for arm, mode in (("distill (sequence)", dict(mode="sequence")),
                          ("distill (logit)", dict(mode="logit", divergence="forward_kl")),
                          ("distill (on-policy)", dict(mode="logit", divergence="reverse_kl", on_policy_fraction=1.0))):
            slug = arm.split("(")[1].rstrip(")").replace("-", "_")
            run, ratio = r.stage_at_flops(f"{name}/distill_{slug}", "distill", dict(distill, seed=seed, **mode), budget,
                                          per_step, teacher.run_ids, own_flops=lambda x: student_flops(r, x))
            arms.append((arm, run, student_flops(r, run), teacher_flops(r, run), ratio, student_wall(r, run)))
        for arm, run, flops, t_flops, ratio, wall in arms:
            ev = r.evaluate(run if arm == "student RL" else _student_run(run), cfg.task, **evaluate)
            r.add(arm=arm, seed=seed, flops=flops, wall_s=wall, student_flops=flops, teacher_flops=t_flops,
                  compute_ratio=ratio, **ev)
    return summarize(cfg, r, t_eval)


def _student_dir(run: R.StageRun) -> str:
    """Where a distill run trained its student: student_sft (sequence) or student_kd (logit)."""
    from pathlib import Path

    out = Path(run.out_dir)
    return str(out / ("student_sft" if (out / "student_sft").is_dir() else "student_kd"))


def _student_run(run: R.StageRun) -> R.StageRun:
    return R.StageRun(run.name, _student_dir(run), run.result, run.run_ids, run.flops, run.wall_s)


def student_flops(r: R.Runner, run: R.StageRun) -> float:
    """The student's own training FLOPs of a distill run: its SFT or KD run's ledger FLOPs, minus the
    teacher forwards a KD run counts in them."""
    from pathlib import Path

    flops, _ = r.spent(Path(_student_dir(run)), run.run_ids)
    return flops - _teacher_forward(r, run)


def teacher_flops(r: R.Runner, run: R.StageRun) -> float:
    """The teacher's share: sampling the traces (the distill run itself) plus KD's teacher forwards."""
    from pathlib import Path

    sampled, _ = r.spent(Path(run.out_dir), run.run_ids)
    return sampled + _teacher_forward(r, run)


def student_wall(r: R.Runner, run: R.StageRun) -> float:
    from pathlib import Path

    return r.spent(Path(_student_dir(run)), run.run_ids)[1]


def _teacher_forward(r: R.Runner, run: R.StageRun) -> float:
    """KD's teacher forwards: cumulative over a resumed KD run, so the latest run's figure."""
    from pathlib import Path

    rows = r.lineage(Path(_student_dir(run)), run.run_ids)
    latest = max(rows, key=lambda row: row.get("start_ts") or 0, default={})
    return (latest.get("metrics") or {}).get("teacher_forward_flops") or 0.0


def summarize(cfg: Config, r: R.Runner, teacher: dict) -> dict:
    k = cfg.samples
    metrics = ("greedy", f"pass@{k}", f"maj@{k}") if k > 1 else ("greedy",)
    students = [x for x in r.rows if x["arm"] in ARMS]
    table = R.aggregate(students, ("arm",), metrics + ("teacher_flops",))
    n = cfg.eval_problems
    lines = ["# Study: distill_vs_rl", "",
             f"Task `{cfg.task}`; held-out: {n} test-split problems (greedy), pass@{k} / maj@{k} on the first "
             f"{cfg.sampled_problems} ({k} samples at T = {cfg.temperature}). Teacher (seed 0, shared): greedy "
             f"{teacher['greedy']:.2f}. Student compute: the student's own training FLOPs (ledger), equal across "
             f"arms within 5%; the teacher's cost of each arm (sampling its traces, KD's teacher forwards) is beside it, "
             f"not included. Each cell: mean over seeds [95% t-interval over seeds] (each seed).", "",
             "| arm | greedy | " + " | ".join(metrics[1:]) + " | student FLOPs | teacher FLOPs | student wall-clock (s) |",
             "|---|---|" + "---|" * (len(metrics) - 1) + "---|---|---|"]
    for e in table:
        tf = e.get("teacher_flops")
        lines.append(f"| {e['arm']} | " + " | ".join(R.cell(e.get(m)) for m in metrics)
                     + f" | {e['flops']['mean']:.3g} | {tf['mean'] if tf else 0:.3g} | {e['wall_s']['mean']:.0f} |")
    by = {e["arm"]: e for e in table}
    headline = None
    if "distill (sequence)" in by and "student RL" in by:
        d, a = by["distill (sequence)"]["greedy"], by["student RL"]["greedy"]
        diff = R.paired(students, "greedy", dict(arm="distill (sequence)"), dict(arm="student RL"), 100)
        interval = "" if math.isnan(diff["low"]) else f" [{diff['low']:+.1f}, {diff['high']:+.1f}]"  # one seed: none
        headline = (f"distill_vs_rl ({len(cfg.seeds)} seed{'s' * (len(cfg.seeds) > 1)}, {n} held-out): at equal student FLOPs, sequence distillation "
                    f"from the RL teacher {d['mean']:.2f} vs the RL recipe on the student {a['mean']:.2f}, "
                    f"{diff['mean']:+.1f} points{interval} paired by seed (teacher {teacher['greedy']:.2f})")
        lines += ["", f"Paired by seed, greedy points: sequence distillation − student RL {diff['mean']:+.1f}{interval} "
                  f"({' / '.join(f'{v:+.1f}' for v in diff['per_seed'])})."]
        lines[1:1] = ["", f"**{headline}**"]
    lines += ["", "![accuracy against compute](distill_vs_rl.png)"]
    R.plot(r.out / "distill_vs_rl.png", [(arm, [by[arm]]) for arm in ARMS if arm in by], "greedy",
           "held-out accuracy (greedy)")
    summary = dict(study="distill_vs_rl", task=cfg.task, heldout_problems=n, teacher=teacher, table=table, headline=headline)
    path = R.write(r, summary, "\n".join(lines) + "\n")
    print0("\n".join(lines))
    print0(f"study distill_vs_rl: {path}")
    return summary


def register(sub) -> None:
    p = sub.add_parser("distill_vs_rl", help="a small student: the RL recipe itself vs distillation from the RL "
                                             "teacher (sequence, logit, on-policy) at equal student FLOPs",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, Config)
    p.set_defaults(func=lambda args: run(config_from_args(args, Config)) and 0)
