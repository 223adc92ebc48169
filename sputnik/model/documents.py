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
import torch.nn.functional as F


def document_ids(ids_BT: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Index of the document each token belongs to [B, T] (int64); an end-of-text token ends its own."""
    is_end_BT = (ids_BT == eot_id).long()
    return is_end_BT.cumsum(1) - is_end_BT


def document_attention(documents_BT: torch.Tensor):
    """The attention hook (MLA.forward's and LlamaAttention.forward's `attend`) for causal attention
    within each document: one boolean mask [B, 1, T, T] for every layer and head. The model's scale
    (MLA's, with YaRN's mscale) or SDPA's 1/√K; keys may have fewer heads than queries (GQA)."""
    T = documents_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=documents_BT.device).tril()
    mask_B1TT = ((documents_BT[:, :, None] == documents_BT[:, None, :]) & causal_TT)[:, None]

    def attend(attn, q_BHTK, k_BGTK, v_BGTV):
        K, V = q_BHTK.shape[-1], v_BGTV.shape[-1]
        if V < K:  # as MLA.causal_attention: SDPA's fast kernels want V == K; zero columns are exact
            v_BGTV = F.pad(v_BGTV, (0, K - V))
        o = F.scaled_dot_product_attention(q_BHTK, k_BGTK, v_BGTV, attn_mask=mask_B1TT, scale=getattr(attn, "scale", None),
                                           enable_gqa=k_BGTK.shape[1] != q_BHTK.shape[1])
        return o[..., :V]
    return attend
