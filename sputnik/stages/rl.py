"""`sputnik rl`: GRPO with verifiable rewards (DeepSeekMath §4.1; R1 §2), with the Dr. GRPO and
DAPO variants.

One step: sample G completions for each of P prompts with the engine (one prefill per prompt,
forked cache) -> verifier rewards (+ optional user reward, overlong shaping) -> group-normalised
advantages (DAPO dynamic sampling drops zero-variance groups) -> μ inner updates of the clipped
surrogate (+ β·k3 KL to a frozen reference when β > 0).

Where we depart from the papers, on purpose:
- old log-probs: the first inner update's forward is π_old exactly, so ratios start at 1 with no
  extra forward pass; the engine's log-probs are compared against it every step and the
  mismatch (sampler vs trainer) is reported; with `tis_cap` > 0 the loss is re-weighted by the
  truncated importance ratio π_train/π_sampler (TIS), as needed when sampling in bf16.
- the R1-Zero recipe wraps the question in R1's template; the R1 recipe uses the chat prompt of
  the SFT stage. Neither pre-fills `<think>` (a health check refuses prompts that do).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sputnik.train import checkpoint as ckpt
from sputnik import distributed as dist_lib
from sputnik.rl import objectives as rl_losses
from sputnik.common import append_jsonl, autocast, pick_device, print0, seed_everything, set_threads
from sputnik.config import add_config_args, config_from_args, knob, save_config
from sputnik.distributed import DistInfo
from sputnik.inference.engine import Engine, SamplingParams
from sputnik.rl.shared_prompts import supports_shared_prompts
from sputnik.train.optim import OptimConfig, build_optimizer, clip_grad_norm, guarded_step, lr_multiplier, set_lr
from sputnik.train.progress import trim_metrics
from sputnik.rl.rewards import IsolatedReward, RewardWeights, verifier_rewards
from sputnik.rl.health import HealthConfig, HealthMonitor, prompt_prefills_format
from sputnik.rl.rollout import build_rollout_batch, logprobs, micro_batches, shares_prompts

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}"
)

# variant -> (advantage scaled by group std, loss aggregation, dynamic sampling default)
VARIANTS = {
    "grpo": dict(scale_by_std=True, aggregate="sequence"),  # DeepSeekMath: per-sequence mean
    "dr_grpo": dict(scale_by_std=False, aggregate="constant"),  # Liu et al. 2025: no std, no 1/|o|
    "dapo": dict(scale_by_std=True, aggregate="token"),  # Yu et al. 2025: token-level mean
}


@dataclass
class RLConfig:
    init: str = knob("", "policy to start from: a sputnik model directory (SFT or base output) or a local HF causal LM dir")
    out_dir: str = knob("runs/rl", "output directory (checkpoints, metrics.jsonl, final model)")
    ledger_dir: str = knob("runs", "project directory whose ledger.jsonl records this run")
    recipe: Literal["r1", "r1_zero"] = knob("r1", "r1: RL from an SFT checkpoint with the chat prompt; r1_zero: RL from a base model with R1's template")
    tasks: list[str] = knob(default_factory=lambda: ["addition", "subtraction"], help="training tasks (sputnik tasks list)")
    task_args: list[str] = knob(default_factory=list, help="task knobs as key=value, given to every task "
                                "(e.g. max_digits=2); the held-out evaluation uses the same tasks")
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
        "update's tokens (long prompts: R1-Zero's template, ~235 tokens, made an update 3.3x faster)")
    compile: bool = knob(False, "for long runs: torch.compile each transformer block (the update's forward and "
                         "backward) and the engine's decode step (CPU, bench_grpo_step: rollouts ~25% and updates "
                         "2-10% faster, after ~25 s plus 12-20 s a batch bucket of compiling, cached on disk)")
    dynamic_sampling: bool = knob(True, "DAPO: drop groups whose rewards are all equal (they carry no gradient)")
    overlong_cache: int = knob(0, "DAPO soft overlong punishment window in tokens (0 = off)", min=0)
    tis_cap: float = knob(0.0, "truncated importance sampling cap for sampler/trainer mismatch (0 = off)", min=0.0)
    accuracy_weight: float = knob(1.0, "reward for a correct answer", min=0.0)
    format_weight: float = knob(0.1, "reward for the <think>…</think><answer>…</answer> format", min=0.0)
    reward_fn: str = knob("", "extra reward 'package.module:function(prompt, completion, answer)', run isolated")
    reward_timeout_s: float = knob(2.0, "time limit of one call of reward_fn", min=0.01)
    eval_every: int = knob(10, "held-out greedy accuracy every N steps (0 = only at the end)", min=0)
    eval_examples: int = knob(100, "held-out problems per evaluation", min=1)
    checkpoint_every: int = knob(20, "checkpoint every N steps", min=1)
    keep_last: int = knob(2, "checkpoints kept", min=1)
    resume: str = knob("", "'' fresh, 'auto' latest if any, 'latest', or a checkpoint dir")
    seed: int = knob(0, "seed for prompts, sampling and init")
    device: str = knob("auto", "auto, cpu, cuda or mps")
    num_threads: int = knob(0, "CPU threads (0 = all available cores)", min=0)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant",
                                                                   weight_decay=0.0))
    health: HealthConfig = field(default_factory=HealthConfig)


# ---------------------------------------------------------------------------------------------
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
    return [task.generate(1, split="train", seed=rng.randrange(2**31))[0] for task in order]


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


def task_knobs(task_args: list[str]) -> dict[str, str]:
    """['max_digits=2', ...] -> {'max_digits': '2'}; the task's own config validates the values."""
    knobs = {}
    for kv in task_args:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValueError(f"task_args: {kv!r} is not key=value")
        knobs[k] = v
    return knobs


