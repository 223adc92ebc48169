"""`sputnik compare`: recipes at equal compute, held-out accuracy against training FLOPs.

The frugality claim, measured instead of asserted. Four recipes on the same tasks, tokenizer,
pretraining tokens and held-out problems:

    dense-sft      a dense Llama twin (same width and depth, SwiGLU width chosen so its active
                   parameters equal the MoE's) pretrained on the same tokens, then SFT
    moe-sft        the speedrun's MoE base, then SFT only
    moe-sft-grpo   the speedrun's own lineage: MoE base -> SFT -> GRPO
    distilled      the speedrun's student, distilled from the moe-sft-grpo teacher

The budget B is what moe-sft-grpo spent (pretrain + SFT + GRPO FLOPs, from the ledger).
dense-sft and moe-sft get B too (times `budget_multiplier`): their SFT runs for as many steps as
the budget left after pretraining buys, with held-out accuracy every `1/eval_points` of the run.
The distilled student is plotted at its honest cost: the teacher's B plus trace sampling plus its
own training (its win is inference: a fraction of the teacher's active parameters).

Compute to target: the first (linearly interpolated) compute at which a recipe's held-out accuracy
reaches the target (default: the dense baseline's final accuracy), and its ratio to the dense
baseline's. A recipe that never reaches it within its budget says so.

The speedrun's stages are reused from the project (DONE.json) and run first if missing; the
compare runs are recorded in the same ledger under `compare:*` commands, so the ledger's
"everything spent" counts them. Outputs: <project>/compare/{compare.md, compare.json, compare.png}.

    sputnik compare                      # after (or including) `sputnik speedrun`
    sputnik compare --scale 0.05 --project runs/smoke
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from sputnik.common import atomic_write_json, atomic_write_text, is_rank0, print0
from sputnik.config import DeviceConfig, add_config_args, build, config_from_args, knob, save_config
from sputnik.pipeline import SPEEDRUN_TASKS

RECIPES = ["dense-sft", "moe-sft", "moe-sft-grpo", "distilled"]
COMPARE_STAGES = ["dense_pretrain", "dense_sft", "moe_sft"]


@dataclass
class CompareConfig(DeviceConfig):
    project: str = knob("runs/speedrun", "speedrun project to extend (its finished stages are reused)")
    preset: Literal["cpu", "gpu", "gpus"] = knob("cpu", "the speedrun preset (see `sputnik speedrun --help`)")
    tasks: list[str] = knob(default_factory=lambda: list(SPEEDRUN_TASKS), help="tasks of every recipe")
    scale: float = knob(1.0, "multiply every stage's step count, as in the speedrun", min=0.01, max=100.0)
    budget_multiplier: float = knob(1.0, "dense-sft and moe-sft get this times the moe-sft-grpo budget", min=0.1, max=100.0)
    eval_points: int = knob(4, "held-out accuracy evaluations per budgeted SFT run", min=1, max=100)
    target_accuracy: float = knob(0.0, "accuracy whose compute-to-reach is compared (0 = the dense baseline's final)",
                                  min=0.0, max=1.0)
    force: list[str] = knob(default_factory=list, help=f"compare stages to rerun ({', '.join(COMPARE_STAGES)}; 'all')")
    seed: int = knob(0, "seed of every stage", min=0)

    def __post_init__(self):
        unknown = set(self.force) - set(COMPARE_STAGES) - {"all"}
        if unknown:
            raise ValueError(f"force={sorted(unknown)}: allowed {', '.join(COMPARE_STAGES)}, all")


# ---------------------------------------------------------------------------------------------
# The dense twin and the budgeted runs
def dense_twin(moe: dict, attention: str = "llama") -> dict:
    """A dense model with the MoE's width, depth, heads and vocabulary whose active parameters (no MTP)
    match the MoE's; the SwiGLU width is searched in steps of 8.

    attention="llama": our Llama (multi-head attention of width d): a conventional dense model, whose
      larger attention leaves a narrower FFN than the MoE's active experts.
    attention="mla":   the MoE's own DeepSeek-V3 model with every layer's FFN dense (MLA, norms, MTP
      as the MoE has them): the two differ in the FFN only, DeepSeekMoE's own ablation."""
    from sputnik.model.accounting import param_counts
    from sputnik.model.config import ModelConfig

    if attention not in ("llama", "mla"):
        raise ValueError(f"dense twin attention={attention!r}: expected llama or mla")
    target = param_counts(build(ModelConfig, dict(moe, num_nextn_predict_layers=0)))["active"]
    if attention == "mla":
        base = dict(moe, first_k_dense_replace=moe["num_hidden_layers"])
    else:
        keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
        base = dict(architecture="llama", **{k: moe[k] for k in keep if k in moe})

    def active(inter: int) -> int:
        return param_counts(build(ModelConfig, dict(base, intermediate_size=inter, num_nextn_predict_layers=0)))["active"]

    per_unit = (active(16) - active(8)) / 8  # active parameters are linear in the SwiGLU width
    best = max(8, 8 * round((target - active(8)) / per_unit / 8 + 1))
    return dict(base, intermediate_size=best)


