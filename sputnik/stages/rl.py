"""`sputnik rl`: GRPO with verifiable rewards (DeepSeekMath §4.1; R1 §2), with the Dr. GRPO and
DAPO variants.

One step: sample G completions for each of P prompts with the engine (one prefill per prompt,
forked cache) -> verifier rewards (+ optional user reward, overlong shaping) -> group-normalised
advantages (DAPO dynamic sampling drops zero-variance groups) -> μ inner updates of the clipped
surrogate (+ β·k3 KL to a frozen reference when β > 0) -> metrics, health checks, held-out
evaluation, checkpoint. The pieces: rl/prompts.py, rl/rewards.py, rl/objectives.py, rl/update.py,
rl/health.py; where we depart from the papers is written in rl/update.py. The R1-Zero recipe wraps
the question in R1's template; the R1 recipe uses the chat prompt of the SFT stage. Neither pre-fills
`<think>` (a health check refuses prompts that do).

Under `torchrun --nproc_per_node W` every rank holds the whole model, samples its 1/W of each step's
prompts and sums gradients with the others (distributed.all_reduce_grads); rank 0 writes.

    sputnik rl --init runs/sft/model --tasks addition,subtraction --steps 40
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from sputnik import distributed as dist_lib
from sputnik.common import print0
from sputnik.config import RunConfig, add_config_args, config_from_args, knob
from sputnik.distributed import DistInfo
from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams
from sputnik.rl import objectives
from sputnik.rl.health import HealthConfig, HealthMonitor, HealthStop, prompt_prefills_format
from sputnik.rl.prompts import learnability_shares, render, rollout_seed, sample_prompts, update_task_accuracy
from sputnik.rl.rewards import IsolatedReward, score
from sputnik.rl.rollout import build_rollout_batch
from sputnik.rl.update import VARIANTS, rollout_flops, update, update_flops
from sputnik.train.loading import load_model
from sputnik.train.optim import OptimConfig, lr_multiplier, set_lr
from sputnik.train.session import open_session


@dataclass
class Config(RunConfig):
    out_dir: str = knob("runs/rl", "output directory (checkpoints, metrics.jsonl, final model)")
    checkpoint_every: int = knob(20, "checkpoint every N steps (the last step always)", min=1)
    recipe: Literal["r1", "r1_zero"] = knob("r1", "r1: RL from an SFT checkpoint with the chat prompt; r1_zero: RL from a base model with R1's template")
    tasks: list[str] = knob(default_factory=lambda: ["addition", "subtraction"],
                            help="training tasks: task specs name[:knob=value...] (sputnik tasks list); the held-out "
                                 "evaluation uses the same tasks")
    task_sampling: Literal["round_robin", "learnability"] = knob(
        "round_robin", "how prompts are split over the tasks: round_robin, or learnability (each task's share "
        "∝ p(1−p) of its recent rollout accuracy p, floor 0.05: most prompts where groups disagree)")
    steps: int = knob(40, "RL steps (one rollout batch each)", min=1)
    prompts_per_step: int = knob(8, "prompts per step", min=1)
    group_size: int = knob(8, "G: completions per prompt", min=2)
    max_new_tokens: int = knob(96, "completion length limit", min=1)
    temperature: float = knob(1.0, "rollout temperature (log-probs use the same, as TRL)", min=0.01)
    top_p: float = knob(1.0, "rollout nucleus sampling (1 = off)", min=0.01, max=1.0)
    variant: Literal["grpo", "dr_grpo", "dapo"] = knob("dapo", "objective: grpo (per-sequence mean), dr_grpo, dapo (token mean, clip-higher)")
    eps_low: float = knob(0.2, "clip range below 1", min=0.0)
    eps_high: float = knob(0.28, "clip range above 1 (DAPO clip-higher; = eps_low for plain GRPO)", min=0.0)
    beta: float = knob(0.0, "KL penalty weight to the frozen reference (0 = no reference model in memory)", min=0.0)
    inner_updates: int = knob(1, "μ: optimizer steps on each rollout batch", min=1)
    micro_batch: int = knob(16, "sequences per forward/backward in the update (gradients accumulate)", min=1)
    share_prompts: Literal["auto", "always", "never"] = knob(
        "auto", "update: each prompt goes through forward and backward once for all its completions (same "
        "log-probs and gradients; our DeepSeek-V3 models only). auto: when that removes >= 1/3 of the "
        "update's tokens (long prompts such as R1-Zero's template)")
    dynamic_sampling: bool = knob(True, "DAPO: drop groups whose rewards are all equal (they carry no gradient)")
    overlong_cache: int = knob(0, "DAPO soft overlong punishment window in tokens (0 = off)", min=0)
    tis_cap: float = knob(0.0, "truncated importance sampling cap for sampler/trainer mismatch (0 = off)", min=0.0)
    routing_replay: Literal["off", "measure", "on"] = knob(
        "off", "MoE models: record the experts each rollout token was routed to (eager decoding) and report how "
        "often the update's own routing differs (measure), or replay them in the update's forward (on: R3, "
        "Rollout Routing Replay; also reports the log-prob mismatch without replay, one extra no-grad forward)")
    accuracy_weight: float = knob(1.0, "reward for a correct answer", min=0.0)
    format_weight: float = knob(0.1, "reward for the <think>…</think><answer>…</answer> format", min=0.0)
    reward_fn: str = knob("", "extra reward 'package.module:function(prompt, completion, answer)', run isolated")
    reward_timeout_s: float = knob(2.0, "time limit of one call of reward_fn", min=0.01)
    eval_every: int = knob(10, "held-out greedy accuracy every N steps (0 = only at the end)", min=0)
    eval_examples: int = knob(100, "held-out problems per evaluation", min=1)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant",
                                                                   weight_decay=0.0))
    health: HealthConfig = field(default_factory=HealthConfig)

    def __post_init__(self):
        super().__post_init__()
        if not self.init:
            raise ValueError("init: give the policy to start from (a model directory: sputnik or Hugging Face)")


@dataclass
class RL:
    """What every section of a step reads: the session's pieces plus the RL-only ones."""
    cfg: Config
    s: object  # train.session.Session
    ref_model: torch.nn.Module | None
    engine: Engine
    params: SamplingParams
    tasks: list
    custom: IsolatedReward | None
    monitor: HealthMonitor

    @property
    def info(self) -> DistInfo:
        return self.s.dist


