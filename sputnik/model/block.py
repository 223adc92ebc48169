"""One pre-norm decoder block of DeepSeek-V3: MLA, then a dense SwiGLU or a DeepSeekMoE layer.

Shape legend: B batch, T time, D hidden_size.
Used for the main layers and, by subclassing, for the multi-token-prediction modules (mtp.py),
whose checkpoint keys are a block's keys plus four extras. The decode path runs the same math on
token rows over weight copies (inference/deepseek.py: decode_block).
"""
from __future__ import annotations

import torch
from torch import nn

from sputnik.model.config import ModelConfig
from sputnik.model.layers import MLP, RMSNorm, real_token_rows
from sputnik.model.mla import MLA
from sputnik.model.moe import MoE, Routing


class Block(nn.Module):
    """h = h + MLA(RMSNorm(h));  h = h + FFN(RMSNorm(h)),  FFN = MLP if layer < first_k_dense_replace
    else MoE (V3 §4.2: "all FFNs except for the first three layers"). HF key names."""

    def __init__(self, config: ModelConfig, layer_idx: int, moe: bool | None = None):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(D, eps)
        use_moe = config.is_moe_layer(layer_idx) if moe is None else moe
        self.mlp = MoE(config) if use_moe else MLP(D, config.intermediate_size)

    def forward(self, h_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid_BT: torch.Tensor | None = None,
                attend=None) -> tuple[torch.Tensor, Routing | None]:
        """-> (h_BTD, the MoE layer's Routing or None for a dense FFN). valid_BT: the real tokens of a
        right-padded batch (expert load; on a CPU the block computes those rows only and returns 0 at
        the padding); attend: the attention over q, k, v (MLA.forward)."""
        rows_N = real_token_rows(valid_BT, h_BTD) if attend is None and cos.dim() == 3 else None
        if rows_N is not None:
            return self.forward_rows(h_BTD, cos, sin, valid_BT, rows_N)
        h_BTD = h_BTD + self.self_attn(self.input_layernorm(h_BTD), cos, sin, attend)
        x_BTD = self.post_attention_layernorm(h_BTD)
        if isinstance(self.mlp, MoE):
            y_BTD, routing = self.mlp(x_BTD, valid_BT)
            return h_BTD + y_BTD, routing
        return h_BTD + self.mlp(x_BTD), None

    def forward_rows(self, h_BTD, cos, sin, valid_BT, rows_N) -> tuple[torch.Tensor, Routing | None]:
        """The block on the real tokens rows_N of a right-padded batch: every per-token layer (norms,
        projections, FFN) on N rows instead of B·T; only the attention sees the [B, T] layout."""
        B, T, D = h_BTD.shape
        h_ND = h_BTD.reshape(B * T, D).index_select(0, rows_N)
        h_ND = h_ND + self.self_attn.forward_rows(self.input_layernorm(h_ND), cos, sin, rows_N, B, T)
        x_ND = self.post_attention_layernorm(h_ND)
        if isinstance(self.mlp, MoE):
            y_ND, routing = self.mlp.forward_rows(x_ND, valid_BT, rows_N)
        else:
            y_ND, routing = self.mlp(x_ND), None
        out_ND = h_ND + y_ND
        return out_ND.new_zeros(B * T, D).index_copy(0, rows_N, out_ND).view(B, T, D), routing
