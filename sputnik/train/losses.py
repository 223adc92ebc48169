"""Language-model and distillation objectives: chunked linear cross-entropy, per-token log-probs,
the multi-token-prediction (MTP) loss and knowledge-distillation divergences.

Every function is pure (tensors in, tensors out) and its docstring carries the formula. The RL
objectives (GRPO, Dr. GRPO, DAPO) live in `sputnik/rl/objectives.py`.

Shape legend: N rows (flattened batch x time positions), V vocabulary, D hidden size, C rows of one
chunk, B batch, T time (sequence length).

Why chunked heads: at V = 32k-150k the [N, V] fp32 logits dominate training memory (N = 16k tokens
at V = 128k is 8 GiB). The functions below compute logits `h @ W^T` a chunk of rows at a time and
keep only per-row statistics; when gradients are needed they are computed in the same pass, while
a chunk's logits exist, and backward only scales them (the Liger "fused linear cross-entropy"
idea, written here as plain PyTorch).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

__all__ = [
    "linear_cross_entropy", "token_logprobs", "mtp_targets", "mtp_loss",
    "forward_kl_per_token", "reverse_kl_per_token", "generalized_jsd_per_token",
    "forward_kl", "reverse_kl", "generalized_jsd", "chunked_kd_loss",
]


def _check_head_args(h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    if h_ND.dim() != 2 or weight_VD.dim() != 2 or h_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(f"h {tuple(h_ND.shape)} and weight {tuple(weight_VD.shape)}: want [N, D] and [V, D]")
    if targets_N.shape != h_ND.shape[:1]:
        raise ValueError(f"targets {tuple(targets_N.shape)}: want [N] = [{h_ND.shape[0]}]")


def _matmul_dtype(h_ND: Tensor) -> torch.dtype:
    """The dtype of the head matmul: autocast's if it is on (the functions below switch autocast off
    inside, so forward and the recompute in backward use the same precision), else h's dtype."""
    dev = h_ND.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h_ND.dtype


def _scored_rows_only(h_ND: Tensor) -> bool:
    """Only the scored rows through the head: SFT's prompts and padding are a third of its rows at the
    speedrun's lengths. Not on CUDA, where the row count would cost a host sync, nor under compile (a
    graph per count): there the ignored rows are computed and masked."""
    return h_ND.is_cpu and not torch.compiler.is_compiling()


def _kernels():
    from sputnik.kernels import cpu as cpu_kernels  # here, not at the top: sputnik.model imports this module

    return cpu_kernels


def _softmax_kernel(h_ND: Tensor, dtype: torch.dtype) -> bool:
    return h_ND.device.type == "cpu" and dtype == torch.float32 and _kernels().softmax_rows_available()


