"""The policy update of one RL step: μ optimizer steps on one rollout batch (objectives.py's loss over
micro-batches, gradients summed over ranks), the expert-bias update, and the FLOPs it cost.

Where we depart from the papers, on purpose: π_old is the first inner update's own forward, so ratios
start at exactly 1 with no extra forward pass; the engine's log-probs are compared against it every
step and the mismatch (sampler vs trainer) is reported; with `tis_cap` > 0 the loss is re-weighted by
the truncated importance ratio π_train/π_sampler (TIS), as needed when sampling in bf16. With
`routing_replay` on, an MoE's update forward routes every token to the experts the sampler chose
(R3, model/routing_replay.py), so π_train and π_sampler are the same network.

Shape legend: B sequences (completions) of a micro-batch, T padded length.
"""
from __future__ import annotations

import torch

from sputnik import distributed as dist_lib
from sputnik.common import autocast
from sputnik.distributed import DistInfo
from sputnik.rl import objectives
from sputnik.model.routing_replay import replaying
from sputnik.rl.rollout import logprobs, micro_batches, replay_layout, shares_prompts
from sputnik.rl.shared_prompts import supports_shared_prompts
from sputnik.train.balance import ExpertLoad
from sputnik.train.loading import flops_per_token
from sputnik.train.optim import clip_grad_norm, guarded_step

# variant -> (advantage scaled by group std, loss aggregation)
VARIANTS = {
    "grpo": dict(scale_by_std=True, aggregate="sequence"),  # DeepSeekMath: per-sequence mean
    "dr_grpo": dict(scale_by_std=False, aggregate="constant"),  # Liu et al. 2025: no std, no 1/|o|
    "dapo": dict(scale_by_std=True, aggregate="token"),  # Yu et al. 2025: token-level mean
}


def aggregation(cfg, num_tokens: float):
    """The variant's aggregation of per-token losses over a micro-batch. DAPO's token mean divides by
    the step's token count over all micro-batches and ranks, so the micro-batch losses add up."""
    kind = VARIANTS[cfg.variant]["aggregate"]
    if kind == "sequence":
        return objectives.sequence_mean
    if kind == "token":
        return lambda loss_BT, mask_BT: objectives.token_mean(loss_BT, mask_BT, num_tokens_global=num_tokens)
    return lambda loss_BT, mask_BT: objectives.constant_norm(loss_BT, mask_BT, cfg.max_new_tokens)


