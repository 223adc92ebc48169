"""Multi-token prediction (DeepSeek-V3 §2.2, eqs. 21–25): sequential modules that predict the
token k+1 steps ahead while keeping the causal chain.

Shape legend: B batch, T time, D hidden_size, V vocab, F = qk_rope_head_dim / 2.

Module k (k = 1..D) at position i (0-based):
    h'_i = M_k · [ enorm(Emb(t_{i+k})) ; hnorm(h^{k−1}_i) ]      # embedding FIRST, as in the
                                                                 # released weights (HF, vLLM)
    h^k  = TRM_k(h')                                             # one full decoder block, causal
    P^k_i = softmax(W_head · shared_head.norm(h^k_i))            # predicts t_{i+k+1} = targets[i+k]
h^0 is the main model's hidden state AFTER its final norm (HF/vLLM convention, §3.1).
Only positions i < T − k have both an input token and a target, so module k runs on the
shortened sequence of length T − k (exactly the paper's "1 … T−k"); causal attention makes this
equal to running all T positions and masking the tail, at less cost.

Checkpoint keys: a module's own keys are `enorm`, `hnorm`, `eh_proj` [D, 2D], `shared_head.norm`,
plus a decoder block's keys; export puts them at `model.layers.{num_hidden_layers + k − 1}` and
adds copies of the shared `embed_tokens` and `lm_head` (hf.py). Embedding and head are passed in,
never owned, so the optimizer sees each shared matrix once. As a draft head for self-speculative
decoding (V3 §5.4.3) the module runs through inference/deepseek.py.
"""
from __future__ import annotations

import torch
from torch import nn

from sputnik.model.block import Block
from sputnik.model.config import ModelConfig
from sputnik.model.layers import RMSNorm
from sputnik.model.moe import Routing


class MTPModule(Block):
    """MTP depth `depth`: the decoder block of layer index num_hidden_layers + depth − 1 plus the
    input merge (enorm, hnorm, eh_proj) and its own output norm (shared_head.norm)."""

    def __init__(self, config: ModelConfig, depth: int):
        L = config.num_hidden_layers
        # MoE iff the main model's deep layers are MoE (V3's MTP block is an MoE block).
        super().__init__(config, layer_idx=L + depth - 1, moe=config.first_k_dense_replace < L)
        D, eps = config.hidden_size, config.rms_norm_eps
        self.depth = depth
        self.enorm = RMSNorm(D, eps)
        self.hnorm = RMSNorm(D, eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = nn.Module()  # a container, so the key reads `shared_head.norm.weight`
        self.shared_head.norm = RMSNorm(D, eps)

    def forward(self, h_prev_BTD: torch.Tensor, emb_next_BTD: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, valid_BT: torch.Tensor | None = None, attend=None) -> tuple[torch.Tensor, Routing | None]:
        """h^k from h^{k−1} (same positions) and Emb(t_{i+k}); returns the block output (before
        shared_head.norm), which is also the next depth's h^{k}, and the block's MoE routing.
        attend: the block's attention hook (documents.py's, in a document-masked window)."""
        merged_BT2D = torch.cat([self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)], dim=-1)
        return super().forward(self.eh_proj(merged_BT2D), cos, sin, valid_BT, attend)

    def head_input(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """What the shared lm_head multiplies: shared_head.norm(h^k)."""
        return self.shared_head.norm(h_BTD)
