"""`sputnik speedrun`: the whole DeepSeek recipe, small, in one command.

    tokenizer -> pretrain (MoE base) -> SFT (cold start on step-by-step traces) -> GRPO
              -> distil into a smaller student (rejection-sampled teacher traces) -> evaluate both
              -> report card (markdown + plots) built from the ledger

Each stage writes `<project>/<stage>/DONE.json` (atomically) when it finishes; a rerun skips
finished stages unless `--force STAGE,...` (which reruns that stage and the ones after it from
scratch, the old output moved aside), and a killed run continues from the stage it reached,
from that stage's last checkpoint (every stage runs with resume=auto). Every stage records itself
in `<project>/ledger.jsonl`; the final evaluation names the runs that produced the student as its
parents, so the ledger separates the final model's cost from everything spent.

Presets (functions returning the stage settings; `--preset`):
- cpu  : the 2-core laptop default, ≤ 15 minutes end to end.
- gpu  : one GPU; bigger model (small-ish MoE), more steps, bf16 autocast.
- gpus : the gpu preset's settings with 4x the batch, for several GPUs. The speedrun itself runs in
         one process; run its data-parallel stages under torchrun yourself, e.g.
         `torchrun --nproc_per_node 8 -m sputnik pretrain --config ...` (DDP/FSDP2), then
         `sputnik speedrun --preset gpus` skips the finished stages. Under torchrun the speedrun
         refuses to start (RL and distillation are single-process for now).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sputnik.common import atomic_write_json, is_rank0, print0
from sputnik.config import DeviceConfig, add_config_args, build, config_from_args, knob, save_config

STAGES = ["tokenizer", "pretrain", "sft", "rl", "distill", "report"]
# The base reads 1-4 digit addition and subtraction only; the recipe after it adds a task the base has
# never read, a 2-3 digit number times a digit worked digit by digit (the cold_start and distill_vs_rl
# studies' task, which start from this base): SFT alone solves the first two (0.95 held-out), so the
# third is where the recipe's stages have something left to do.
PRETRAIN_TASKS = ["addition", "subtraction"]
SPEEDRUN_TASKS = ["addition", "subtraction", "@long_multiplication"]


@dataclass
class SpeedrunConfig(DeviceConfig):
    """The recipe's own knobs; device, threads and the compile / CUDA-graph / kernel switches
    (DeviceConfig) go to every stage."""
    project: str = knob("runs/speedrun", "project directory: one sub-directory per stage, ledger.jsonl, report/")
    preset: Literal["cpu", "gpu", "gpus"] = knob("cpu", "cpu (laptop, ≤ 15 min), gpu (one GPU), gpus (several GPUs: run pretrain/sft under torchrun first)")
    tasks: list[str] = knob(default_factory=lambda: list(SPEEDRUN_TASKS), help="tasks for SFT, RL and distillation")
    pretrain_tasks: list[str] = knob(default_factory=lambda: list(PRETRAIN_TASKS),
                                     help="tasks whose worked problems are the base's pretraining text")
    force: list[str] = knob(default_factory=list, help=f"stages to rerun from scratch, with every stage after them "
                                   f"({', '.join(STAGES)}; 'all')")
    scale: float = knob(1.0, "multiply every stage's step count (0.1 = a quick smoke run)", min=0.01, max=100.0)
    seed: int = knob(0, "seed of every stage", min=0)


# ---------------------------------------------------------------------------------------------
# Presets: the settings of each stage, as plain dicts validated by the stages' own Configs
def _teacher_model(preset: str) -> dict:
    if preset == "cpu":  # sized so the whole recipe fits the 15-minute budget on 2 cores (LOG.md)
        return dict(vocab_size=640, hidden_size=128, num_hidden_layers=4, first_k_dense_replace=1,
                    intermediate_size=384, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
                    n_shared_experts=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
                    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_nextn_predict_layers=1,
                    max_position_embeddings=384)
    return dict(vocab_size=4096, hidden_size=768, num_hidden_layers=8, first_k_dense_replace=1, intermediate_size=2048,
                moe_intermediate_size=256, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
                num_attention_heads=12, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=48, qk_rope_head_dim=16,
                v_head_dim=48, num_nextn_predict_layers=1, max_position_embeddings=1024)


def _student_model(preset: str) -> dict:
    """≤ 1/4 of the teacher's active parameters (cpu: 157k vs 664k = 0.24)."""
    if preset == "cpu":
        return dict(vocab_size=640, hidden_size=64, num_hidden_layers=2, first_k_dense_replace=1,
                    intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                    n_shared_experts=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=16, num_nextn_predict_layers=0, max_position_embeddings=384)
    return dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=768,
                moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1,
                num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                v_head_dim=32, num_nextn_predict_layers=0, max_position_embeddings=1024)