# ---------------------------------------------------------------------------------------------
# The sections of a step
def rollout(rl: RL, step: int, task_acc: dict):
    """This rank's share of the step's prompts (whole groups), G samples each -> (examples,
    rendered prompts, completions flat in group order)."""
    cfg, tok, W = rl.cfg, rl.s.tokenizer, rl.info.world_size
    shares = learnability_shares(task_acc, [t.name for t in rl.tasks]) if cfg.task_sampling == "learnability" else None
    examples = sample_prompts(rl.tasks, step, cfg.prompts_per_step, cfg.seed, shares)
    per_rank = cfg.prompts_per_step // W
    examples = examples[rl.info.rank * per_rank: (rl.info.rank + 1) * per_rank]
    prompts = [render(tok, ex.prompt, cfg.recipe) for ex in examples]
    rl.params.seed = rollout_seed(cfg.seed, step, rl.info.rank)
    groups = rl.engine.generate(prompts, rl.params, num_samples=cfg.group_size,
                                record_routing=cfg.routing_replay != "off")
    return examples, prompts, [c for g in groups for c in g]


def advantages(rewards: list[float], num_prompts: int, cfg: Config):
    """Group-normalised advantages of this rank's groups -> (adv [B], kept groups [P], kept rows [B])."""
    r_PG = torch.tensor(rewards).view(num_prompts, cfg.group_size)
    adv = objectives.group_advantages(r_PG, cfg.group_size, scale_by_std=VARIANTS[cfg.variant]["scale_by_std"])
    keep_groups = objectives.dynamic_sampling_mask(r_PG, cfg.group_size)
    keep = keep_groups.repeat_interleave(cfg.group_size) if cfg.dynamic_sampling else torch.ones(len(rewards), dtype=torch.bool)
    return adv.reshape(-1), keep_groups, keep