def _sft_flops_per_step(sft: dict, moe_model: dict, model_cfg: dict) -> float:
    """Measured FLOPs per step of the speedrun's SFT (`sft` = its stage_curve), rescaled to another
    model by the ratio of closed-form FLOPs per token (same data and batches: same tokens per step)."""
    from sputnik.model.accounting import flops_per_token
    from sputnik.model.config import ModelConfig

    if not sft["steps"] or not sft["flops"]:
        raise ValueError("the speedrun's sft stage has no FLOPs on record: rerun it (--force sft)")
    seq = 128  # the ratio barely depends on it at these lengths
    ratio = (flops_per_token(build(ModelConfig, model_cfg), seq)["total"]
             / flops_per_token(build(ModelConfig, moe_model), seq)["total"])
    return sft["flops"] / sft["steps"] * ratio


def compare_settings(cfg: CompareConfig, speedrun: dict, budget: float, spent: dict) -> dict:
    """Settings of the three budgeted runs. budget: moe-sft-grpo's FLOPs; spent: stage name ->
    stage_curve of the stages already run (pretrain, sft, dense_pretrain)."""
    p = Path(cfg.project)
    dense = dense_twin(speedrun["pretrain"]["model"])
    out = {"dense_pretrain": dict(speedrun["pretrain"], out_dir=str(p / "dense_pretrain"), model=dense)}
    for name, model, init, pre in [("dense_sft", dense, p / "dense_pretrain" / "model", "dense_pretrain"),
                                   ("moe_sft", speedrun["sft"]["model"], p / "pretrain" / "model", "pretrain")]:
        left = budget * cfg.budget_multiplier - spent[pre]["flops"]
        per_step = _sft_flops_per_step(spent["sft"], speedrun["sft"]["model"], model)
        steps = max(cfg.eval_points, round(left / per_step))
        every = max(1, steps // cfg.eval_points)
        sft_settings = {k: v for k, v in speedrun["sft"].items() if k != "model"}  # init decides the architecture
        out[name] = dict(sft_settings, out_dir=str(p / name), init=str(init), steps=steps, eval_every=every,
                         checkpoint_every=every)
    return out


# ---------------------------------------------------------------------------------------------
# Curves from the metrics files and the ledger
def stage_curve(out_dir: str | Path, ledger_rows: list[dict] = ()) -> dict:
    """{points: [(flops_so_far, accuracy)], flops: total, steps: last step} of one SFT/pretrain
    stage from its metrics.jsonl, whose rows carry cumulative "flops". Metrics written before
    that field existed fall back to the ledger's FLOPs of the ok runs into out_dir, placed
    proportionally to the step."""
    from sputnik.accounting.report import read_metrics

    rows = read_metrics(str(out_dir))
    steps = max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=0)
    flops = max((r["flops"] for r in rows if isinstance(r.get("flops"), (int, float))), default=0.0)
    if not flops:
        want = str(Path(out_dir).resolve())
        flops = sum(r.get("flops") or 0.0 for r in ledger_rows if r.get("status") == "ok"
                    and str(Path((r.get("config") or {}).get("out_dir") or "/nonexistent").resolve()) == want)
    points = []
    for r in rows:
        if isinstance(r.get("accuracy"), (int, float)) and "loss" not in r:
            f = r.get("flops")
            f = f if isinstance(f, (int, float)) else (flops * r["step"] / steps if steps else 0.0)
            points.append((float(f), float(r["accuracy"])))
    return {"points": sorted(points), "flops": float(flops), "steps": steps}


def _ok_runs(rows: list[dict], command: str, out_dir: str | None = None) -> list[dict]:
    want = str(Path(out_dir).resolve()) if out_dir else None
    return [r for r in rows if r.get("command") == command and r.get("status") == "ok"
            and (want is None or str(Path((r.get("config") or {}).get("out_dir") or "").resolve()) == want)]


