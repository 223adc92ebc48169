"""Policy-gradient objectives of the GRPO family: GRPO (DeepSeekMath §4.1), Dr. GRPO (Liu et al.
2025, arXiv 2503.20783) and DAPO (Yu et al. 2025, arXiv 2503.14476), as small pure functions.

A GRPO step is: `group_advantages` of verifier rewards -> per-token `clipped_surrogate` (+ β·`k3_kl`)
-> one aggregation (`sequence_mean` = GRPO, `token_mean` = DAPO, `constant_norm` = Dr. GRPO).
`grpo_loss` composes them; the variants differ only in the arguments passed, never in a string
switch. Per-token log-probs come from `sputnik.train.losses.token_logprobs` at the rollout temperature.

Shape legend: B sequences (completions) in the batch, G completions per prompt (group size),
T completion time steps (padded), V vocabulary, N rows.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "group_advantages", "dynamic_sampling_mask", "soft_overlong_penalty", "clipped_surrogate", "k3_kl",
    "truncated_importance_weights", "sequence_mean", "token_mean", "constant_norm", "grpo_loss",
    "entropy_from_logits",
]


# ---------------------------------------------------------------------------------------------
# Rewards -> advantages
def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: need >= 2 completions per prompt to compare")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size).float()


def group_advantages(rewards: Tensor, group_size: int, *, scale_by_std: bool = True,
                     eps: float = 1e-4) -> Tensor:
    """Outcome-supervision advantages, one per completion (DeepSeekMath §4.1.2):

        A_i = (r_i − mean_g r) / (std_g r + eps)     scale_by_std=True   (GRPO; TRL scale_rewards="group")
        A_i =  r_i − mean_g r                        scale_by_std=False  (Dr. GRPO §3: no difficulty bias)

    std is Bessel-corrected (N − 1) and eps = 1e-4 as in TRL. `rewards` is [B] (groups contiguous,
    B = num_prompts·G) or [num_prompts, G]; the result has the same shape. A group whose rewards
    are all equal gets exactly zero (no signal, and no 0/eps blow-up from rounding).
    """
    r_PG = _groups(rewards, group_size)
    centred_PG = r_PG - r_PG.mean(-1, keepdim=True)
    centred_PG = torch.where(_all_equal(r_PG)[:, None], 0.0, centred_PG)
    if scale_by_std:
        centred_PG = centred_PG / (r_PG.std(-1, keepdim=True) + eps)
    return centred_PG.reshape(rewards.shape)


def _all_equal(r_PG: Tensor) -> Tensor:
    return (r_PG == r_PG[:, :1]).all(-1)


def dynamic_sampling_mask(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic sampling (§3.2, eq. 11 constraint 0 < |correct| < G): one bool per group, True
    where the rewards are not all equal. Groups that are all right or all wrong have zero
    advantage and only dilute the batch; the caller drops them and samples more prompts.
    `rewards` is [B] or [num_prompts, G]; returns [num_prompts]."""
    return ~_all_equal(_groups(rewards, group_size))


def soft_overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO soft overlong punishment (eq. 13), added to the correctness reward:

        R_len(|y|) = 0                            if |y| ≤ L_max − L_cache
                   = ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| ≤ L_max
                   = −1                           if |y| > L_max

    A linear ramp from 0 to −1 over the last `cache_len` tokens of the budget. Float, shape of `lengths`.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"cache_len={cache_len}: must be in (0, max_len={max_len}]")
    lengths = lengths.float()
    ramp = ((max_len - cache_len) - lengths) / cache_len
    return torch.where(lengths > max_len, -1.0, ramp.clamp(max=0.0))


# ---------------------------------------------------------------------------------------------
# Per-token terms
def clipped_surrogate(logp_BT: Tensor, old_logp_BT: Tensor, adv_B: Tensor, mask_BT: Tensor,
                      eps_low: float = 0.2, eps_high: float = 0.2) -> tuple[Tensor, Tensor]:
    """PPO/GRPO clipped surrogate per token (DeepSeekMath eq. 3; DAPO "clip-higher" eq. 10):

        ρ_{i,t} = exp(logp − old_logp)
        ℓ_{i,t} = −min( ρ A_i , clip(ρ, 1 − ε_low, 1 + ε_high) A_i )

    Returns (ℓ_BT, unmasked; clip_frac: fraction of valid tokens where the clip is active, i.e.
    ρ < 1 − ε_low with A < 0 or ρ > 1 + ε_high with A > 0 — exactly the tokens whose gradient is 0).
    ε_low = ε_high = 0.2 is GRPO; DAPO uses ε_high = 0.28.
    """
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    adv_B1 = adv_B.reshape(-1, 1).to(ratio_BT.dtype)
    clipped_BT = ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss_BT = -torch.min(ratio_BT * adv_B1, clipped_BT * adv_B1)
    active_BT = ((ratio_BT < 1.0 - eps_low) & (adv_B1 < 0)) | ((ratio_BT > 1.0 + eps_high) & (adv_B1 > 0))
    return loss_BT, token_mean(active_BT.float(), mask_BT).detach()


