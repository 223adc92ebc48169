"""ModelOutput: what every model's forward returns (DeepSeek-V3 `Transformer` and dense `LlamaModel`).

Lives in its own file so both model files import it without importing each other.
Shape legend: B batch, T time, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ModelOutput:
    """With targets: loss = ce_loss + lambda * mtp_loss + aux_loss (scalars), num_tokens = count of
    non-ignored targets, logits None. Without targets: logits_BTV in `logits`, the rest None."""

    loss: Optional[torch.Tensor] = None
    ce_loss: Optional[torch.Tensor] = None
    mtp_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    num_tokens: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