def policy_update(rl: RL, step: int, prompts, completions, adv_B, keep, kept_globally: int, run) -> dict:
    """The update on the kept rows of every rank; {} when every rank's groups were dropped (no update,
    so no update metrics: absent, not 0)."""
    if not kept_globally:
        return {}
    cfg, s = rl.cfg, rl.s
    batch = None
    if keep.any():
        rows = keep.nonzero()[:, 0].tolist()
        routing = [completions[i].routing for i in rows] if cfg.routing_replay != "off" else None
        batch = build_rollout_batch([prompts[i // cfg.group_size] for i in rows], [completions[i].token_ids for i in rows],
                                    [completions[i].logprobs for i in rows], s.tokenizer.pad_id, routing).to(s.device)
    set_lr(s.optimizer, lr_multiplier(step, cfg.steps, cfg.optim))
    m = update(s.raw, rl.ref_model, s.optimizer, batch, adv_B[keep].to(s.device), cfg, s.choice,
               vocab_limit=rl.engine.vocab_limit, info=rl.info, poison=step in cfg.poison_steps)
    flops, tokens = (0.0, 0) if batch is None else (update_flops(s.raw, batch, cfg), batch.input_ids_BT.numel())
    flops, tokens = dist_lib.all_reduce_sum([flops, tokens], rl.info, s.device)
    run.add(flops=flops, tokens=int(tokens))
    return m


def step_record(step: int, g: dict, m: dict, t_update: float, task_acc: dict) -> dict:
    """The metrics line of a step, from the gathered per-completion lists and the update's metrics."""
    rewards, lengths, n = g["rewards"], g["length"], len(g["length"])
    rec = dict(step=step + 1, reward_mean=sum(rewards) / len(rewards),
               reward_std=float(torch.tensor(rewards).std()) if len(rewards) > 1 else 0.0,
               accuracy=sum(g["correct"]) / n, format_rate=sum(g["formatted"]) / n,
               parse_failure_frac=sum(g["unparsed"]) / n, truncated_frac=sum(g["truncated"]) / n,
               zero_variance_frac=1.0 - sum(g["keep_groups"]) / len(g["keep_groups"]),
               length_mean=sum(lengths) / n, length_max=max(lengths), kept_sequences=g["kept"],
               time_rollout=g["time_rollout"], time_reward=g["time_reward"], time_update=t_update,
               tokens_per_s=sum(lengths) / max(g["time_rollout"], 1e-9), reward_failures=g["reward_failures"],
               task_accuracy=dict(task_acc), **m)
    return rec


def heldout_accuracy(rl: RL) -> tuple[float, dict]:
    """Greedy accuracy on the held-out problems, and per task ({task: {"accuracy", "n"}}); under
    torchrun each rank decodes every W-th one."""
    from sputnik.evaluate import greedy_eval
    from sputnik.metrics import by_task

    cfg, info, tok = rl.cfg, rl.info, rl.s.tokenizer
    res = greedy_eval(rl.engine, tok, rl.tasks, cfg.eval_examples, cfg.seed, cfg.max_new_tokens,
                      render=lambda p: render(tok, p, cfg.recipe), shard=(info.rank, info.world_size))
    n_local = len(range(info.rank, cfg.eval_examples, info.world_size))
    hits, n, *tally = dist_lib.all_reduce_sum([res["accuracy"] * n_local, n_local, *res["tally"]], info, rl.s.device)
    return round(hits) / n, by_task([t.name for t in rl.tasks], tally)


def gather_step(info: DistInfo, **local) -> dict:
    """Each per-completion list in `local` concatenated over ranks (rank order = prompt order), each
    count summed, each `time_*` the slowest rank's (the step waits for it); what every rank needs for
    identical metrics and health decisions."""
    parts = dist_lib.all_gather_object(local, info)
    return {k: ([x for p in parts for x in p[k]] if isinstance(v, list) else
                (max(p[k] for p in parts) if k.startswith("time_") else sum(p[k] for p in parts)))
            for k, v in local.items()}


# ---------------------------------------------------------------------------------------------
def prepare(cfg: Config, s) -> RL:
    """The RL-only pieces, checked before anything is written: tasks, template, reference model,
    engine, user reward, health monitor."""
    from sputnik.tasks import parse_tasks

    if cfg.prompts_per_step % s.dist.world_size:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the number of ranks "
                         f"({s.dist.world_size}): each rank samples whole groups")
    tasks = parse_tasks(cfg.tasks)
    bad = prompt_prefills_format(s.tokenizer.decode(render(s.tokenizer, "2+2", cfg.recipe)))
    if bad:
        raise ValueError(f"the prompt template pre-fills {bad!r}: the policy would get format reward for free")
    if cfg.routing_replay != "off":
        from sputnik.model.routing_replay import routed_layers

        if not routed_layers(s.raw):
            raise ValueError(f"routing_replay={cfg.routing_replay}: the model ({type(s.raw).__name__}) has no routed "
                             "MoE layers (DeepSeek-V3/V2 or Qwen3-MoE); set --routing_replay off")
    ref_model = None
    if cfg.beta > 0:  # β = 0 drops the reference model and its memory
        ref_model = load_model(cfg.init, None, cfg.init_impl).to(s.device).eval().requires_grad_(False)
    s.raw.train()
    engine = Engine(s.raw, s.tokenizer, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop_token_ids=s.tokenizer.stop_ids)
    custom = IsolatedReward(cfg.reward_fn, cfg.reward_timeout_s) if cfg.reward_fn else None
    return RL(cfg, s, ref_model, engine, params, tasks, custom, HealthMonitor(cfg.health))


def run(cfg: Config, parents=(), command: str = "rl") -> dict:
    """RL from cfg.init; returns the accuracy before and after, the curve, the model directory and
    this run's id. `parents`: the ledger runs that produced init; `command`: the run's name in the
    ledger (a study's arms name theirs)."""
    with open_session(cfg, model_cfg=None, optim=cfg.optim, compile_blocks=True) as s:
        rl = prepare(cfg, s)
        dist_lib.check_replicas(s.raw, s.dist, "rl start")
        state = {**s.new_loop_state(), "acc_history": [], "task_accuracy": {}, "heldout_by_task": {}, **s.loop_state}
        acc_history, task_acc = state["acc_history"], state["task_accuracy"]
        try:
            with s.recording(command, parents) as run:
                t_start = time.perf_counter()
                if not acc_history:
                    acc, state["heldout_by_task"] = heldout_accuracy(rl)
                    acc_history.append((0, acc))
                    s.log({"step": 0, "heldout_accuracy": acc_history[-1][1]})
                    print0(f"rl: held-out accuracy before RL {acc_history[-1][1]:.3f}")
                for step in range(s.start_step, cfg.steps):
                    # --- rollout: one prefill per prompt, G forked samples each ------------------
                    t0 = time.perf_counter()
                    examples, prompts, flat = rollout(rl, step, task_acc)
                    t_roll = time.perf_counter() - t0
                    sampled, = dist_lib.all_reduce_sum([rollout_flops(s.raw, prompts, flat)], rl.info, s.device)
                    run.add(flops=sampled)
                    flat_ex = [ex for ex in examples for _ in range(cfg.group_size)]
                    # --- reward ------------------------------------------------------------------
                    t1 = time.perf_counter()
                    rewards, verdicts = score(cfg, {t.name: t for t in rl.tasks}, flat_ex, flat, rl.custom)
                    t_rew = time.perf_counter() - t1
                    # --- advantages (+ DAPO dynamic sampling): groups are whole on each rank -------
                    adv_B, keep_groups, keep = advantages(rewards, len(examples), cfg)
                    g = gather_step(rl.info, rewards=rewards, task=[ex.task for ex in flat_ex],
                                    correct=[bool(v.correct) for v in verdicts],
                                    formatted=[bool(v.well_formatted) for v in verdicts],
                                    unparsed=[v.extracted is None for v in verdicts],
                                    truncated=[c.finish_reason == "length" for c in flat],
                                    length=[len(c.token_ids) for c in flat], keep_groups=keep_groups.tolist(),
                                    kept=int(keep.sum()), time_rollout=t_roll, time_reward=t_rew,
                                    reward_failures=rl.custom.failures.total() if rl.custom else 0)
                    update_task_accuracy(task_acc, g["task"], g["correct"])
                    # --- update --------------------------------------------------------------------
                    t2 = time.perf_counter()
                    m = policy_update(rl, step, prompts, flat, adv_B, keep, g["kept"], run)
                    if m:  # a skipped (non-finite) update counts towards the streak that stops the run
                        s.nonfinite_guard(state, not m["skipped"], step + 1, m["loss"], m["grad_norm"], "rl")
                    rec = step_record(step, g, m, time.perf_counter() - t2, task_acc)
                    # --- log, health checks, held-out evaluation (the same on every rank) -----------
                    log_step(rl, rec, step, acc_history, flat, t_start)
                    state["heldout_by_task"] = rec.get("heldout_by_task", state["heldout_by_task"])
                    # --- checkpoint ----------------------------------------------------------------
                    if ((step + 1) % cfg.checkpoint_every == 0 and not state["nonfinite_streak"]) or step + 1 == cfg.steps:
                        dist_lib.check_replicas(s.raw, s.dist, f"rl step {step + 1}")
                        s.save_checkpoint(step + 1, state, run)
                return finish(rl, run, acc_history, state["heldout_by_task"])
        finally:
            if rl.custom is not None:
                rl.custom.close()


def log_step(rl: RL, rec: dict, step: int, acc_history: list, flat, t_start: float) -> None:
    """Held-out accuracy when due, health checks (a stop raises HealthStop), the metrics line and the
    console line."""
    cfg = rl.cfg
    if step < 3 or (step + 1) % 10 == 0:
        rec["sample"] = flat[0].text[:300]
    warnings = rl.monitor.observe_step(rec)
    if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
        acc, rec["heldout_by_task"] = heldout_accuracy(rl)
        acc_history.append((step + 1, acc))
        rec["heldout_accuracy"] = acc
        warnings += rl.monitor.observe_eval(rec["reward_mean"], acc)
    rec["warnings"] = warnings
    rec["elapsed_s"] = time.perf_counter() - t_start  # this session's wall time, evaluations included
    rl.s.log(rec)
    update = (f"kl {rec['kl']:.4f} ent {rec['entropy']:.3f}" if "loss" in rec else "no update (every group dropped)")
    print0(f"rl step {step + 1}/{cfg.steps} reward {rec['reward_mean']:.3f} acc {rec['accuracy']:.3f} "
           f"fmt {rec['format_rate']:.2f} len {rec['length_mean']:.0f} {update} roll {rec['time_rollout']:.1f}s "
           f"upd {rec['time_update']:.1f}s" + (f" heldout {rec['heldout_accuracy']:.3f}" if "heldout_accuracy" in rec else ""))
    for w in warnings:
        print0(f"rl: WARNING {w}")
    if warnings and cfg.health.stop_on_pathology:
        raise HealthStop(f"stopped by a health check at step {step + 1}: {warnings[0]}")


def finish(rl: RL, run, acc_history: list, heldout_by_task: dict) -> dict:
    """Export the model (rank 0), fill the ledger entry -> the stage's result."""
    from sputnik.train.session import export_model

    s = rl.s
    final_dir = s.out / "model"
    if s.rank0:
        export_model(s.raw, s.out, s.tokenizer, rl.cfg)
    dist_lib.barrier(s.dist)
    run.artifacts.append(str(final_dir))
    run.metrics.update(heldout_accuracy_before=acc_history[0][1], heldout_accuracy=acc_history[-1][1],
                       accuracy_curve=acc_history, heldout_by_task=heldout_by_task)
    return dict(model_dir=str(final_dir), accuracy_before=acc_history[0][1], accuracy_after=acc_history[-1][1],
                accuracy_curve=acc_history, run_ids=[run.run_id])


def register(sub) -> None:
    p = sub.add_parser("rl", help="GRPO / Dr. GRPO / DAPO with verifiable rewards (R1 and R1-Zero recipes)",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, Config)
    p.set_defaults(func=lambda args: run(config_from_args(args, Config)) and 0)