def render(tokenizer, prompt: str, recipe: str) -> list[int]:
    return tokenizer.render_prompt(R1_ZERO_TEMPLATE.format(prompt=prompt) if recipe == "r1_zero" else prompt)


def aggregate_fn(cfg: RLConfig):
    kind = VARIANTS[cfg.variant]["aggregate"]
    if kind == "sequence":
        return rl_losses.sequence_mean
    if kind == "token":
        return rl_losses.token_mean
    return lambda loss_BT, mask_BT: rl_losses.constant_norm(loss_BT, mask_BT, cfg.max_new_tokens)


def score(cfg, tasks_by_name, examples, completions, custom):
    weights = RewardWeights(accuracy=cfg.accuracy_weight, format=cfg.format_weight)
    texts = [c.text for c in completions]
    rewards, verdicts = verifier_rewards(lambda ex, c: tasks_by_name[ex.task].verify(ex, c), examples, texts, weights)
    if custom is not None:
        extra = custom([{"prompt": ex.prompt, "completion": t, "answer": ex.answer} for ex, t in zip(examples, texts)])
        rewards = [r + e for r, e in zip(rewards, extra)]
    if cfg.overlong_cache:
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        pen = rl_losses.soft_overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_cache)
        rewards = [r + float(p) for r, p in zip(rewards, pen)]
    return rewards, verdicts