def update(model, ref_model, optimizer, batch, adv_B, cfg, dc, vocab_limit: int | None = None,
           info: DistInfo = DistInfo(), poison: bool = False) -> dict:
    """μ optimizer steps on this rank's kept rows (`batch` None when it kept none; under torchrun the
    ranks' losses are normalised by the counts of all ranks and their gradients summed, so the step is
    the one a single process would take on all rows). Returns the metrics of the last inner step,
    summed over ranks. `vocab_limit`: the tokenizer's vocabulary size, the head rows the engine samples.
    poison (tests): a NaN loss, which the guarded step must skip."""
    rows_local = 0 if batch is None else batch.input_ids_BT.shape[0]
    tokens_local = 0.0 if batch is None else float(batch.completion_mask_BT.sum())
    B, num_tokens = dist_lib.all_reduce_sum([rows_local, tokens_local], info, dc.device)
    aggregate = aggregation(cfg, num_tokens)
    shared = batch is not None and shares_prompts(model, batch, cfg.share_prompts)
    parts = [] if batch is None else micro_batches(batch, adv_B, cfg.micro_batch, keep_prompts_together=shared)
    old_logps, metrics = [None] * len(parts), {}
    replay = getattr(cfg, "routing_replay", "off")
    for inner in range(cfg.inner_updates):
        tot, load = dict(loss=0.0, clip_frac=0.0, kl=0.0, entropy=0.0, mismatch=0.0), ExpertLoad()
        routed = dict(compared=0.0, differed=0.0, mismatch_free=0.0)
        for i, (mb, mb_adv_B) in enumerate(parts):
            mask_BT = mb.completion_mask_BT
            with autocast(dc):
                if replay != "off" and inner == 0 and mb.routing_BTLK is not None:
                    # How far the trainer's own routing and log-probs are from the sampler's: every
                    # step, on the first inner update (the sampler's weights). With replay on, the
                    # free-routing log-probs take one extra no-grad forward.
                    with replaying(model, replay_layout(mb, shared), apply=replay == "on") as tape:
                        logp_BT, ent_BT, expert_load = logprobs(model, mb, cfg.temperature, vocab_limit, shared)
                    routed["compared"] += tape.compared
                    routed["differed"] += tape.differed
                    if replay == "on":
                        with torch.no_grad():
                            free_BT, _, _ = logprobs(model, mb, cfg.temperature, vocab_limit, shared)
                        routed["mismatch_free"] += float(((free_BT - mb.sampler_logp_BT).abs() * mask_BT).sum())
                elif replay == "on" and mb.routing_BTLK is not None:
                    with replaying(model, replay_layout(mb, shared)):
                        logp_BT, ent_BT, expert_load = logprobs(model, mb, cfg.temperature, vocab_limit, shared)
                else:
                    logp_BT, ent_BT, expert_load = logprobs(model, mb, cfg.temperature, vocab_limit, shared)
                # π_old: the first inner step's own forward (ratios start at exactly 1, no extra pass)
                old = logp_BT.detach() if old_logps[i] is None else old_logps[i]
                loss, m = micro_batch_loss(ref_model, mb, mb_adv_B, logp_BT, old, cfg, aggregate, shared, vocab_limit)
                if VARIANTS[cfg.variant]["aggregate"] != "token":
                    loss = loss * mask_BT.shape[0] / B  # per-micro-batch means -> a mean over the batch
                if poison:
                    loss = loss * float("nan")
            loss.backward()
            load.add(expert_load)
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
            if replay != "off":  # routing_mismatch: share of (token, layer) whose own experts differ from the sampler's
                compared, differed, free = dist_lib.all_reduce_sum(list(routed.values()), info, dc.device)
                metrics["routing_mismatch"] = differed / max(compared, 1.0)
                if replay == "on":  # logp_mismatch is then with replay; this one without
                    metrics["logp_mismatch_free_routing"] = free / max(num_tokens, 1.0)
        grad_norm = clip_grad_norm(model, cfg.optim.grad_clip)
        stepped = guarded_step(optimizer, tot["loss"], grad_norm)
        load.apply(model, info, stepped)  # every rank takes the same decision
        metrics.update(loss=tot["loss"], clip_frac=tot["clip_frac"], kl=tot["kl"], entropy=tot["entropy"],
                       grad_norm=grad_norm, skipped=int(not stepped), shared_prompts=int(shared))
    return metrics


def micro_batch_loss(ref_model, mb, adv_B, logp_BT, old_logp_BT, cfg, aggregate, shared: bool, vocab_limit):
    """objectives.grpo_loss of one micro-batch, with the reference policy's log-probs when β > 0 and
    the truncated importance weights when tis_cap > 0 -> (loss, metrics)."""
    ref = None
    if ref_model is not None:
        with torch.no_grad():
            ref, _, _ = logprobs(ref_model, mb, cfg.temperature, vocab_limit, shared and supports_shared_prompts(ref_model))
    is_w = objectives.truncated_importance_weights(old_logp_BT, mb.sampler_logp_BT, cfg.tis_cap) if cfg.tis_cap else None
    return objectives.grpo_loss(logp_BT, old_logp_BT, adv_B, mb.completion_mask_BT, eps_low=cfg.eps_low,
                                eps_high=cfg.eps_high, beta=cfg.beta, ref_logp_BT=ref, aggregate=aggregate,
                                is_weights_BT=is_w)


def rollout_flops(model, prompts: list[list[int]], completions) -> float:
    """FLOPs of sampling a step's rollouts: one prefill per prompt (its samples fork the cache) plus
    every generated token, each a forward (1/3 of a training token's cost). Every sample counts,
    kept or dropped: dynamic sampling saves a dropped group's update, not its sampling."""
    tokens = sum(len(p) for p in prompts) + sum(len(c.token_ids) for c in completions)
    longest = max([len(p) for p in prompts] + [0]) + max([len(c.token_ids) for c in completions] + [0])
    return tokens * flops_per_token(model, max(1, longest)) / 3


def update_flops(model, batch, cfg) -> float:
    """FLOPs of a step's update: μ training passes over the kept sequences (padded batch) and the
    reference forward when β > 0."""
    B, T = batch.input_ids_BT.shape
    train_per_token = flops_per_token(model, T)
    ref = (B * T) * train_per_token / 3 if cfg.beta > 0 else 0.0
    return cfg.inner_updates * (B * T) * train_per_token + ref