def stage_settings(cfg: SpeedrunConfig) -> dict[str, dict]:
    """Every stage's settings, built the same way: what every run has (the same keys for every stage:
    out_dir, project_dir, init, tokenizer, seed, device, ...), then the stage's own knobs. Why each
    number is what it is: LOG.md."""
    gpu = cfg.preset != "cpu"
    s = lambda n: max(1, round(n * cfg.scale * (4 if gpu else 1)))  # noqa: E731 - steps scale with the preset
    per_gpu = 4 if cfg.preset == "gpus" else 1
    p = Path(cfg.project)
    tok = str(p / "tokenizer")

    device = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DeviceConfig)}

    def run(stage: str, init: str = "", **own) -> dict:
        return dict(out_dir=str(p / stage), project_dir=str(p), init=init, tokenizer=tok if stage != "distill" else "",
                    seed=cfg.seed, resume="auto", **device, **own)

    return {
        "tokenizer": dict(out_dir=tok, project_dir=str(p), vocab_size=_teacher_model(cfg.preset)["vocab_size"],
                          num_examples=3000, tasks=["addition", "subtraction", "multiplication", "word_problems"],
                          seed=cfg.seed),
        "pretrain": run("pretrain", model=_teacher_model(cfg.preset), tasks=list(cfg.pretrain_tasks), task_docs=20000,
                        seq_len=128, batch_size=16 if not gpu else 64 * per_gpu, steps=s(1200), eval_every=s(300),
                        eval_batches=4, checkpoint_every=s(300), log_every=50, optim=dict(lr=3e-3, warmup_steps=20)),
        "sft": run("sft", init=str(p / "pretrain" / "model"), model=_teacher_model(cfg.preset), tasks=list(cfg.tasks),
                   num_examples=16000, max_len=192, batch_size=16 if not gpu else 64, steps=s(2700), eval_every=s(900),
                   eval_examples=100, checkpoint_every=s(500), log_every=50, max_new_tokens=120,
                   optim=dict(lr=2e-3, warmup_steps=10)),
        "rl": run("rl", init=str(p / "sft" / "model"), tasks=list(cfg.tasks), steps=s(30), prompts_per_step=64,
                  group_size=8, max_new_tokens=120, eval_every=s(10), eval_examples=100, checkpoint_every=s(10),
                  optim=dict(lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0)),
        "distill": run("distill", teacher=str(p / "rl" / "model"), student=_student_model(cfg.preset),
                       tasks=list(cfg.tasks), num_prompts=s(4000), samples_per_prompt=2, max_new_tokens=120,
                       steps=s(8000), batch_size=16, max_len=192, eval_examples=100, checkpoint_every=s(4000),
                       optim=dict(lr=2e-3, warmup_steps=20)),
    }


# ---------------------------------------------------------------------------------------------
def _done_path(project: Path, stage: str) -> Path:
    return project / stage / "DONE.json"


def rerun_from(force: set[str]) -> list[str]:
    """The stages a --force reruns: the forced ones and every stage after the first of them, since
    each stage consumes the output of the one before (a new RL model needs new distillation)."""
    hits = [i for i, s in enumerate(STAGES) if s in force and s != "report"]
    return [s for s in STAGES[min(hits):] if s != "report"] if hits else []