def compile_blocks(model) -> None:
    """torch.compile each transformer block in place (state-dict keys and the model's other methods
    unchanged). Blocks rather than the whole model: the update reaches them through hidden_states, not
    forward, and the variable trimmed lengths of micro-batches make one shape-polymorphic graph per block."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"compile: {type(model).__name__} has no model.layers to compile; run without --compile")
    for block in layers:
        block.compile()


def update(model, ref_model, optimizer, batch, adv_B, cfg, dc, aggregate, vocab_limit=None, info=DistInfo()):
    """μ optimizer steps on one rollout batch: this rank's kept rows (None when it kept none; under
    torchrun the ranks' losses are normalised by the counts of all ranks and their gradients summed,
    so the step is the one a single process would take on all rows). Returns metrics of the last
    inner step, summed over ranks. `vocab_limit`: the tokenizer's vocabulary size, the rows of the
    head the engine samples from."""
    rows_local = 0 if batch is None else batch.input_ids_BT.shape[0]
    tokens_local = 0.0 if batch is None else float(batch.completion_mask_BT.sum())
    B, num_tokens = dist_lib.all_reduce_sum([rows_local, tokens_local], info, dc.device)
    token_level = VARIANTS[cfg.variant]["aggregate"] == "token"
    agg = (lambda l, m: rl_losses.token_mean(l, m, num_tokens_global=num_tokens)) if token_level else aggregate
    shared = batch is not None and shares_prompts(model, batch, cfg.share_prompts)
    parts = [] if batch is None else micro_batches(batch, adv_B, cfg.micro_batch, keep_prompts_together=shared)
    old_logps, metrics = [None] * len(parts), {}
    for inner in range(cfg.inner_updates):
        tot = dict(loss=0.0, clip_frac=0.0, kl=0.0, entropy=0.0, mismatch=0.0)
        for i, (mb, mb_adv_B) in enumerate(parts):
            mask_BT = mb.completion_mask_BT
            with autocast(dc):
                logp_BT, ent_BT = logprobs(model, mb, cfg.temperature, vocab_limit, shared)
                # π_old: the first inner step's own forward (ratios start at exactly 1, no extra pass)
                old = logp_BT.detach() if old_logps[i] is None else old_logps[i]
                ref = None
                if ref_model is not None:
                    with torch.no_grad():
                        ref, _ = logprobs(ref_model, mb, cfg.temperature, vocab_limit,
                                          shared and supports_shared_prompts(ref_model))
                is_w = rl_losses.truncated_importance_weights(old, mb.sampler_logp_BT, cfg.tis_cap) if cfg.tis_cap else None
                loss, m = rl_losses.grpo_loss(logp_BT, old, mb_adv_B, mask_BT, eps_low=cfg.eps_low,
                                              eps_high=cfg.eps_high, beta=cfg.beta, ref_logp_BT=ref, aggregate=agg,
                                              is_weights_BT=is_w)
                if not token_level:
                    loss = loss * mask_BT.shape[0] / B  # per-micro-batch means -> a mean over the batch
            loss.backward()
            if old_logps[i] is None:
                old_logps[i] = logp_BT.detach()
                tot["mismatch"] += float(((logp_BT.detach() - mb.sampler_logp_BT).abs() * mask_BT).sum())
            w = float(mask_BT.sum()) / max(num_tokens, 1.0)
            tot["loss"] += float(loss.detach())
            tot["clip_frac"] += float(m["clip_frac"]) * w
            tot["kl"] += float(m.get("kl", 0.0)) * w  # only computed when β > 0
            tot["entropy"] += float((ent_BT.detach() * mask_BT).sum()) / max(num_tokens, 1.0)
        dist_lib.all_reduce_grads(model, info)
        tot = dict(zip(tot, dist_lib.all_reduce_sum(list(tot.values()), info, dc.device)))
        if inner == 0:
            metrics["logp_mismatch"] = tot["mismatch"] / max(num_tokens, 1.0)
        grad_norm = clip_grad_norm(model, cfg.optim.grad_clip)
        stepped = guarded_step(optimizer, tot["loss"], grad_norm)
        if stepped:
            model.update_expert_bias()  # a collective under torchrun: every rank takes the same decision
        metrics.update(loss=tot["loss"], clip_frac=tot["clip_frac"], kl=tot["kl"], entropy=tot["entropy"],
                       grad_norm=grad_norm, skipped=int(not stepped), shared_prompts=int(shared))
    return metrics


def rl_step_flops(model, batch, cfg: RLConfig) -> float:
    """FLOPs of one RL step: rollout forward (prefill + decode, 1/3 of a training token's cost per
    token), μ training passes over the kept sequences, and the reference forward when β > 0."""
    from sputnik.train import session as tc

    B, T = batch.input_ids_BT.shape
    train_per_token = tc.flops_per_token(model, T)
    rollout = (B * T) * train_per_token / 3
    update = cfg.inner_updates * (B * T) * train_per_token
    ref = (B * T) * train_per_token / 3 if cfg.beta > 0 else 0.0
    return rollout + update + ref


def heldout_accuracy(engine, tokenizer, tasks, cfg: RLConfig, info: DistInfo = DistInfo(),
                     device=torch.device("cpu")) -> float:
    """Greedy accuracy on the held-out problems; under torchrun each rank decodes every W-th one."""
    from sputnik.evaluate import greedy_accuracy

    acc, _ = greedy_accuracy(engine, tokenizer, tasks, cfg.eval_examples, cfg.seed, cfg.max_new_tokens,
                             render=lambda p: render(tokenizer, p, cfg.recipe), shard=(info.rank, info.world_size))
    n_local = len(range(info.rank, cfg.eval_examples, info.world_size))
    hits, n = dist_lib.all_reduce_sum([acc * n_local, n_local], info, device)
    return round(hits) / n


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The engine's sampling seed of one step on one rank (rank 0: the single-process seed)."""
    return seed * 7919 + step + rank * 1_000_003