# ---------------------------------------------------------------------------------------------
# Cross-entropy through the LM head without materializing [N, V]
class _LinearCrossEntropy(torch.autograd.Function):
    """sum_n CE(h_n W^T, t_n), gradients computed chunk by chunk in forward; see `linear_cross_entropy`."""

    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, ignore_index, chunk_size, dtype):
        acc = torch.promote_types(dtype, torch.float32)  # fp32 statistics (fp64 stays fp64 for gradcheck)
        valid_N = targets_N != ignore_index
        safe_N = torch.where(valid_N, targets_N, 0)  # any in-range id; its loss is masked out
        loss = torch.zeros((), dtype=acc, device=h_ND.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Training always calls backward, so the gradients are computed here while each chunk's
        # logits exist: 3 head matmuls per chunk instead of 4 (forward + recompute + 2 in backward).
        # Backward then only scales them by the upstream scalar gradient.
        grad_h_ND = torch.empty_like(h_ND) if need_h else None
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device) if need_w else None
        kernel = _softmax_kernel(h_ND, dtype)
        minus_one_N = torch.full(targets_N.shape, -1.0) if kernel else None  # ∂CE/∂log p_t, before masking
        with torch.autocast(h_ND.device.type, enabled=False):
            w_VD = weight_VD.to(dtype)
            # Ignored rows get zero gradient by masking the [N, D] sides (h for ∂W, ∂h itself) instead of
            # the [C, V] softmax: V/D times less memory traffic.
            valid_N1 = valid_N[:, None].to(dtype)
            hv_ND = h_ND.to(dtype) * valid_N1 if need_w else None
            for s in range(0, h_ND.shape[0], chunk_size):
                e = s + chunk_size
                logits_CV = (h_ND[s:e].to(dtype) @ w_VD.T).to(acc)  # fp32 log-softmax even for bf16
                if kernel:  # softmax_rows.c: the row statistics in one read, softmax − onehot in one write
                    logp_target_C, lse_C, ent_C = _kernels().softmax_rows_forward(logits_CV, safe_N[s:e])
                    loss -= torch.where(valid_N[s:e], logp_target_C, 0.0).sum()
                    if need_h or need_w:
                        g_CV = _kernels().softmax_rows_backward(logits_CV, lse_C, safe_N[s:e], ent_C,
                                                                minus_one_N[s:e], None, out_NV=logits_CV)
                        if need_h:
                            grad_h_ND[s:e] = (g_CV @ w_VD) * valid_N1[s:e]
                        if need_w:
                            grad_w_VD.addmm_(g_CV.T, hv_ND[s:e])
                    continue
                # One fused row-wise pass gives z − logsumexp(z) (each row stays in cache), instead of
                # max, subtract, exp, sum and a second subtract+exp over the whole chunk.
                logp_CV = torch.log_softmax(logits_CV, dim=-1)
                del logits_CV
                logp_target_C = logp_CV.gather(1, safe_N[s:e, None]).squeeze(1)
                loss -= torch.where(valid_N[s:e], logp_target_C, 0.0).sum()
                if need_h or need_w:
                    # d CE / d logits = softmax − onehot (in place: one [C, V] buffer)
                    g_CV = logp_CV.exp_()
                    g_CV.scatter_add_(1, safe_N[s:e, None], torch.full_like(logp_target_C[:, None], -1.0))
                    g_CV = g_CV.to(dtype)
                    if need_h:
                        grad_h_ND[s:e] = (g_CV @ w_VD) * valid_N1[s:e]
                    if need_w:
                        if dtype == acc:
                            grad_w_VD.addmm_(g_CV.T, hv_ND[s:e])
                        else:
                            grad_w_VD += (g_CV.T @ hv_ND[s:e]).to(acc)
        ctx.save_for_backward(grad_h_ND, grad_w_VD)
        ctx.weight_dtype = weight_VD.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        grad_h = grad_h_ND * grad_loss.to(grad_h_ND.dtype) if grad_h_ND is not None else None
        grad_w = (grad_w_VD * grad_loss).to(ctx.weight_dtype) if grad_w_VD is not None else None
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, *,
                         ignore_index: int = -100, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy through the LM head, never holding the [N, V] logits.

        z_n = W h_n                                   (z is [N, V] but only [C, V] exists at once)
        loss = Σ_{n : t_n ≠ ignore} ( logsumexp_v z_{n,v} − z_{n,t_n} )
        ∂loss/∂z_n = softmax(z_n) − onehot(t_n)       (per chunk, in forward)

    Returns (loss: fp32 scalar (fp64 for fp64 inputs) with grad to h and W,
             count: number of valid rows, int64 scalar).
    Equals `F.cross_entropy(h @ W.T, t, reduction="sum", ignore_index=...)`; divide by the count
    (or by a global count under gradient accumulation) for the mean. Forward keeps only the
    gradients ∂loss/∂h [N, D] and ∂loss/∂W [V, D]; peak extra memory is one [C, V] fp32 chunk.
    """
    _check_head_args(h_ND, weight_VD, targets_N, chunk_size)
    count = (targets_N != ignore_index).sum()
    if _scored_rows_only(h_ND) and int(count) < targets_N.shape[0]:
        keep_N = (targets_N != ignore_index).nonzero().squeeze(1)
        h_ND, targets_N = h_ND.index_select(0, keep_N), targets_N.index_select(0, keep_N)
    loss = _LinearCrossEntropy.apply(h_ND, weight_VD, targets_N, ignore_index, chunk_size, _matmul_dtype(h_ND))
    return loss, count


# ---------------------------------------------------------------------------------------------
# Per-token log-probs and entropy (policy-gradient inputs)
class _TokenLogprobs(torch.autograd.Function):
    """(log softmax(z/τ)[t], H(softmax(z/τ))) per row with per-chunk recompute; see `token_logprobs`.

    Per chunk, forward does one head matmul and one fused row-wise log-softmax; backward one matmul
    that recomputes z/τ − lse (the subtraction fused into the GEMM), one in-place exp and the two
    gradient matmuls. τ is folded into the [C, D] side (h/τ), never a pass over [C, V]. When all rows
    fit in one chunk (N ≤ chunk_size) forward keeps its [N, V] log-probs for backward instead: the
    memory bound is one chunk either way, and backward skips the recompute matmul.

    In fp32 on a CPU the row-wise work of both directions is one pass of softmax_rows.c per row
    (cpu_kernels.softmax_rows_forward / _backward) instead of 5-7 ATen passes over [C, V]: the head's
    forward + backward at [1024 rows, 4096 vocab] 27-29 -> 21-22 ms (LOG.md, stop 21); it then keeps
    the logits instead of the log-probs, and backward writes the gradient over them."""

    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, temperature, ignore_index, chunk_size, dtype):
        acc = torch.promote_types(dtype, torch.float32)
        valid_N = targets_N != ignore_index
        safe_N = torch.where(valid_N, targets_N, 0)
        n = h_ND.shape[0]
        logp_N = torch.empty(n, dtype=acc, device=h_ND.device)
        entropy_N = torch.empty_like(logp_N)
        lse_N = torch.empty_like(logp_N)
        kept_NV = None
        keep = n <= chunk_size and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        # fp32 on a CPU: softmax_rows.c does the row statistics (and backward's gradient) in one pass
        ctx.kernel, ctx.kept_logits_used = _softmax_kernel(h_ND, dtype), False
        with torch.autocast(h_ND.device.type, enabled=False):
            w_VD = weight_VD.to(dtype)
            for s in range(0, n, chunk_size):
                e = s + chunk_size
                scaled_CV = ((h_ND[s:e] / temperature).to(dtype) @ w_VD.T).to(acc)
                if ctx.kernel:
                    logp_N[s:e], lse_N[s:e], entropy_N[s:e] = _kernels().softmax_rows_forward(scaled_CV, safe_N[s:e])
                    kept_NV = scaled_CV if keep else None  # the logits: backward's kernel reads them
                    continue
                logp_CV = torch.log_softmax(scaled_CV, dim=-1)  # one fused row-wise pass
                t_C1 = safe_N[s:e, None]
                logp_N[s:e] = logp_CV.gather(1, t_C1).squeeze(1)
                # lse = z_t/τ − log p_t, exact to a few ulp of |log p_t| (a sampled token is rarely far below 0)
                lse_N[s:e] = scaled_CV.gather(1, t_C1).squeeze(1) - logp_N[s:e]
                # H = −Σ_v p_v log p_v, with p written over the scaled logits: a fresh [C, V] buffer costs
                # more than the arithmetic here (first-touch page faults, ~3 ms for 16 MB; LOG.md stop 18)
                p_CV = torch.exp(logp_CV, out=scaled_CV)
                entropy_N[s:e] = -p_CV.mul_(logp_CV).sum(-1)
                del scaled_CV, p_CV
                if keep:
                    kept_NV = logp_CV  # the single chunk: keep it, backward needs no recompute
        logp_N = torch.where(valid_N, logp_N, 0.0)
        ctx.save_for_backward(h_ND, weight_VD, safe_N, valid_N, lse_N, entropy_N, kept_NV)
        ctx.temperature, ctx.chunk_size, ctx.dtype = temperature, chunk_size, dtype
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its terms
        return logp_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logp_N, grad_entropy_N):
        h_ND, weight_VD, safe_N, valid_N, lse_N, entropy_N, kept_NV = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tau, dtype, chunk = ctx.temperature, ctx.dtype, ctx.chunk_size
        acc = torch.promote_types(dtype, torch.float32)
        grad_h_ND = torch.zeros_like(h_ND) if need_h else None
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device) if need_w else None
        if grad_logp_N is None and grad_entropy_N is None:
            return None, None, None, None, None, None, None
        zeros_N = torch.zeros_like(lse_N)
        # With s = z/τ: ∂log p_t/∂s = onehot_t − p;  ∂H/∂s = −p (log p + H). The trailing 1/τ of ∂s/∂z
        # is folded into the per-row factors.
        g_logp_N = torch.where(valid_N, grad_logp_N, 0.0) / tau if grad_logp_N is not None else zeros_N
        g_ent_N = grad_entropy_N / tau if grad_entropy_N is not None else None
        with torch.autocast(h_ND.device.type, enabled=False):
            w_VD = weight_VD.to(dtype)
            for s in range(0, h_ND.shape[0], chunk):
                e = s + chunk
                h_CD = h_ND[s:e].to(dtype)
                if ctx.kernel:  # logits (saved, or recomputed) -> gradient in place, one pass
                    # The saved logits are used once: they take the gradient in place (a separate
                    # buffer costs ~3 ms more at [1024, 4096]), so a second backward through a
                    # retained graph recomputes them instead of reading them.
                    reuse = kept_NV is not None and not ctx.kept_logits_used
                    z_CV = kept_NV if reuse else (h_ND[s:e] / tau) @ w_VD.T
                    ctx.kept_logits_used |= reuse
                    g_CV = _kernels().softmax_rows_backward(z_CV, lse_N[s:e], safe_N[s:e], entropy_N[s:e],
                                                            g_logp_N[s:e], None if g_ent_N is None else g_ent_N[s:e],
                                                            out_NV=z_CV)
                    if need_h:
                        grad_h_ND[s:e] = g_CV @ w_VD
                    if need_w:
                        grad_w_VD.addmm_(g_CV.T, h_CD)
                    continue
                if kept_NV is not None:  # the saved tensor is read, never written
                    logp_CV = kept_NV
                    p_CV = logp_CV.exp()
                else:
                    if dtype == acc:  # log p = z/τ − lse, the subtraction fused into the GEMM (addmm's bias)
                        logp_CV = torch.addmm(-lse_N[s:e, None], h_ND[s:e] / tau, w_VD.T)
                    else:  # low-precision matmul: subtract the fp32 lse after the cast
                        logp_CV = ((h_ND[s:e] / tau).to(dtype) @ w_VD.T).to(acc) - lse_N[s:e, None]
                    p_CV = logp_CV.exp() if g_ent_N is not None else logp_CV.exp_()
                if g_ent_N is None:
                    g_CV = p_CV.mul_(-g_logp_N[s:e, None])  # −p · g
                else:
                    g_CV = p_CV.mul_((logp_CV + entropy_N[s:e, None]).mul_(g_ent_N[s:e, None])
                                     .add_(g_logp_N[s:e, None])).neg_()
                del logp_CV
                g_CV.scatter_add_(1, safe_N[s:e, None], g_logp_N[s:e, None])
                g_CV = g_CV.to(dtype)
                if need_h:
                    grad_h_ND[s:e] = g_CV @ w_VD
                if need_w:
                    if acc == dtype:
                        grad_w_VD.addmm_(g_CV.T, h_CD)  # accumulate in place, no [V, D] temporary
                    else:
                        grad_w_VD += (g_CV.T @ h_CD).to(acc)
        grad_w = grad_w_VD.to(weight_VD.dtype) if need_w else None
        return grad_h_ND, grad_w, None, None, None, None, None


def token_logprobs(h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, *, temperature: float = 1.0,
                   chunk_size: int = 1024, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-token log-probability of the targets and per-row entropy at a sampling temperature.

        p_n = softmax( W h_n / τ )                    (computed C rows at a time)
        logp_N[n]    = log p_n[t_n]                   (0 where t_n == ignore_index)
        entropy_N[n] = − Σ_v p_n[v] log p_n[v]

    Both fp32 and differentiable w.r.t. h and W (analytic backward, chunk logits recomputed; only
    [N]-sized statistics are kept between forward and backward, except when all N rows fit in one
    chunk: then forward's [N, V] log-probs are kept and backward skips the recompute matmul, at
    no higher peak than one chunk). τ must equal the rollout
    temperature for the GRPO ratio to be π_θ/π_old of the sampled distribution (as TRL does).
    """
    _check_head_args(h_ND, weight_VD, targets_N, chunk_size)
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    return _TokenLogprobs.apply(h_ND, weight_VD, targets_N, float(temperature), ignore_index,
                                chunk_size, _matmul_dtype(h_ND))


