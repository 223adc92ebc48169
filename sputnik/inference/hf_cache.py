"""The engine's cached-model contract (decoders.py) over any Hugging Face causal LM's own KV cache.

The engine prefills right-padded prompts with cache_seqlens = 0, then feeds one token per row at
its true position cache_seqlens[b]; a row's tokens at positions >= cache_seqlens[b] are stale
(padding, rejected drafts) and must be forgotten. A transformers `DynamicCache` instead appends
the same number of slots to every row, so the adapter keeps, per row and physical slot,
    pos_BS   the logical position written there,
    live_BS  whether that slot is still part of the row's sequence,
and feeds HF a 2-D attention mask (= live) plus explicit position_ids (= true positions). HF's
causal mask runs over physical slots, which is the right order: a slot written later never holds
an earlier position of the same row that is still live.

Shape legend: B rows, T new tokens, S physical cache slots, V vocab.
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn


class HFEngineCache:
    """A transformers DynamicCache plus the per-slot bookkeeping described above."""

    def __init__(self, kv, pos_BS: torch.Tensor, live_BS: torch.Tensor, max_len: int):
        self.kv, self.pos_BS, self.live_BS, self.max_len = kv, pos_BS, live_BS, max_len

    @classmethod
    def empty(cls, config, batch: int, max_len: int, device) -> "HFEngineCache":
        from transformers import DynamicCache

        pos = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(DynamicCache(config=config), pos, pos.bool(), max_len)

    def select(self, rows_R: torch.Tensor) -> "HFEngineCache":
        """Row r of the result is a copy of row rows_R[r]; this cache stays valid.
        `batch_select_indices` rebinds each layer's tensors (keys[idx] makes new ones), so it is run
        on shallow copies of the layer objects, never on ours."""
        kv = copy.copy(self.kv)
        kv.layers = [copy.copy(layer) for layer in self.kv.layers]
        kv.batch_select_indices(rows_R)
        return HFEngineCache(kv, self.pos_BS[rows_R], self.live_BS[rows_R], self.max_len)

    def num_slots(self) -> int:
        return self.pos_BS.shape[1]


class HFCachedModel:
    """A transformers causal LM (bare, or wrapped as model/hf_wrapper.HFCausalLM for training) behind the
    cached-model contract: new_cache / forward_cached / step through its own forward and KV cache."""

    name = "transformers"

    def __init__(self, hf_model: nn.Module):
        self.hf = hf_model
        self.config = hf_model.config
        # transformers renamed `past_key_values` to `cache` (the old name warns, then goes away);
        # models from before the rename, or remote code, take only the old one.
        self._cache_kwarg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> HFEngineCache:
        """dtype is the model's own (HF allocates K/V lazily in the activation dtype)."""
        device = device or next(self.hf.parameters()).device
        return HFEngineCache.empty(self.hf.config, batch, max_len, device)

    @torch.no_grad()
    def forward_cached(self, input_ids_BT: torch.Tensor, cache: HFEngineCache, cache_seqlens_B: torch.Tensor,
                       logits_at_B: torch.Tensor | None = None, return_hidden: bool = False):
        """Append T tokens per row at logical positions cache_seqlens[b] … +T−1 -> logits [B, T, V]
        (and the last hidden state, post final norm, if return_hidden); logits_at_B: row b's new
        token logits_at_B[b] only, [B, V]."""
        B, T = input_ids_BT.shape
        seqlens_B = cache_seqlens_B.to(cache.pos_BS.device).long()
        positions_BT = seqlens_B[:, None] + torch.arange(T, device=seqlens_B.device)
        if int(positions_BT.max()) >= cache.max_len:
            raise ValueError(f"cache overflow: a row needs position {int(positions_BT.max())}, cache holds {cache.max_len}")
        # Forget what the engine rolled back (pad slots of the prefill, rejected drafts): forever, so a
        # later write of the same position does not leave two live copies of it.
        cache.live_BS &= cache.pos_BS < seqlens_B[:, None]
        cache.pos_BS = torch.cat([cache.pos_BS, positions_BT], dim=1)
        cache.live_BS = torch.cat([cache.live_BS, torch.ones_like(positions_BT, dtype=torch.bool)], dim=1)
        out = self.hf(input_ids=input_ids_BT, attention_mask=cache.live_BS.long(), position_ids=positions_BT,
                      use_cache=True, output_hidden_states=return_hidden, **{self._cache_kwarg: cache.kv})
        cache.kv = out[self._cache_kwarg]  # the same object for DynamicCache; kept in case a model swaps it
        logits = out.logits
        if logits_at_B is not None:
            return logits[torch.arange(B, device=logits.device), logits_at_B]
        return (logits, out.hidden_states[-1]) if return_hidden else logits

    def step_weights(self) -> None:
        return None

    def step(self, tok_B: torch.Tensor, cache: HFEngineCache, cache_seqlens_B: torch.Tensor, weights=None,
             step_fn=None) -> torch.Tensor:
        return self.forward_cached(tok_B[:, None], cache, cache_seqlens_B)[:, -1]