def gather_step(info: DistInfo, **local) -> dict:
    """Each per-completion list in `local` concatenated over ranks (rank order = prompt order), each
    count summed, each `time_*` the slowest rank's (the step waits for it); what every rank needs for
    identical metrics and health decisions."""
    parts = dist_lib.all_gather_object(local, info)
    return {k: ([x for p in parts for x in p[k]] if isinstance(v, list) else
                (max(p[k] for p in parts) if k.startswith("time_") else sum(p[k] for p in parts)))
            for k, v in local.items()}


# ---------------------------------------------------------------------------------------------
def run(cfg: RLConfig) -> dict:
    """The RL stage in this process, or in each of `torchrun --nproc_per_node W` processes: every
    rank holds the whole model, samples its 1/W of the step's prompts and sums gradients with the
    others (distributed.all_reduce_grads); rank 0 writes metrics, checkpoints and the model."""
    if not cfg.init:
        raise ValueError("init: give the policy to start from (a sputnik model directory or an HF model dir)")
    set_threads(cfg.num_threads)
    dc = pick_device(cfg.device)
    info = dist_lib.init_distributed(dc.device)
    try:
        return _run(cfg, dc, info)
    finally:
        dist_lib.teardown()


def _run(cfg: RLConfig, dc, info: DistInfo) -> dict:
    from sputnik.accounting import ledger
    from sputnik.train import session as tc
    from sputnik.model.config import ModelConfig
    from sputnik.tasks import get_task

    W, rank0 = info.world_size, info.is_rank0
    if cfg.prompts_per_step % W:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the number of ranks ({W}): "
                         "each rank samples whole groups")
    seed_everything(cfg.seed)
    print0(f"rl: device {dc.device} ({dc.reason}); ranks {W}")
    init = tc.InitConfig(hf_dir=cfg.init)
    tokenizer = tc.load_tokenizer("", init)
    model = tc.load_model(ModelConfig(), init).to(dc.device)
    model.train()
    ref_model = None
    if cfg.beta > 0:  # β = 0 drops the reference model and its memory
        ref_model = tc.load_model(ModelConfig(), init).to(dc.device)
        ref_model.eval().requires_grad_(False)
    tasks = [get_task(n, **task_knobs(cfg.task_args)) for n in cfg.tasks]
    tasks_by_name = {t.name: t for t in tasks}
    bad = prompt_prefills_format(tokenizer.decode(render(tokenizer, "2+2", cfg.recipe)))
    if bad:
        raise ValueError(f"the prompt template pre-fills {bad!r}: the policy would get format reward for free")
    custom = IsolatedReward(cfg.reward_fn, cfg.reward_timeout_s) if cfg.reward_fn else None
    optimizer = build_optimizer(model, cfg.optim)
    if cfg.compile:
        compile_blocks(model)
    engine = Engine(model, tokenizer, compile=True if cfg.compile else None)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop_token_ids=(tokenizer.eot_id,))
    monitor = HealthMonitor(cfg.health)
    aggregate = aggregate_fn(cfg)
    metrics_path = f"{cfg.out_dir}/metrics.jsonl"
    if rank0:
        save_config(cfg, f"{cfg.out_dir}/config.json")
    start_step, acc_history, task_acc = 0, [], {}
    resume_from = ckpt.resolve(cfg.resume, cfg.out_dir)
    if resume_from is not None:
        c = ckpt.validate(resume_from, expected_shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
                          config=cfg, world_size=W)
        model_state, optim_state, rng = ckpt.load(c, info.rank)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        ckpt.restore_rng(rng)
        start_step, acc_history = c.step, c.loop_state.get("acc_history", [])
        task_acc = c.loop_state.get("task_accuracy", {})
        print0(f"rl: resumed from {resume_from} at step {start_step}")
    dist_lib.check_replicas(model, info, "rl start")
    # the run repeats the steps after its checkpoint (a fresh start all of them): drop their lines
    if rank0:
        trim_metrics(Path(metrics_path), start_step if resume_from is not None else -1)
    log = (lambda rec: append_jsonl(metrics_path, rec)) if rank0 else (lambda rec: None)
    per_rank = cfg.prompts_per_step // W

    with ledger.record_run(cfg.ledger_dir, "rl", cfg) as led:
        t_start = time.perf_counter()
        if not acc_history:
            acc_history.append((0, heldout_accuracy(engine, tokenizer, tasks, cfg, info, dc.device)))
            log({"step": 0, "heldout_accuracy": acc_history[-1][1]})
            print0(f"rl: held-out accuracy before RL {acc_history[-1][1]:.3f}")
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            # --- rollout: one prefill per prompt, G forked samples each (this rank's share of prompts)
            shares = (learnability_shares(task_acc, [t.name for t in tasks])
                      if cfg.task_sampling == "learnability" else None)
            examples = sample_prompts(tasks, step, cfg.prompts_per_step, cfg.seed, shares)
            examples = examples[info.rank * per_rank: (info.rank + 1) * per_rank]
            prompts = [render(tokenizer, ex.prompt, cfg.recipe) for ex in examples]
            params.seed = rollout_seed(cfg.seed, step, info.rank)
            groups = engine.generate(prompts, params, num_samples=cfg.group_size)
            t_roll = time.perf_counter() - t0
            flat = [c for g in groups for c in g]
            flat_ex = [ex for ex, g in zip(examples, groups) for _ in g]
            # --- reward
            t1 = time.perf_counter()
            rewards, verdicts = score(cfg, tasks_by_name, flat_ex, flat, custom)
            t_rew = time.perf_counter() - t1
            # --- advantages (+ DAPO dynamic sampling): groups are whole on each rank
            r_BG = torch.tensor(rewards).view(len(examples), cfg.group_size)
            adv = rl_losses.group_advantages(r_BG, cfg.group_size, scale_by_std=VARIANTS[cfg.variant]["scale_by_std"])
            keep_groups = rl_losses.dynamic_sampling_mask(r_BG, cfg.group_size)
            keep = keep_groups.repeat_interleave(cfg.group_size) if cfg.dynamic_sampling else torch.ones(len(flat), dtype=torch.bool)
            g = gather_step(info, rewards=rewards, task=[ex.task for ex in flat_ex],
                            correct=[bool(v.correct) for v in verdicts],
                            formatted=[bool(v.well_formatted) for v in verdicts],
                            unparsed=[v.extracted is None for v in verdicts],
                            truncated=[c.finish_reason == "length" for c in flat],
                            length=[len(c.token_ids) for c in flat], keep_groups=keep_groups.tolist(),
                            kept=int(keep.sum()), time_rollout=t_roll, time_reward=t_rew,
                            reward_failures=custom.failures.total() if custom else 0)
            update_task_accuracy(task_acc, g["task"], g["correct"])
            # --- update
            t2 = time.perf_counter()
            m = {}
            if g["kept"]:
                batch = None
                if keep.any():
                    rows = keep.nonzero()[:, 0].tolist()
                    batch = build_rollout_batch([prompts[i // cfg.group_size] for i in rows],
                                                [flat[i].token_ids for i in rows], [flat[i].logprobs for i in rows],
                                                tokenizer.pad_id).to(dc.device)
                set_lr(optimizer, lr_multiplier(step, cfg.steps, cfg.optim))
                m = update(model, ref_model, optimizer, batch, adv.reshape(-1)[keep].to(dc.device), cfg, dc, aggregate,
                           vocab_limit=engine.vocab_limit, info=info)
                flops, tokens = (0.0, 0) if batch is None else (rl_step_flops(model, batch, cfg), batch.input_ids_BT.numel())
                flops, tokens = dist_lib.all_reduce_sum([flops, tokens], info, dc.device)
                led.add(flops=flops, tokens=int(tokens))
            t_upd = time.perf_counter() - t2
            # --- metrics and health (the same on every rank: they decide together to warn or stop)
            rewards_all, lengths = g["rewards"], g["length"]
            rec = dict(step=step + 1, reward_mean=sum(rewards_all) / len(rewards_all),
                       reward_std=float(torch.tensor(rewards_all).std()) if len(rewards_all) > 1 else 0.0,
                       accuracy=sum(g["correct"]) / len(lengths), format_rate=sum(g["formatted"]) / len(lengths),
                       parse_failure_frac=sum(g["unparsed"]) / len(lengths),
                       truncated_frac=sum(g["truncated"]) / len(lengths),
                       zero_variance_frac=1.0 - sum(g["keep_groups"]) / len(g["keep_groups"]),
                       length_mean=sum(lengths) / len(lengths), length_max=max(lengths),
                       kept_sequences=g["kept"], time_rollout=g["time_rollout"], time_reward=g["time_reward"],
                       time_update=t_upd, tokens_per_s=sum(lengths) / max(g["time_rollout"], 1e-9),
                       reward_failures=g["reward_failures"], task_accuracy=dict(task_acc), **m)
            if step < 3 or (step + 1) % 10 == 0:
                rec["sample"] = flat[0].text[:300]
            warnings = monitor.observe_step(rec)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                acc = heldout_accuracy(engine, tokenizer, tasks, cfg, info, dc.device)
                acc_history.append((step + 1, acc))
                rec["heldout_accuracy"] = acc
                warnings += monitor.observe_eval(rec["reward_mean"], acc)
            rec["warnings"] = warnings
            rec["elapsed_s"] = time.perf_counter() - t_start  # this session's wall time, evaluations included
            log(rec)
            print0(f"rl step {step + 1}/{cfg.steps} reward {rec['reward_mean']:.3f} acc {rec['accuracy']:.3f} "
                   f"fmt {rec['format_rate']:.2f} len {rec['length_mean']:.0f} kl {m.get('kl', 0):.4f} "
                   f"ent {m.get('entropy', 0):.3f} roll {rec['time_rollout']:.1f}s upd {t_upd:.1f}s"
                   + (f" heldout {rec['heldout_accuracy']:.3f}" if "heldout_accuracy" in rec else ""))
            for w in warnings:
                print0(f"rl: WARNING {w}")
            if warnings and cfg.health.stop_on_pathology:
                raise KeyboardInterrupt(f"stopped by health check: {warnings[0]}")
            # --- checkpoint
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                dist_lib.check_replicas(model, info, f"rl step {step + 1}")
                rng_states = dist_lib.all_gather_object(ckpt.capture_rng(), info)
                if rank0:
                    ckpt.save(f"{cfg.out_dir}/checkpoints", step + 1, model_state=model.state_dict(),
                              optimizer_state=optimizer.state_dict(), rng_states=rng_states,
                              loop_state={"acc_history": acc_history, "task_accuracy": task_acc}, config=cfg,
                              keep_last=cfg.keep_last)
                dist_lib.barrier(info)
        final_dir = Path(cfg.out_dir) / "model"
        if rank0:
            tc.save_model(model, final_dir, tokenizer, cfg)
        dist_lib.barrier(info)
        led.artifacts.append(str(final_dir))
        led.metrics.update(heldout_accuracy_before=acc_history[0][1], heldout_accuracy=acc_history[-1][1],
                           accuracy_curve=acc_history)
    if custom is not None:
        custom.close()
    return dict(final_dir=str(final_dir), accuracy_before=acc_history[0][1], accuracy_after=acc_history[-1][1],
                accuracy_curve=acc_history)


def register(sub) -> None:
    p = sub.add_parser("rl", help="GRPO / Dr. GRPO / DAPO with verifiable rewards (R1 and R1-Zero recipes)",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, RLConfig)
    p.set_defaults(func=lambda args: (run(config_from_args(args, RLConfig)), 0)[1])