def recipe_curves(project: Path, speedrun: dict) -> dict:
    """Accuracy against cumulative training FLOPs for each recipe, from the ledger + metrics."""
    from sputnik.accounting import ledger

    rows = ledger.load(project)
    pre = stage_curve(project / "pretrain", rows)["flops"]
    dense_pre = stage_curve(project / "dense_pretrain", rows)["flops"]
    curves = {}
    d = stage_curve(project / "dense_sft", rows)
    curves["dense-sft"] = [(dense_pre + f, a) for f, a in d["points"]]
    m = stage_curve(project / "moe_sft", rows)
    curves["moe-sft"] = [(pre + f, a) for f, a in m["points"]]
    sft = stage_curve(project / "sft", rows)
    grpo = [(pre + f, a) for f, a in sft["points"]]
    rl = _ok_runs(rows, "rl", speedrun["rl"]["out_dir"])
    if rl and sft["points"]:
        r = rl[-1]
        curve = (r.get("metrics") or {}).get("accuracy_curve") or []
        steps = max((s for s, _ in curve), default=0) or 1
        start = pre + sft["flops"]
        grpo += [(start + (r.get("flops") or 0.0) * s / steps, a) for s, a in curve if s > 0]
    curves["moe-sft-grpo"] = grpo
    student = _ok_runs(rows, "distill-eval")
    if student and grpo:
        # the traces' cost is that of the run that sampled them (a rerun that reuses them records 0)
        sampled = [x for x in _ok_runs(rows, "distill") if x.get("flops")][-1:]
        student_runs = _ok_runs(rows, "distill-sft")[-1:] + _ok_runs(rows, "distill-kd")[-1:]
        extra = sum((x.get("flops") or 0.0) for x in sampled + student_runs)
        acc = (student[-1].get("metrics") or {}).get("heldout_accuracy")
        if acc is not None:
            curves["distilled"] = [(grpo[-1][0] + extra, float(acc))]
    return curves


