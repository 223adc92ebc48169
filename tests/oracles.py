"""Test-only reference implementations: the same math as a production path, written plainly, for the
tests to compare against (they used to live, unlabelled, in production code). Import them from a test
as `from oracles import ...` (tests/ is on sys.path under pytest).

rope_at(rope, positions_BT, dtype) -> (cos, sin): RoPE tables at per-row positions [B, T] (a model's
    RotaryTables, `model.rope`, accepts a [B, T] tensor of positions) -> [B, T, 1, F] each.

absorbed_mla_forward(mla, x_BTD, cos, sin, kv_BSX, positions_BT) -> out_BTD: Multi-head Latent
    Attention in its weight-absorbed form over a latent cache (DeepSeek-V2 §2.1.2), the way the
    papers write it, one einsum per step (what MLA._attend_absorbed + MLACache.prepare/update did):
      [c_KV; k_R] of the new tokens are written at their positions into the buffer kv_BSX (in place);
      q̃_h = W_UK,hᵀ q_C,h;  score_h,s = s·([q̃_h; q_R,h] · [c_s; k_R,s]), key s visible iff s <= position;
      z_h = Σ_s p_h,s c_s;  o_h = W_UV,h z_h;  out = W_O [o_1; …; o_H].
    inference/mla_decode.mla_decode computes the same with fused, pre-multiplied weights; the model's
    MLA.forward computes it in the expanded (naive) form. kv_BSX is one layer's buffer, e.g.
    MLACache(...).kv_BSX[layer]; rows are independent, so positions may be ragged across rows.

mtp_draft(model, h_BTD, next_ids_BT, depth=1) -> (logits_BTV, h_BTD): the uncached MTP draft head (what
    Transformer.draft did without a cache): MTP depth `depth` at positions 0..T−1 from h^{depth−1} and
    the tokens that follow, lm_head(shared_head.norm(h^depth)) and h^depth (feed it to depth + 1).
    DeepSeekCachedModel.draft (inference/deepseek.py) is the cached form of the same.

Shape legend: B rows, T new tokens, S cache positions, H heads, N nope dim, R rope dim, C latent dim,
V value dim, X = C + R, D model width.
"""
from __future__ import annotations

import torch


def rope_at(rope, positions_BT: torch.Tensor, dtype=torch.float32):
    """cos, sin of a RotaryTables at per-row positions [B, T] -> [B, T, 1, F] each."""
    return rope(positions_BT, dtype)


@torch.no_grad()
def absorbed_mla_forward(mla, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_BSX: torch.Tensor,
                         positions_BT: torch.Tensor) -> torch.Tensor:
    """Write the T new tokens of each row (at positions_BT[b, t]) into the cache buffer kv_BSX [B, S, C+R]
    (in place) and return their attention output [B, T, D]: token t of row b attends over that row's
    cached positions 0..positions_BT[b, t] (whatever was written there before, and its own row)."""
    B, T, _ = x_BTD.shape
    C = mla.C
    positions_BT = positions_BT.to(kv_BSX.device).long()
    S = int(positions_BT.max()) + 1
    if S > kv_BSX.shape[1]:
        raise ValueError(f"cache overflow: a row needs {S} positions, the buffer holds {kv_BSX.shape[1]}")
    q_nope_BTHN, q_rope_BTHR, c_BTC, k_rope_BT1R = mla.project(x_BTD, cos, sin)
    rows_BT = torch.arange(B, device=kv_BSX.device)[:, None].expand(B, T)
    kv_BSX[rows_BT, positions_BT] = torch.cat([c_BTC, k_rope_BT1R.squeeze(2)], dim=-1).to(kv_BSX.dtype)
    kv = kv_BSX[:, :S].to(q_nope_BTHN.dtype)
    w_HYC = mla.kv_b_proj.weight.view(mla.H, mla.N + mla.V, C)
    w_uk_HNC, w_uv_HVC = w_HYC[:, : mla.N], w_HYC[:, mla.N:]
    q_lat_BTHC = torch.einsum("bthn,hnc->bthc", q_nope_BTHN, w_uk_HNC)  # W_UK folded into the query
    scores_BTHS = (torch.einsum("bthc,bsc->bths", q_lat_BTHC, kv[..., :C])
                   + torch.einsum("bthr,bsr->bths", q_rope_BTHR, kv[..., C:])) * mla.scale
    keys_S = torch.arange(S, device=kv.device)
    visible_BT1S = (keys_S[None, None, :] <= positions_BT[:, :, None])[:, :, None]
    p_BTHS = scores_BTHS.masked_fill(~visible_BT1S, float("-inf")).softmax(-1, dtype=torch.float32)
    z_BTHC = torch.einsum("bths,bsc->bthc", p_BTHS.to(kv.dtype), kv[..., :C])
    o_BTHV = torch.einsum("bthc,hvc->bthv", z_BTHC, w_uv_HVC)  # W_UV folded into the output
    return mla.o_proj(o_BTHV.reshape(B, T, mla.H * mla.V))


@torch.no_grad()
def mtp_draft(model, h_BTD: torch.Tensor, next_ids_BT: torch.Tensor, depth: int = 1):
    """Uncached MTP draft at positions 0..T−1: (logits_BTV for t_{i+depth+1}, h^depth_BTD)."""
    module = model.mtp[depth - 1]
    cos, sin = model.rope(h_BTD.shape[1], h_BTD.dtype)
    h_next_BTD, _ = module(h_BTD, model.model.embed_tokens(next_ids_BT), cos, sin)
    return model.lm_head(module.head_input(h_next_BTD)), h_next_BTD