def set_aside(project: Path, stage: str, why: str) -> Path | None:
    """Move a stage's old output to `<stage>.superseded-<n>` before it reruns. Kept, not deleted
    (its ledger records still point at it); moved, because every stage resumes from the last
    checkpoint in its directory and would otherwise continue the old run instead of starting anew."""
    src = project / stage
    if not src.exists():
        return None
    n = 1
    while (project / f"{stage}.superseded-{n}").exists():
        n += 1
    dst = project / f"{stage}.superseded-{n}"
    src.rename(dst)
    print0(f"{why}: {stage}'s previous output moved to {dst}")
    return dst


def run(cfg: SpeedrunConfig, until: str = "report") -> dict:
    """The stages in order up to and including `until` (the studies stop at "pretrain": they share
    the speedrun's tokenizer and base model)."""
    from sputnik.accounting import report
    from sputnik.stages import distill, pretrain, rl, sft, tokenizer

    from sputnik.common import world_size

    if world_size() > 1:
        raise ValueError("sputnik speedrun runs in one process: launch its pretrain/sft stages with torchrun "
                         "(see `sputnik speedrun --help`), then rerun the speedrun to continue from them")
    project = Path(cfg.project)
    project.mkdir(parents=True, exist_ok=True)
    save_config(cfg, project / "speedrun_config.json")
    settings = stage_settings(cfg)
    force = set(STAGES) if "all" in cfg.force else set(cfg.force)
    unknown = force - set(STAGES)
    if unknown:
        raise ValueError(f"force={sorted(unknown)}: allowed {', '.join(STAGES)}, all")
    stages = {
        "tokenizer": (tokenizer.Config, tokenizer.run),
        "pretrain": (pretrain.Config, pretrain.run),
        "sft": (sft.Config, sft.run),
        "rl": (rl.Config, rl.run),
        "distill": (distill.Config, distill.run),
    }
    # Validate every stage's settings before any work: a typo fails now, not after 10 minutes.
    configs = {name: build(cls, settings[name]) for name, (cls, _) in stages.items()}
    rerun = rerun_from(force)
    for name in rerun:  # from scratch: never resume the old run's checkpoints
        set_aside(project, name, why=f"speedrun --force {','.join(sorted(force))}")
    results, t0, parents = {}, time.time(), []
    if until not in STAGES:
        raise ValueError(f"until={until!r}: allowed {', '.join(STAGES)}")
    for name, (_, fn) in stages.items():
        if STAGES.index(name) > STAGES.index(until):
            break
        done = _done_path(project, name)
        if done.is_file() and name not in rerun:
            results[name] = json.loads(done.read_text())
            print0(f"speedrun: {name} already done ({done}); --force {name} reruns it and the stages after it")
        else:
            print0(f"\n=== speedrun stage: {name} ({time.time() - t0:.0f}s elapsed) ===")
            # Each stage's runs name the previous stage's as parents; the distilled student is the final
            # model, so the ledger's final lineage is the whole chain.
            extra = dict(final_model=True) if name == "distill" else {}
            results[name] = fn(configs[name], parents=parents, **extra)
            if is_rank0():
                atomic_write_json(done, results[name])
        parents = results[name].get("run_ids", [])
    if until != "report":
        return results
    path = report.build(project) if is_rank0() else None
    summary = dict(report=str(path), wall_s=time.time() - t0, **{k: v for k, v in results.items()})
    print0(f"\nspeedrun done in {summary['wall_s']:.0f}s; report card: {path}")
    return summary


def register(sub) -> None:
    p = sub.add_parser("speedrun", help="the whole recipe: tokenizer, MoE pretraining, CoT SFT, GRPO, distillation, "
                                        "evaluation and the report card", description=__doc__.split("\n\n")[0])
    add_config_args(p, SpeedrunConfig)
    p.set_defaults(func=lambda args: run(config_from_args(args, SpeedrunConfig)) and 0)