def k3_kl(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(π_θ ‖ π_ref) per token (DeepSeekMath eq. 4):

        D_t = π_ref/π_θ − log(π_ref/π_θ) − 1 = exp(ref − logp) − (ref − logp) − 1

    ≥ 0, and = 0 exactly where the two log-probs are equal.
    """
    log_r_BT = ref_logp_BT - logp_BT
    return torch.exp(log_r_BT) - log_r_BT - 1.0


def truncated_importance_weights(train_logp_BT: Tensor, sampler_logp_BT: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"): w_t = min( exp(logp_train − logp_sampler), C ), detached.

    Multiplies the per-token policy loss to correct for the sampler (e.g. a bf16/vLLM engine) and
    the trainer disagreeing on log-probs of the same tokens; C (typically 2) bounds the variance.
    """
    if not cap > 0:
        raise ValueError(f"cap={cap}: must be > 0")
    return torch.exp(train_logp_BT - sampler_logp_BT).clamp(max=cap).detach()


def entropy_from_logits(logits_NV: Tensor) -> Tensor:
    """Per-row entropy of softmax(z): H = logsumexp(z) − Σ_v softmax(z)_v z_v  (fp32). [..., V] -> [...]."""
    z = logits_NV.float()
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


# ---------------------------------------------------------------------------------------------
# Aggregations: how per-token losses become one number (reference §5.2)
def sequence_mean(loss_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """GRPO (DeepSeekMath eq. 3): (1/B) Σ_i (1/|o_i|) Σ_t ℓ_{i,t}; an empty sequence counts as |o_i| = 1.
    Every sequence weighs the same, so tokens of long answers weigh less (Dr. GRPO's length bias)."""
    mask_BT = mask_BT.bool()
    per_seq_B = torch.where(mask_BT, loss_BT, 0.0).sum(-1) / mask_BT.sum(-1).clamp(min=1)
    return per_seq_B.mean()


def token_mean(loss_BT: Tensor, mask_BT: Tensor, num_tokens_global: Tensor | int | None = None) -> Tensor:
    """DAPO token-level loss (eq. 12 normalizer): Σ_{i,t} ℓ_{i,t} / Σ_i |o_i|.

    Under gradient accumulation pass `num_tokens_global`, the valid-token count of the whole
    optimizer step (all micro-batches, all ranks): the summed micro-batch losses then equal the
    loss of the unsplit batch, whatever the split. Default: this batch's count (clamped to ≥ 1).
    """
    mask_BT = mask_BT.bool()
    denom = mask_BT.sum() if num_tokens_global is None else torch.as_tensor(num_tokens_global)
    return torch.where(mask_BT, loss_BT, 0.0).sum() / denom.clamp(min=1)


def constant_norm(loss_BT: Tensor, mask_BT: Tensor, max_len: int, num_seqs_global: int | None = None) -> Tensor:
    """Dr. GRPO (§3, TRL loss_type="dr_grpo"): Σ_{i,t} ℓ_{i,t} / (B · L_max), L_max the generation
    budget — a constant, so no sequence-length or batch-length bias. `num_seqs_global` replaces B
    by the optimizer step's sequence count under gradient accumulation."""
    if max_len < 1:
        raise ValueError(f"max_len={max_len}: must be >= 1")
    num_seqs = loss_BT.shape[0] if num_seqs_global is None else num_seqs_global
    return torch.where(mask_BT.bool(), loss_BT, 0.0).sum() / (num_seqs * max_len)


Aggregation = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# The composed objective
def grpo_loss(logp_BT: Tensor, old_logp_BT: Tensor, adv_B: Tensor, mask_BT: Tensor, *,
              eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
              ref_logp_BT: Tensor | None = None, aggregate: Aggregation = sequence_mean,
              is_weights_BT: Tensor | None = None,
              kl_times_ratio: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """−J_GRPO (DeepSeekMath eq. 3) with its variants chosen by arguments:

        ℓ_{i,t} = w_t · clipped_surrogate_{i,t} + β · D^{k3}_{i,t}(π_θ ‖ π_ref)
        loss    = aggregate(ℓ, mask)

    GRPO: defaults with `beta=0.04`, `ref_logp_BT`. DAPO: `eps_high=0.28`, `aggregate=partial(
    token_mean, num_tokens_global=n)`, β = 0, advantages of dynamically sampled groups.
    Dr. GRPO: advantages with `scale_by_std=False`, `aggregate=partial(constant_norm, max_len=L)`.
    `is_weights_BT` (e.g. `truncated_importance_weights`) multiplies the policy term only.
    `kl_times_ratio` multiplies the k3 term by ρ (DeepSeek-V3.2's unbiased KL gradient; TRL's
    default `use_bias_correction_kl`); False reproduces DeepSeekMath. β = 0 skips the KL entirely.

    Returns (loss, metrics) with detached scalars: clip_frac, ratio_mean (over valid tokens) and
    kl (mean k3 over valid tokens; present when `ref_logp_BT` is given).
    """
    loss_BT, clip_frac = clipped_surrogate(logp_BT, old_logp_BT, adv_B, mask_BT, eps_low, eps_high)
    if is_weights_BT is not None:
        loss_BT = loss_BT * is_weights_BT
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    metrics = {"clip_frac": clip_frac, "ratio_mean": token_mean(ratio_BT, mask_BT).detach()}
    if beta != 0.0 and ref_logp_BT is None:
        raise ValueError(f"beta={beta} needs ref_logp_BT (the reference policy's log-probs)")
    if ref_logp_BT is not None:
        kl_BT = k3_kl(logp_BT, ref_logp_BT)
        metrics["kl"] = token_mean(kl_BT, mask_BT).detach()
        if beta != 0.0:
            loss_BT = loss_BT + beta * (kl_BT * ratio_BT if kl_times_ratio else kl_BT)
    return aggregate(loss_BT, mask_BT), metrics
