"""Decoupled rotary position embedding for MLA: frequencies (default or YaRN), cos/sin tables,
and the DeepSeek interleaved-pair rotation.

Shape legend: B batch, T time, H heads (1 for the shared rope key), R qk_rope_head_dim,
F = R/2 rotation frequencies, P positions in the table.

Convention (reference §1.3). DeepSeek rotates ADJACENT pairs (x_2j, x_2j+1) by angle pos·inv_freq_j
(the reference code views the rope slice as complex numbers). transformers with
`rope_interleave=True` computes the same rotation but writes the result de-interleaved,
[x_even·cos − x_odd·sin ; x_odd·cos + x_even·sin]. We do the same: q and k receive the same fixed
permutation, so q·k and hence every logit equal DeepSeek's and HF's, and our cached k_R equals HF's
cached `k_rot` element for element. Export therefore writes `rope_interleave: true`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sputnik.model.config import ModelConfig


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1·m·ln(s) + 1 (1 when s <= 1); V3 §4.3."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """inv_freq_F (fp32) and the cos/sin amplitude factor.

    default: inv_freq_j = θ^(−2j/R).
    yarn:    corr(n) = R·ln(L0/(2πn)) / (2 ln θ); low = max(floor(corr(β_fast)), 0),
             high = min(ceil(corr(β_slow)), R−1); ramp_j = clamp((j − low)/(high − low), 0, 1);
             inv_freq_j = θ^(−2j/R) · (ramp_j / s + (1 − ramp_j))   (low j: extrapolate, high j: interpolate)
             amplitude = mscale(s, mscale) / mscale(s, mscale_all_dim)   (1.0 for V3).
    Written to reproduce transformers' `_compute_yarn_parameters` operation for operation (fp32).
    """
    R, theta = config.qk_rope_head_dim, config.rope_theta
    pos_freqs_F = theta ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
    if config.rope_type == "default":
        return 1.0 / pos_freqs_F, 1.0
    s, L0 = config.rope_factor, config.original_max_position_embeddings
    # HF treats a zero beta as "unset" and falls back to the paper's 32 / 1.
    beta_fast, beta_slow = config.beta_fast or 32.0, config.beta_slow or 1.0

    def corr(n_rot: float) -> float:
        return R * math.log(L0 / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), R - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp, as HF does
    ramp_F = ((torch.arange(R // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_F = 1 - ramp_F  # weight of the original (unscaled) frequency
    inv_freq_F = (1.0 / (s * pos_freqs_F)) * (1 - extrapolation_F) + (1.0 / pos_freqs_F) * extrapolation_F
    if config.mscale and config.mscale_all_dim:
        amplitude = yarn_get_mscale(s, config.mscale) / yarn_get_mscale(s, config.mscale_all_dim)
    else:
        amplitude = yarn_get_mscale(s)
    return inv_freq_F, float(amplitude)


def softmax_scale(config: ModelConfig) -> float:
    """s = (d_h + d_h^R)^−1/2, times mscale(s, mscale_all_dim)² under YaRN (§1.4; 0.1352 for V3)."""
    scale = config.qk_head_dim ** -0.5
    if config.rope_type != "default" and config.mscale_all_dim:
        m = yarn_get_mscale(config.rope_factor, config.mscale_all_dim)
        scale = scale * m * m
    return scale


class RotaryTables(nn.Module):
    """cos/sin tables [P, F] for every position up to max_position_embeddings, kept in fp32.

    One instance per model, shared by all layers and the MTP modules. Buffers are non-persistent
    (recomputed from the config, never stored in a checkpoint, as in HF). `forward` casts to the
    activation dtype the way HF does (cos/sin computed in fp32, then cast before the multiply).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        cos_PF, sin_PF = self._tables(config.max_position_embeddings)
        self.register_buffer("cos_PF", cos_PF, persistent=False)
        self.register_buffer("sin_PF", sin_PF, persistent=False)

    def _tables(self, num_positions: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq_F, amplitude = rope_frequencies(self.config)
        pos_P = torch.arange(num_positions, dtype=torch.float32, device=device)
        # Same fp32 product as HF's `position_ids.float() * inv_freq` (bit-equal angles).
        angle_PF = pos_P[:, None] * inv_freq_F.to(device)[None, :]
        return angle_PF.cos() * amplitude, angle_PF.sin() * amplitude

    def reset(self) -> None:
        """Recompute the tables in place (after `to_empty()` from the meta device, say)."""
        cos_PF, sin_PF = self._tables(self.cos_PF.shape[0], device=self.cos_PF.device)
        self.cos_PF.copy_(cos_PF)
        self.sin_PF.copy_(sin_PF)

    def forward(self, positions: torch.Tensor | int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: an int T (positions 0..T−1, training) or a tensor [B, T] (cached decode).
        Returns cos, sin shaped to broadcast against x_BTHR: [T, 1, F] or [B, T, 1, F]."""
        num = self.cos_PF.shape[0]
        if isinstance(positions, int):
            if positions > num:
                raise ValueError(f"sequence length {positions} > max_position_embeddings={num}")
            cos, sin = self.cos_PF[:positions], self.sin_PF[:positions]
        else:
            cos, sin = self.cos_PF[positions], self.sin_PF[positions]  # caller checked the range
        return cos.unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype)


def apply_rope(x_BTHR: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x_2j, x_2j+1) by angle_j; write [rotated evens ; rotated odds].

    out[..., j]     = x_2j·cos_j − x_2j+1·sin_j
    out[..., F + j] = x_2j+1·cos_j + x_2j·sin_j
    Identical arithmetic to HF `apply_rotary_pos_emb_interleave` (cos/sin: [T,1,F] or [B,T,1,F]).
    """
    x_even, x_odd = x_BTHR[..., 0::2], x_BTHR[..., 1::2]
    return torch.cat([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], dim=-1)
