"""Building blocks shared by the DeepSeek-V3 model and the dense families: RMSNorm, SwiGLU MLP, and
the linear layer whose decode-size calls take the C matrix-vector kernel.

Shape legend: B batch, T time, D hidden_size, I intermediate width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sputnik.kernels.cpu import LINEAR_MAX_ROWS, linear_rows, linear_rows_available
from sputnik.model import routing_replay


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except a few rows on a CPU without autograd (≤ 64 rows, fp32: decode steps, short
    prefills), which go to kernels/linear_rows.c: ~2x ATen's GEMV bandwidth at one row, 1.2-2x MKL's
    small-M GEMM at 16-64 rows on stop 25's Intel VM (0.5-0.8x on stop 32's AMD VM). Same values up
    to rounding; the torch path when the kernels are off or unbuilt, and for training (autograd)."""
    if (not torch.is_grad_enabled() and x.is_cpu and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() <= LINEAR_MAX_ROWS * x.shape[-1] and linear_rows_available()):
        return linear_rows(x, weight, bias)
    return F.linear(x, weight, bias)


def attention_sdpa(attn, q_BHTK: torch.Tensor, k_BGSK: torch.Tensor, v_BGSV: torch.Tensor, *,
                   mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """SDPA for an attention hook (MLA's or LlamaAttention's `attend`): the module's own scale (MLA's,
    with YaRN's mscale) or SDPA's 1/√K; keys/values may have fewer heads than the queries (GQA); a
    value dim V < K is zero-padded to K, as MLA.causal_attention does (SDPA's fast kernels want V == K;
    the padded columns of p·v are exactly 0), and the output sliced back to V."""
    K, V = q_BHTK.shape[-1], v_BGSV.shape[-1]
    if V < K:
        v_BGSV = F.pad(v_BGSV, (0, K - V))
    o = F.scaled_dot_product_attention(q_BHTK, k_BGSK, v_BGSV, attn_mask=mask, is_causal=is_causal,
                                       scale=getattr(attn, "scale", None), enable_gqa=k_BGSK.shape[1] != q_BHTK.shape[1])
    return o[..., :V]


def real_token_rows(valid_BT: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The flat row indices [N] of a right-padded batch's real tokens, so that per-token layers (the
    FFNs, the experts) skip the padding rows: a quarter of an SFT batch at the speedrun's lengths
    (LOG.md, stop 32). None = run on every row: no mask, no padding, a routing tape active (replayed
    routing is indexed by the rows of the router call), or where a data-dependent row count costs
    more than the padding rows (CUDA: a host sync; torch.compile: a graph per count). Also None when
    valid_BT is not a right padding (a False before a True in a row): the row path gives padding
    zero keys and values, which only a right padding hides from every real query (causal)."""
    if valid_BT is None:
        return None
    if valid_BT.shape != x.shape[:-1]:
        raise ValueError(f"valid_BT has shape {tuple(valid_BT.shape)}, the tokens of this forward are {list(x.shape[:-1])}")
    if not x.is_cpu or torch.compiler.is_compiling() or routing_replay.tape_active():
        return None
    if valid_BT.dim() == 2 and bool((valid_BT[:, 1:] & ~valid_BT[:, :-1]).any()):
        return None
    rows_N = valid_BT.reshape(-1).nonzero().squeeze(1)
    return None if rows_N.numel() == valid_BT.numel() else rows_N


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back before the weight,
    exactly as transformers' DeepseekV3RMSNorm/LlamaRMSNorm do (bit-level parity in fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases (HF key names)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Largest B·H·T² for the blocked CPU attention: it keeps ~half the T×T probabilities (≈ 32 MB here).
BLOCK_ATTENTION_MAX = 2 ** 24


def blocked_attention_applies(q_BHTK: torch.Tensor) -> bool:
    """CPU fp32 training on short sequences: the blocked matmuls below beat the flash kernel."""
    B, H, T, _ = q_BHTK.shape
    return (q_BHTK.device.type == "cpu" and q_BHTK.dtype == torch.float32 and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and B * H * T * T <= BLOCK_ATTENTION_MAX)


def document_starts(documents_BT: torch.Tensor) -> torch.Tensor:
    """The position where each token's document starts [B, T] (documents_BT: non-decreasing ids)."""
    T = documents_BT.shape[1]
    new_BT = torch.ones_like(documents_BT, dtype=torch.bool)
    new_BT[:, 1:] = documents_BT[:, 1:] != documents_BT[:, :-1]
    t_BT = torch.arange(T, device=documents_BT.device).expand_as(documents_BT)
    return torch.where(new_BT, t_BT, 0).cummax(dim=1).values


class _BlockCausalAttention(torch.autograd.Function):
    """o = softmax(q kᵀ·scale + causal mask) v over [G, T, ·] (G = batch·heads), one block of Q query rows
    at a time, each scoring only keys 0..end of its block: (1 + Q/T)/2 of the full T×T work. Keeps the
    block probabilities for backward (≈ G·T²/2 numbers), so it is meant for short sequences.

    With documents_BT (a packed window's document ids, G = B·H): a query sees only the earlier keys of
    its own document, and each block scores keys from the start of the earliest document among its
    queries (over the batch) only: the blocks before it, all cross-document, are skipped."""

    @staticmethod
    def forward(ctx, q_GTK, k_GTK, v_GTV, scale: float, block: int, documents_BT):
        G, T, _ = q_GTK.shape
        qs_GTK = q_GTK * scale  # scaling q once is cheaper than scaling every score block
        causal_QQ = torch.full((block, block), float("-inf"), dtype=q_GTK.dtype, device=q_GTK.device).triu(1)
        o_GTV, probs, firsts = v_GTV.new_empty(G, T, v_GTV.shape[-1]), [], []
        if documents_BT is not None:
            B, t_T = documents_BT.shape[0], torch.arange(T, device=q_GTK.device)
            first_keys = document_starts(documents_BT).amin(0).tolist()  # per query: the first key any row needs
        for s in range(0, T, block):
            e = min(s + block, T)
            f = 0 if documents_BT is None else first_keys[s]
            scores_GQS = torch.bmm(qs_GTK[:, s:e], k_GTK[:, f:e].transpose(1, 2))
            if documents_BT is None:
                scores_GQS[:, :, s:e] += causal_QQ[: e - s, : e - s]  # the diagonal block: mask later keys
            else:
                allowed_BQS = ((documents_BT[:, s:e, None] == documents_BT[:, None, f:e])
                               & (t_T[s:e, None] >= t_T[None, f:e]))
                scores_GQS.view(B, G // B, e - s, e - f).masked_fill_(~allowed_BQS[:, None], float("-inf"))
            p_GQS = torch.softmax(scores_GQS, dim=-1)
            o_GTV[:, s:e] = torch.bmm(p_GQS, v_GTV[:, f:e])
            probs.append(p_GQS)
            firsts.append(f)
        ctx.save_for_backward(qs_GTK, k_GTK, v_GTV, *probs)
        ctx.scale, ctx.block, ctx.firsts = scale, block, firsts
        return o_GTV

    @staticmethod
    def backward(ctx, grad_o_GTV):
        qs_GTK, k_GTK, v_GTV, *probs = ctx.saved_tensors
        grad_q_GTK = torch.empty_like(qs_GTK)
        grad_k_GTK, grad_v_GTV = torch.zeros_like(k_GTK), torch.zeros_like(v_GTV)
        for p_GQS, s, f in zip(probs, range(0, qs_GTK.shape[1], ctx.block), ctx.firsts):
            e = s + p_GQS.shape[1]
            grad_o_GQV = grad_o_GTV[:, s:e]
            _add_bmm_(grad_v_GTV[:, f:e], p_GQS.transpose(1, 2), grad_o_GQV)
            grad_p_GQS = torch.bmm(grad_o_GQV, v_GTV[:, f:e].transpose(1, 2))
            # softmax backward: ds = p ⊙ (dp − Σ_s p·dp)
            grad_s_GQS = torch._softmax_backward_data(grad_p_GQS, p_GQS, -1, p_GQS.dtype)
            grad_q_GTK[:, s:e] = torch.bmm(grad_s_GQS, k_GTK[:, f:e])
            _add_bmm_(grad_k_GTK[:, f:e], grad_s_GQS.transpose(1, 2), qs_GTK[:, s:e])
        return grad_q_GTK.mul_(ctx.scale), grad_k_GTK, grad_v_GTV, None, None, None


def _add_bmm_(acc_GXY: torch.Tensor, a_GXZ: torch.Tensor, b_GZY: torch.Tensor) -> None:
    """acc += a @ b per batch. On CPU, baddbmm_ into a non-contiguous slice (the first e < T rows of
    each [T, ·] matrix) falls back to one addmm_ per batch entry: 3x slower than a bmm and an add_
    at these sizes (99 vs 29 us, G = 64, e = 32; LOG.md stop 18), with bitwise-equal results."""
    if acc_GXY.is_contiguous():
        acc_GXY.baddbmm_(a_GXZ, b_GZY)
    else:
        acc_GXY.add_(torch.bmm(a_GXZ, b_GZY))


def block_causal_attention(q_GTK: torch.Tensor, k_GTK: torch.Tensor, v_GTV: torch.Tensor, scale: float,
                           block: int = 32, documents_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention for short sequences on CPU: plain batched matmuls that skip the masked half.
    Measured on tiny (G = 32, T = 256, K = 48, V = 32, 1 thread) fwd+bwd 25-30 ms vs 30-37 ms for the
    CPU flash kernel with V padded to K (which also computes the padding). Blocks of 96 were faster on
    the Intel VM of stop 18 (fwd+bwd, G = 64, 2 threads, ms at blocks 32 / 96: T = 74 2.67 / 1.88) and
    are slower on this AMD VM (T = 90 2.34 / 2.88, T = 128 4.26 / 4.34; LOG.md stop 32); another block
    also changes the pretraining's rounding, in which the tiny speedrun is chaotic (SFT 0.85 -> 0.45
    on one machine). documents_BT: attention within each document of a packed window (see the class)."""
    return _BlockCausalAttention.apply(q_GTK, k_GTK, v_GTV, scale, block, documents_BT)