# ---------------------------------------------------------------------------------------------
# Multi-token prediction (DeepSeek-V3 §2.2, eqs. 24-25)
def mtp_targets(targets_BT: Tensor, depth: int, *, ignore_index: int = -100) -> Tensor:
    """Targets of MTP depth k from the main (already shifted) targets: targets_k[b, i] = targets[b, i+k].

    Main position i predicts t_{i+1} = targets[i]; MTP module k at position i predicts t_{i+k+1}.
    The last k positions have no such token and get `ignore_index`, so they add 0 to the sum;
    ignored main targets (prompt, padding) stay ignored k positions earlier.
    """
    if depth < 1:
        raise ValueError(f"depth={depth}: must be >= 1")
    k = min(depth, targets_BT.shape[1])
    tail_Bk = targets_BT.new_full((targets_BT.shape[0], k), ignore_index)
    return torch.cat([targets_BT[:, k:], tail_Bk], dim=1)


def mtp_loss(depth_ce: Sequence[tuple[Tensor, Tensor]], num_main_tokens: Tensor | int,
             mtp_lambda: float) -> Tensor:
    """L_MTP = (λ/D) Σ_{k=1..D} L^k,   L^k = −(1/T) Σ_i log P^k_i[t_i]    (DeepSeek-V3 eqs. 24-25).

    `depth_ce[k-1]` is depth k's (sum of CE over its valid positions, count of those positions),
    exactly what `linear_cross_entropy(h_k, W, mtp_targets(targets, k))` returns. The divisor is
    T = `num_main_tokens`, the main loss's token count, *not* each depth's own count (T − k per
    sequence): the paper normalizes every depth by T, so deeper modules, which see fewer positions,
    weigh slightly less. The counts are accepted only so that callers pass the pairs unchanged.
    """
    if not depth_ce:
        raise ValueError("depth_ce is empty: need at least one MTP depth")
    num_main = torch.as_tensor(num_main_tokens).clamp(min=1)
    total = sum(ce_sum for ce_sum, _count in depth_ce)
    return mtp_lambda / len(depth_ce) * total / num_main


