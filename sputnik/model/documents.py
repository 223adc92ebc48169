"""Document-masked attention for packed pretraining windows: a token attends only to the earlier tokens
of its own document, not to the end of the document before it in the same window (Llama 3's
pretraining recipe; nanoGPT-style packing attends across the boundary).

Shape legend: B batch, T time, H heads, K qk head dim, V value head dim.

Documents are found from the ids alone: the stream is doc_1 <eot> doc_2 <eot> ... (data.py), so a new
document starts after every end-of-text token. Positions stay the window's: RoPE's scores depend only
on the distance between two tokens of the same document, which is the same wherever the document
starts, so no position reset is needed (the model's logits for a document equal those of the
document alone, tested).
"""
from __future__ import annotations

import torch

from sputnik.model.layers import attention_sdpa, block_causal_attention, blocked_attention_applies


def document_ids(ids_BT: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Index of the document each token belongs to [B, T] (int64); an end-of-text token ends its own."""
    is_end_BT = (ids_BT == eot_id).long()
    return is_end_BT.cumsum(1) - is_end_BT


def document_attention(documents_BT: torch.Tensor):
    """The attention hook (MLA.forward's and LlamaAttention.forward's `attend`) for causal attention
    within each document. CPU fp32 training (as MLA.causal_attention) with as many key as query heads:
    the blocked matmuls of layers.py, which skip the key blocks wholly before every query's document;
    otherwise SDPA with one boolean mask [B, 1, T, T] for every layer and head, which computes the
    full causal square and masks it."""
    mask_B1TT = None  # built on first use by the SDPA path

    def attend(attn, q_BHTK, k_BGTK, v_BGTV):
        nonlocal mask_B1TT
        B, H, T, K = q_BHTK.shape
        if blocked_attention_applies(q_BHTK) and k_BGTK.shape[1] == H:
            scale = getattr(attn, "scale", None) or K ** -0.5
            o_GTV = block_causal_attention(q_BHTK.reshape(B * H, T, K), k_BGTK.reshape(B * H, T, K),
                                           v_BGTV.reshape(B * H, T, -1), scale, documents_BT=documents_BT)
            return o_GTV.view(B, H, T, -1)
        if mask_B1TT is None:
            causal_TT = torch.ones(T, T, dtype=torch.bool, device=documents_BT.device).tril()
            mask_B1TT = ((documents_BT[:, :, None] == documents_BT[:, None, :]) & causal_TT)[:, None]
        return attention_sdpa(attn, q_BHTK, k_BGTK, v_BGTV, mask=mask_B1TT)
    return attend
