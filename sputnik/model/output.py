"""ModelOutput: what every model's forward returns (DeepSeek-V3 `Transformer` and dense `LlamaModel`).

Lives in its own file so both model files import it without importing each other.
Shape legend: B batch, T time, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class ModelOutput:
    """With targets: loss = ce_loss + lambda * mtp_loss + aux_loss (scalars), num_tokens = count of
    non-ignored targets, logits None. Without targets: logits_BTV in `logits`. From hidden_states():
    h_BTD after the final norm in `hidden`. Always: expert_load {MoE layer prefix: tokens routed to
    each expert [E] in this forward, valid positions only} (empty for dense models), which the
    trainer sums over a step for the aux-loss-free bias update (train/balance.py)."""

    loss: Optional[torch.Tensor] = None
    ce_loss: Optional[torch.Tensor] = None
    mtp_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    num_tokens: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    expert_load: dict = field(default_factory=dict)
