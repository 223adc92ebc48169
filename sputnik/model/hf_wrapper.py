"""Any Hugging Face causal LM behind our model contract, so the stages, evaluation and the engine treat
it like ours: forward(ids, targets) -> ModelOutput (mean CE over non-ignored targets; no MTP, no
balance loss), hidden_states(ids) -> ModelOutput(hidden=...), lm_head, and an empty expert load.
The engine decodes it through its own KV cache (inference/hf_cache.py).

Shape legend: B batch, T time, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sputnik.model.output import ModelOutput


class HFCausalLM(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                valid_BT: torch.Tensor | None = None, documents_BT: torch.Tensor | None = None) -> ModelOutput:
        if documents_BT is not None:
            raise ValueError(f"document_mask: {type(self.hf).__name__} runs through transformers, whose forward takes "
                             "no document mask here; use one of Sputnik's own model families")
        logits_BTV = self.hf(input_ids=input_ids_BT).logits
        if targets_BT is None:
            return ModelOutput(logits=logits_BTV)
        num_tokens = (targets_BT != -100).sum()
        ce_sum = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=-100, reduction="sum")
        ce = ce_sum / num_tokens.clamp(min=1)
        zero = ce.new_zeros(())
        return ModelOutput(loss=ce, ce_loss=ce.detach(), mtp_loss=zero, aux_loss=zero, num_tokens=num_tokens)

    def hidden_states(self, input_ids_BT: torch.Tensor, valid_BT: torch.Tensor | None = None) -> ModelOutput:
        """`hidden`: the last hidden state (after the model's final norm, what the head multiplies)."""
        return ModelOutput(hidden=self.hf(input_ids=input_ids_BT, output_hidden_states=True).hidden_states[-1])

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def update_expert_bias(self, load: dict) -> None:
        """No experts of ours to balance (a transformers MoE balances with its own aux loss)."""