# ---------------------------------------------------------------------------------------------
# Knowledge distillation: per-token divergences (sum over V) and masked means over tokens
def _log_softmax32(logits_NV: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32)) / temperature, dim=-1)


def _kl_rows(logp_P_NV: Tensor, logp_Q_NV: Tensor) -> Tensor:
    """KL(P ‖ Q) per row = Σ_v P_v (log P_v − log Q_v)."""
    return (logp_P_NV.exp() * (logp_P_NV - logp_Q_NV)).sum(-1)


def forward_kl_per_token(student_logits_NV: Tensor, teacher_logits_NV: Tensor,
                         temperature: float = 1.0) -> Tensor:
    """Hinton KD per token: τ² · KL(p_T^τ ‖ p_S^τ) = τ² Σ_v p_T^τ (log p_T^τ − log p_S^τ),
    p^τ = softmax(z/τ).

    Mass-covering. The τ² keeps gradient magnitudes comparable across τ: ∂/∂z_S = τ (p_S^τ − p_T^τ),
    which tends to (z_S − z_T, centred)/V as τ grows (Hinton, Vinyals, Dean 2015, §2). Returns [N].
    """
    logp_s, logp_t = _log_softmax32(student_logits_NV, temperature), _log_softmax32(teacher_logits_NV, temperature)
    return temperature ** 2 * _kl_rows(logp_t, logp_s)