def compute_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First compute at which the piecewise-linear curve reaches `target` (None: never)."""
    for i, (f, a) in enumerate(curve):
        if a >= target:
            if i == 0:
                return f
            f0, a0 = curve[i - 1]
            return f0 + (f - f0) * (target - a0) / (a - a0) if a > a0 else f
    return None


def summarize(curves: dict, target: float, budget: float) -> dict:
    dense_final = curves.get("dense-sft", [(0.0, math.nan)])[-1][1]
    target = target or dense_final
    base = compute_to_reach(curves.get("dense-sft", []), target)
    rows = {}
    for name in RECIPES:
        c = curves.get(name, [])
        reach = compute_to_reach(c, target)
        rows[name] = {"final_accuracy": c[-1][1] if c else None, "final_flops": c[-1][0] if c else None,
                      "best_accuracy": max((a for _, a in c), default=None), "flops_to_target": reach,
                      "ratio_to_dense": (reach / base) if (reach is not None and base) else None, "points": c}
    return {"target_accuracy": target, "budget_flops": budget, "dense_flops_to_target": base, "recipes": rows}


# ---------------------------------------------------------------------------------------------
def plot(path: Path, curves: dict, target: float, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in RECIPES:
        c = curves.get(name)
        if c:
            ax.plot([f for f, _ in c], [a for _, a in c], marker="o" if len(c) > 1 else "*",
                    markersize=4 if len(c) > 1 else 12, label=name)
    ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target:.2f}")
    ax.axvline(budget, color="grey", ls=":", lw=0.8, label="budget (moe-sft-grpo)")
    ax.set_xlabel("cumulative training FLOPs (pretraining included)")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def markdown(summary: dict) -> str:
    def f(v, spec):
        return "—" if v is None else format(v, spec)

    lines = ["# Recipes at equal compute", "",
             f"Budget B (moe-sft-grpo's training FLOPs): {summary['budget_flops']:.3g}. "
             f"Target accuracy: {summary['target_accuracy']:.3f}.", "",
             "| recipe | final accuracy | best accuracy | FLOPs spent | FLOPs to target | vs dense-sft |",
             "|---|---|---|---|---|---|"]
    for name, r in summary["recipes"].items():
        ratio = r["ratio_to_dense"]
        lines.append(f"| {name} | {f(r['final_accuracy'], '.3f')} | {f(r['best_accuracy'], '.3f')} | "
                     f"{f(r['final_flops'], '.3g')} | {f(r['flops_to_target'], '.3g') if r['flops_to_target'] is not None else 'not reached'} | "
                     f"{f(ratio, '.2f') + '×' if ratio is not None else '—'} |")
    lines += ["", "FLOPs are cumulative training FLOPs including pretraining (the recipes share none of it: "
              "dense-sft pretrains its own base on the same tokens). The distilled student's FLOPs include "
              "its teacher's whole lineage and the trace sampling.", "", "![accuracy vs compute](compare.png)"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
def run(cfg: CompareConfig) -> dict:
    from sputnik import pipeline
    from sputnik.accounting import ledger
    from sputnik.accounting import report
    from sputnik.stages import pretrain, sft

    project = Path(cfg.project)
    sr_cfg = build(pipeline.SpeedrunConfig, dict(project=cfg.project, preset=cfg.preset, tasks=list(cfg.tasks),
                                                 scale=cfg.scale, seed=cfg.seed,
                                                 **{f.name: getattr(cfg, f.name) for f in fields(DeviceConfig)}))
    pipeline.run(sr_cfg)  # finished stages are skipped
    save_config(cfg, project / "compare_config.json")
    speedrun = pipeline.stage_settings(sr_cfg)
    rows = ledger.load(project)
    spent = {name: stage_curve(project / name, rows) for name in ("pretrain", "sft")}
    rl_runs = _ok_runs(rows, "rl", speedrun["rl"]["out_dir"])
    budget = spent["pretrain"]["flops"] + spent["sft"]["flops"] + ((rl_runs[-1].get("flops") or 0.0) if rl_runs else 0.0)
    force = set(COMPARE_STAGES) if "all" in cfg.force else set(cfg.force)
    classes = {"dense_pretrain": (pretrain.Config, pretrain.run), "dense_sft": (sft.Config, sft.run),
               "moe_sft": (sft.Config, sft.run)}
    if "dense_pretrain" in force:
        force.add("dense_sft")  # it fine-tunes that base
    # each budgeted run names the run that produced its init as its parent
    parents = {"dense_pretrain": _done_ids(project / "tokenizer"), "moe_sft": _done_ids(project / "pretrain")}
    for name in COMPARE_STAGES:
        done = project / name / "DONE.json"
        stale = name != "dense_pretrain" and _budget_changed(done, budget)
        if done.is_file() and name not in force and not stale:
            print0(f"compare: {name} already done ({done}); --force {name} reruns it")
            if name == "dense_pretrain":
                parents["dense_sft"] = _done_ids(project / name)
            continue
        if is_rank0() and (name in force or stale):  # from scratch: never resume the old run's checkpoints
            pipeline.set_aside(project, name, why="compare: the budget changed" if stale else f"compare --force {name}")
        spent["dense_pretrain"] = stage_curve(project / "dense_pretrain", ledger.load(project))
        settings = compare_settings(cfg, speedrun, budget, spent)
        cls, fn = classes[name]
        print0(f"\n=== compare stage: {name} ===")
        result = fn(build(cls, settings[name]), parents=parents.get(name, []), command=f"compare:{name.replace('_', '-')}")
        if name == "dense_pretrain":
            parents["dense_sft"] = result["run_ids"]
        atomic_write_json(done, {**result, "budget_flops": budget})
    curves = recipe_curves(project, speedrun)
    summary = summarize(curves, cfg.target_accuracy, budget)
    out = project / "compare"
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "compare.png", curves, summary["target_accuracy"], budget)
    atomic_write_json(out / "compare.json", summary)
    atomic_write_text(out / "compare.md", markdown(summary))
    report.build(project)
    print0("\n" + markdown(summary))
    print0(f"compare: {out / 'compare.md'}")
    return summary


def _done_ids(stage_dir: Path) -> list[str]:
    """The ledger runs of a finished stage (its DONE.json)."""
    done = stage_dir / "DONE.json"
    return json.loads(done.read_text()).get("run_ids", []) if done.is_file() else []


def _budget_changed(done: Path, budget: float) -> bool:
    """A budgeted run finished for another budget B (the speedrun's RL or SFT was rerun since):
    its accuracy-at-B would compare unequal compute."""
    if not done.is_file():
        return False
    was = json.loads(done.read_text()).get("budget_flops")
    return isinstance(was, (int, float)) and abs(was - budget) > 0.01 * budget


def register(sub) -> None:
    p = sub.add_parser("compare", help="dense SFT vs MoE SFT vs MoE SFT+GRPO vs distilled student at equal compute: "
                                       "held-out accuracy against training FLOPs", description=__doc__.split("\n\n")[0])
    add_config_args(p, CompareConfig)
    p.set_defaults(func=lambda args: run(config_from_args(args, CompareConfig)) and 0)
