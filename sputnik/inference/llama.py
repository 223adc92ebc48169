"""Decoding the dense Llama family (model/llama.py) over a preallocated KV cache: the model's own forward
with an attention hook that writes each layer's new keys and values at every row's own positions and
attends over the row's cache. The engine's cached-model contract (decoders.py) for this architecture.

Shape legend: L layers, B rows, T new tokens, S cache slots, K key/value heads, H query heads, C head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sputnik.model.llama import LlamaModel


@dataclass
class KVCache:
    """Preallocated keys/values of all layers, [L, B, K, S_max, C]; layer l's view is [B, K, S_max, C].
    One allocation per tensor so `select` (fork/compaction in the engine) is one gather."""

    k_LBKSC: torch.Tensor
    v_LBKSC: torch.Tensor

    def select(self, rows: torch.Tensor) -> "KVCache":
        """Keep/repeat batch rows (a copy: forked rows must not share slots)."""
        return KVCache(self.k_LBKSC[:, rows], self.v_LBKSC[:, rows])

    @property
    def max_len(self) -> int:
        return self.k_LBKSC.shape[3]

    @staticmethod
    def concat(caches: list["KVCache"]) -> "KVCache":
        """Stack the rows of several caches (same layers, heads and max_len) into one: the server's
        scheduler joins a freshly prefilled request to the running batch this way."""
        if not caches:
            raise ValueError("KVCache.concat: no caches")
        return KVCache(torch.cat([c.k_LBKSC for c in caches], dim=1), torch.cat([c.v_LBKSC for c in caches], dim=1))


class LlamaCachedModel:
    """The cached-model contract over the dense `LlamaModel` (every family): its own forward, a KV cache, no derived weights."""

    name = "llama"

    def __init__(self, model: LlamaModel):
        self.model = model

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """Zeroed K/V for `batch` rows of up to `max_len` tokens (dtype/device default to the weights')."""
        c, w = self.model.config, self.model.lm_head.weight
        dtype, device = dtype or w.dtype, device or w.device
        if max_len > c.max_position_embeddings:
            raise ValueError(f"max_len={max_len} > max_position_embeddings={c.max_position_embeddings}")
        shape = (c.num_hidden_layers, batch, c.kv_heads, max_len, c.attention_head_dim)
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @torch.no_grad()
    def forward_cached(self, input_ids_BT: torch.Tensor, cache: KVCache, cache_seqlens_B: torch.Tensor,
                       logits_at_B: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] of T new tokens per row; row b's tokens take positions
        cache_seqlens_B[b] + 0..T−1 (ragged rows allowed) and attend to everything before them.
        Slots past a row's own length (padding, stale forks) are masked, never read.
        logits_at_B: only the logits of new token logits_at_B[b] of each row, [B, V]."""
        B, T = input_ids_BT.shape
        dev = input_ids_BT.device
        pos_BT = cache_seqlens_B.to(dev, torch.long)[:, None] + torch.arange(T, device=dev)
        S = int(pos_BT[:, -1].max()) + 1  # attend over the used prefix only, not all S_max slots
        if S > cache.max_len:
            raise ValueError(f"cache overflow: a row needs {S} slots, cache holds {cache.max_len}")
        slot_S = torch.arange(S, device=dev)
        mask_BTS = slot_S <= pos_BT[:, :, None]
        if window := self.model.config.sliding_window:  # Mistral: the cache keeps every slot, attention the last W
            mask_BTS &= slot_S > pos_BT[:, :, None] - window
        mask_B1TS = mask_BTS[:, None]
        rows_B1 = torch.arange(B, device=dev)[:, None]

        def attend(attn, q_BHTC, k_BKTC, v_BKTC):
            k_cache_BKSC, v_cache_BKSC = cache.k_LBKSC[attn.layer_idx], cache.v_LBKSC[attn.layer_idx]
            # Advanced indices on dims 0 and 2 around a slice: the indexed view is [B, T, K, C].
            k_cache_BKSC[rows_B1, :, pos_BT] = k_BKTC.transpose(1, 2).to(k_cache_BKSC.dtype)
            v_cache_BKSC[rows_B1, :, pos_BT] = v_BKTC.transpose(1, 2).to(v_cache_BKSC.dtype)
            k_BKSC, v_BKSC = k_cache_BKSC[:, :, :S].to(q_BHTC.dtype), v_cache_BKSC[:, :, :S].to(q_BHTC.dtype)
            return F.scaled_dot_product_attention(q_BHTC, k_BKSC, v_BKSC, attn_mask=mask_B1TS, enable_gqa=attn.gqa)

        h_BTD = self.model.hidden_states(input_ids_BT, positions=pos_BT, attend=attend).hidden
        if logits_at_B is not None:
            h_BTD = h_BTD[torch.arange(B, device=dev), logits_at_B]  # [B, D]
        return self.model.lm_head(h_BTD)

    def step_weights(self) -> None:
        return None  # decodes through the model's own modules: nothing derived

    def step(self, tok_B: torch.Tensor, cache: KVCache, cache_seqlens_B: torch.Tensor, weights=None,
             step_fn=None) -> torch.Tensor:
        return self.forward_cached(tok_B[:, None], cache, cache_seqlens_B)[:, -1]