def reverse_kl_per_token(student_logits_NV: Tensor, teacher_logits_NV: Tensor,
                         temperature: float = 1.0) -> Tensor:
    """Reverse KL per token: τ² · KL(p_S^τ ‖ p_T^τ) = τ² Σ_v p_S^τ (log p_S^τ − log p_T^τ).

    Mode-seeking (MiniLLM, Gu et al. 2023, token-level form); τ² as in `forward_kl_per_token`, so
    τ = 1 gives the plain KL. Returns [N].
    """
    logp_s, logp_t = _log_softmax32(student_logits_NV, temperature), _log_softmax32(teacher_logits_NV, temperature)
    return temperature ** 2 * _kl_rows(logp_s, logp_t)


def generalized_jsd_per_token(student_logits_NV: Tensor, teacher_logits_NV: Tensor,
                              temperature: float = 1.0, *, beta: float = 0.5) -> Tensor:
    """Generalized JSD per token (GKD, Agarwal et al. 2024, eq. 1) in TRL's `generalized_jsd_loss` convention:

        M = β p_T + (1−β) p_S,  log M = logsumexp(log p_T + log β, log p_S + log(1−β))
        JSD(β) = β KL(p_T ‖ M) + (1−β) KL(p_S ‖ M)       for 0 < β < 1
        β = 0 → KL(p_T ‖ p_S) (forward),  β = 1 → KL(p_S ‖ p_T) (reverse)   (unscaled endpoints)

    p = softmax(z/τ) with *no* τ² factor (TRL parity), so at τ ≠ 1 the β = 0 value is
    `forward_kl_per_token / τ²`. Returns [N].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta}: must be in [0, 1]")
    logp_s, logp_t = _log_softmax32(student_logits_NV, temperature), _log_softmax32(teacher_logits_NV, temperature)
    if beta == 0.0:
        return _kl_rows(logp_t, logp_s)
    if beta == 1.0:
        return _kl_rows(logp_s, logp_t)
    log_m = torch.logsumexp(torch.stack([logp_t + math.log(beta), logp_s + math.log(1.0 - beta)]), dim=0)
    return beta * _kl_rows(logp_t, log_m) + (1.0 - beta) * _kl_rows(logp_s, log_m)


def _masked_token_mean(values_N: Tensor, mask_N: Tensor) -> Tensor:
    mask_N = mask_N.reshape(-1).bool()
    return torch.where(mask_N, values_N, 0.0).sum() / mask_N.sum().clamp(min=1)


def _flat_pair(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    v = student_logits.shape[-1]
    return student_logits.reshape(-1, v), teacher_logits.reshape(-1, v)


def forward_kl(student_logits_NV: Tensor, teacher_logits_NV: Tensor, mask_N: Tensor,
               temperature: float = 1.0) -> Tensor:
    """Mean over valid tokens of τ² KL(p_T^τ ‖ p_S^τ) (`forward_kl_per_token`). Leading dims are
    flattened, so [B, T, V] logits with a [B, T] mask work too. Scalar."""
    s_NV, t_NV = _flat_pair(student_logits_NV, teacher_logits_NV)
    return _masked_token_mean(forward_kl_per_token(s_NV, t_NV, temperature), mask_N)


def reverse_kl(student_logits_NV: Tensor, teacher_logits_NV: Tensor, mask_N: Tensor,
               temperature: float = 1.0) -> Tensor:
    """Mean over valid tokens of τ² KL(p_S^τ ‖ p_T^τ) (`reverse_kl_per_token`). Scalar."""
    s_NV, t_NV = _flat_pair(student_logits_NV, teacher_logits_NV)
    return _masked_token_mean(reverse_kl_per_token(s_NV, t_NV, temperature), mask_N)


def generalized_jsd(student_logits_NV: Tensor, teacher_logits_NV: Tensor, mask_N: Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Mean over valid tokens of JSD(β) (`generalized_jsd_per_token`, GKD eq. 1, TRL endpoints). Scalar."""
    s_NV, t_NV = _flat_pair(student_logits_NV, teacher_logits_NV)
    return _masked_token_mean(generalized_jsd_per_token(s_NV, t_NV, temperature, beta=beta), mask_N)


