"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1), the naive (expanded) form used for
training and scoring. Decoding runs the weight-absorbed form over a compressed latent cache
(inference/mla_decode.py): absorbing W_UK and W_UV makes attention an MQA over C + R numbers a cached
token, which pays when one query meets many cached keys; when queries and keys are the same T tokens
(training) the expanded per-head K-dim scores are cheaper (§1.6), so both forms stay.

Shape legend: B batch, T tokens, D hidden_size, H heads, N qk_nope_head_dim, R qk_rope_head_dim,
K = N + R (qk head dim), V v_head_dim, Q q_lora_rank, C kv_lora_rank, F = R/2.

Module names equal transformers' `DeepseekV3Attention`, so state-dict keys are the HF keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sputnik.model.config import ModelConfig
from sputnik.model.layers import RMSNorm, block_causal_attention, blocked_attention_applies
from sputnik.model.rope import apply_rope, softmax_scale


class MLA(nn.Module):
    """Multi-head latent attention.

    c_Q = RMSNorm(W_DQ x); [q_C; q_R]_h = W_UQ c_Q (per head [nope | rope]); q_R ← RoPE(q_R)
    [c~; k_R] = W_DKV x; c_KV = RMSNorm(c~); k_R ← RoPE(k_R)  (one rope key shared by all heads)
    [k_C; v]_h = W_UKV c_KV;  k_h = [k_C,h ; k_R]
    o_h = softmax(s · q_h·k_hᵀ + causal) v_h;  out = W_O [o_1; …; o_H]
    s = K^−1/2 (× mscale² under YaRN).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        D, H = config.hidden_size, config.num_attention_heads
        self.H, self.N, self.R, self.V = H, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.C, self.q_lora_rank = config.kv_lora_rank, config.q_lora_rank
        K = self.N + self.R
        if self.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * K, bias=False)
        else:  # V2-Lite style: no query compression
            self.q_proj = nn.Linear(D, H * K, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.C + self.R, bias=False)
        self.kv_a_layernorm = RMSNorm(self.C, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.C, H * (self.N + self.V), bias=False)
        self.o_proj = nn.Linear(H * self.V, D, bias=False)
        self.scale = softmax_scale(config)
        # Pad V to K for SDPA: None = auto (pad where V < K, see causal_attention), True/False = force.
        self.pad_v: bool | None = None

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend=None) -> torch.Tensor:
        """Causal self-attention over the T tokens. cos/sin from RotaryTables ([T,1,F] for positions
        0..T−1, or [B,T,1,F] for given positions). attend(self, q_BHTK, k_BHTK, v_BHTV) -> o_BHTV
        replaces the causal attention (rl/shared_prompts.py: completions attending to a shared prompt)."""
        B, T, _ = x_BTD.shape
        q_BHTK, k_BHTK, v_BHTV = self.heads(*self.project(x_BTD, cos, sin))
        o_BHTV = self.causal_attention(q_BHTK, k_BHTK, v_BHTV) if attend is None else attend(self, q_BHTK, k_BHTK, v_BHTV)
        return self.o_proj(o_BHTV.transpose(1, 2).reshape(B, T, self.H * self.V))

    def forward_rows(self, x_ND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows_N: torch.Tensor,
                     B: int, T: int) -> torch.Tensor:
        """forward() for the real tokens of a right-padded [B, T] batch only: x_ND are its rows rows_N
        (flat indices, layers.real_token_rows), cos/sin the [T, 1, F] tables. Projections run on the N
        rows; q, k, v are laid out [B, H, T, ·] for the causal attention with zeros at the padding,
        which no real query sees (right padding, causal), and the output is gathered back to N rows."""
        pos_N = rows_N % T
        q_nope_NHN, q_rope_NHR, c_NC, k_rope_N1R = self.project(x_ND, cos[pos_N], sin[pos_N])
        n, H = x_ND.shape[0], self.H
        k_nope_NHN, v_NHV = self.kv_b_proj(c_NC).view(n, H, self.N + self.V).split([self.N, self.V], dim=-1)

        def padded_BHTX(x_NHX):
            return x_NHX.new_zeros(B * T, H, x_NHX.shape[-1]).index_copy(0, rows_N, x_NHX).view(B, T, H, -1).transpose(1, 2)
        q_BHTK = padded_BHTX(torch.cat([q_nope_NHN, q_rope_NHR], dim=-1))
        k_BHTK = padded_BHTX(torch.cat([k_nope_NHN, k_rope_N1R.expand(n, H, self.R)], dim=-1))
        o_BHTV = self.causal_attention(q_BHTK, k_BHTK, padded_BHTX(v_NHV))
        return self.o_proj(o_BHTV.transpose(1, 2).reshape(B * T, H * self.V).index_select(0, rows_N))

    def project(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """-> q_nope [B,T,H,N], q_rope [B,T,H,R] (rotated), the normed latent c_KV [B,T,C] and the
        rotated shared key k_R [B,T,1,R]: everything before attention. Any leading dims ([N, D] token
        rows with cos/sin [N, 1, F]: forward_rows)."""
        lead = x_BTD.shape[:-1]
        q_BTHK = (self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD))) if self.q_lora_rank > 0
                  else self.q_proj(x_BTD)).view(*lead, self.H, self.N + self.R)
        q_nope_BTHN, q_rope_BTHR = q_BTHK.split([self.N, self.R], dim=-1)
        q_rope_BTHR = apply_rope(q_rope_BTHR, cos, sin)
        c_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.C, self.R], dim=-1)
        c_BTC = self.kv_a_layernorm(c_BTC)  # the RMSNorm touches the latent only, never k_R
        k_rope_BT1R = apply_rope(k_rope_BTR.unsqueeze(-2), cos, sin)
        return q_nope_BTHN, q_rope_BTHR, c_BTC, k_rope_BT1R

    def heads(self, q_nope_BTHN, q_rope_BTHR, c_BTC, k_rope_BT1R):
        """Per-head q, k [B,H,T,N+R] and v [B,H,T,V] of the naive (expanded) form."""
        B, T, H = q_nope_BTHN.shape[:3]
        kv_BTHX = self.kv_b_proj(c_BTC).view(B, T, H, self.N + self.V)
        k_nope_BTHN, v_BTHV = kv_BTHX.split([self.N, self.V], dim=-1)
        q_BHTK = torch.cat([q_nope_BTHN, q_rope_BTHR], dim=-1).transpose(1, 2)
        k_BHTK = torch.cat([k_nope_BTHN, k_rope_BT1R.expand(B, T, H, self.R)], dim=-1).transpose(1, 2)
        return q_BHTK, k_BHTK, v_BTHV.transpose(1, 2)

    def causal_attention(self, q_BHTK, k_BHTK, v_BHTV) -> torch.Tensor:
        """o_BHTV = softmax(s · q kᵀ + causal) v: blocked matmuls for short CPU training sequences,
        fused SDPA otherwise."""
        B, H, T, K = q_BHTK.shape
        if blocked_attention_applies(q_BHTK):
            # CPU training on short sequences: blocked matmuls beat the flash kernel (layers.py)
            o_GTV = block_causal_attention(q_BHTK.reshape(B * H, T, K), k_BHTK.reshape(B * H, T, K),
                                           v_BHTV.reshape(B * H, T, self.V), self.scale)
            return o_GTV.view(B, H, T, self.V)
        # Flash kernels (CUDA flash-attn, and the CPU flash kernel) want the value dim equal to the
        # qk dim; with V < K SDPA falls back to a slower kernel. Zero-padding V to K and slicing the
        # output is exact: the padded columns of p·v are p·0 = 0.
        pad = self.pad_v if self.pad_v is not None else self.V < K
        if pad and self.V != K:
            v_BHTV = F.pad(v_BHTV, (0, K - self.V))
        o_BHTV = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTV, is_causal=True, scale=self.scale)
        return o_BHTV[..., : self.V]