DivergenceFn = Callable[[Tensor, Tensor, float], Tensor]


def _kd_chunk_sum(h_s_CD: Tensor, w_s_VD: Tensor, h_t_CD: Tensor, w_t_VD: Tensor, mask_C: Tensor,
                  divergence: DivergenceFn, temperature: float) -> Tensor:
    student_CV = h_s_CD @ w_s_VD.to(h_s_CD.dtype).T
    with torch.no_grad():  # the teacher is frozen: no graph, recomputed (not saved) in backward
        teacher_CV = h_t_CD @ w_t_VD.to(h_t_CD.dtype).T
    return torch.where(mask_C, divergence(student_CV, teacher_CV, temperature), 0.0).sum()


def chunked_kd_loss(h_student_ND: Tensor, weight_student_VD: Tensor, h_teacher_ND: Tensor,
                    weight_teacher_VD: Tensor, mask_N: Tensor, *,
                    divergence: DivergenceFn = forward_kl_per_token, temperature: float = 1.0,
                    chunk_size: int = 1024) -> Tensor:
    """KD loss from hidden states and heads: (1/Σ mask) Σ_{n valid} divergence(W_S h_S,n, W_T h_T,n, τ).

    Same value and gradients as `forward_kl`/`reverse_kl`/`generalized_jsd` on full logits, but
    logits exist only C rows at a time: each chunk runs under activation checkpointing, so its
    student and teacher [C, V] logits are freed after forward and recomputed in backward. The
    teacher (which may have another hidden size D') gets no gradient. `divergence` is one of the
    `*_per_token` functions, e.g. `functools.partial(generalized_jsd_per_token, beta=0.5)`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    if weight_student_VD.shape[0] != weight_teacher_VD.shape[0]:
        raise ValueError(f"student vocab {weight_student_VD.shape[0]} != "
                         f"teacher vocab {weight_teacher_VD.shape[0]}")
    if h_student_ND.shape[0] != h_teacher_ND.shape[0] or mask_N.numel() != h_student_ND.shape[0]:
        raise ValueError(f"rows differ: student {h_student_ND.shape[0]}, teacher {h_teacher_ND.shape[0]}, "
                         f"mask {mask_N.numel()}")
    mask_N = mask_N.reshape(-1).bool()
    total = h_student_ND.new_zeros((), dtype=torch.float32)
    for s in range(0, h_student_ND.shape[0], chunk_size):
        e = s + chunk_size
        total = total + torch.utils.checkpoint.checkpoint(
            _kd_chunk_sum, h_student_ND[s:e], weight_student_VD, h_teacher_ND[s:e], weight_teacher_VD,
            mask_N[s:e], divergence, temperature, use_reentrant=False)
    return total / mask_N.sum().clamp(min=1)
