"""Decoding the dense Llama family (model/llama.py) over a preallocated KV cache: the model's own forward
with an attention hook that writes each layer's new keys and values at every row's own positions and
attends over the row's cache. The engine's cached-model contract (decoders.py) for this architecture.

Shape legend: L layers, B rows, T new tokens, S cache slots, K key/value heads, H query heads, C head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sputnik.inference.llama_decode import MAX_ROWS, decode_weights, fused_prefill, fused_step
from sputnik.model.llama import LlamaModel
from sputnik.model.routing_replay import tape_active


def visible_slots(pos_BT: torch.Tensor, num_slots: int, window: int) -> torch.Tensor:
    """[B, T, S] bool: which cache slots the new token at pos_BT[b, t] attends to, slot ≤ its position
    and, with a sliding window (Mistral), slot > position − window. Slots past a row's own length
    (padding, stale forks, a static buffer's tail) are never visible."""
    slot_S = torch.arange(num_slots, device=pos_BT.device)
    visible_BTS = slot_S <= pos_BT[:, :, None]
    if window:
        visible_BTS &= slot_S > pos_BT[:, :, None] - window
    return visible_BTS


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

    # --- what a static cache needs (graphs.GraphDecoder): shape, a zeroed twin, in-place row moves
    @property
    def rows_and_length(self) -> tuple[int, int]:
        return self.k_LBKSC.shape[1], self.k_LBKSC.shape[3]

    def compatible(self, other: "KVCache") -> bool:
        a, b = self.k_LBKSC, other.k_LBKSC
        return a.shape[0] == b.shape[0] and a.shape[2] == b.shape[2] and a.shape[4] == b.shape[4] and \
            a.dtype == b.dtype and a.device == b.device

    def zeros_like(self, rows: int, length: int) -> "KVCache":
        L, _, K, _, C = self.k_LBKSC.shape
        z = lambda: torch.zeros(L, rows, K, length, C, dtype=self.k_LBKSC.dtype, device=self.k_LBKSC.device)  # noqa: E731
        return KVCache(z(), z())

    def write_front(self, other: "KVCache") -> None:
        B, S = other.rows_and_length
        self.k_LBKSC[:, :B, :, :S].copy_(other.k_LBKSC)
        self.v_LBKSC[:, :B, :, :S].copy_(other.v_LBKSC)

    def keep_front(self, rows_R: torch.Tensor) -> None:
        R = rows_R.shape[0]
        self.k_LBKSC[:, :R] = self.k_LBKSC.index_select(1, rows_R)
        self.v_LBKSC[:, :R] = self.v_LBKSC.index_select(1, rows_R)

    def first_rows(self, rows: int, copy: bool = False) -> "KVCache":
        k, v = self.k_LBKSC[:, :rows], self.v_LBKSC[:, :rows]
        return KVCache(k.clone(), v.clone()) if copy else KVCache(k, v)

    @staticmethod
    def concat(caches: list["KVCache"]) -> "KVCache":
        """Stack the rows of several caches (same layers, heads and max_len) into one: the server's
        scheduler joins a freshly prefilled request to the running batch this way."""
        if not caches:
            raise ValueError("KVCache.concat: no caches")
        return KVCache(torch.cat([c.k_LBKSC for c in caches], dim=1), torch.cat([c.v_LBKSC for c in caches], dim=1))


def static_step(model: LlamaModel, tok_B: torch.Tensor, cache: KVCache, cache_seqlens_B: torch.Tensor,
                weights=None) -> torch.Tensor:
    """logits_BV of one new token per row at position cache_seqlens_B[b], attending over the whole
    buffer under a mask (slots past the row's position hidden): shapes depend only on (B, cache length)
    and nothing syncs with the host, so the step can be compiled for static shapes or captured into a
    CUDA graph (graphs.GraphDecoder). The same math as forward_cached, which reads only the written
    prefix. Padding rows (length 0) write only their own slot 0."""
    B, dev = tok_B.shape[0], tok_B.device
    pos_B1 = cache_seqlens_B.to(dev, torch.long)[:, None]
    mask_B11S = visible_slots(pos_B1, cache.max_len, model.config.sliding_window)[:, None]
    rows_B = torch.arange(B, device=dev)

    def attend(attn, q_BH1C, k_BK1C, v_BK1C):
        k_BKSC, v_BKSC = cache.k_LBKSC[attn.layer_idx], cache.v_LBKSC[attn.layer_idx]
        k_BKSC[rows_B, :, pos_B1[:, 0]] = k_BK1C[:, :, 0].to(k_BKSC.dtype)
        v_BKSC[rows_B, :, pos_B1[:, 0]] = v_BK1C[:, :, 0].to(v_BKSC.dtype)
        return F.scaled_dot_product_attention(q_BH1C, k_BKSC.to(q_BH1C.dtype), v_BKSC.to(q_BH1C.dtype),
                                              attn_mask=mask_B11S, enable_gqa=attn.gqa)

    h_B1D = model.hidden_states(tok_B[:, None], positions=pos_B1, attend=attend).hidden
    return model.lm_head(h_B1D[:, 0])


def _c_readable(cache: KVCache) -> bool:
    """Whether llama_step.c can write this cache in place: fp32, contiguous (a view of a static cache's
    first rows is not; those decode through torch), and no routing tape active (RL's routing replay
    records or replays a sparse layer's experts through the router's Python call)."""
    k, v = cache.k_LBKSC, cache.v_LBKSC
    return (k.dtype == v.dtype == torch.float32 and k.is_contiguous() and v.is_contiguous() and k.is_cpu
            and not tape_active())


class LlamaCachedModel:
    """The cached-model contract over the dense `LlamaModel` (every family): its own forward, a KV cache, no derived weights."""

    name = "llama"
    static_step = staticmethod(static_step)  # the capturable step (graphs.GraphDecoder)

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
        logits_at_B: only the logits of new token logits_at_B[b] of each row, [B, V].
        fp32 on a CPU with the kernels built: through the C forward (llama_decode.py), same values."""
        B, T = input_ids_BT.shape
        dev = input_ids_BT.device
        pos_BT = cache_seqlens_B.to(dev, torch.long)[:, None] + torch.arange(T, device=dev)
        S = int(pos_BT[:, -1].max()) + 1  # attend over the used prefix only, not all S_max slots
        if S > cache.max_len:
            raise ValueError(f"cache overflow: a row needs {S} slots, cache holds {cache.max_len}")
        weights = decode_weights(self.model) if _c_readable(cache) else None
        if weights is not None:  # the whole prefill in C calls (llama_decode.py)
            return fused_prefill(weights, input_ids_BT, cache.k_LBKSC, cache.v_LBKSC, cache_seqlens_B, logits_at_B)
        # Mistral's window: the cache keeps every slot, attention reads the last W
        mask_B1TS = visible_slots(pos_BT, S, self.model.config.sliding_window)[:, None]
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

    def step_weights(self):
        """The C step's table of the model's weights (llama_decode.py), or None where it cannot run:
        nothing is derived, the step reads the parameters in place."""
        return decode_weights(self.model)

    def step(self, tok_B: torch.Tensor, cache: KVCache, cache_seqlens_B: torch.Tensor, weights=None,
             step_fn=None) -> torch.Tensor:
        """With step_weights() (fp32 on a CPU), the whole step in one C call (llama_decode.py); else
        eagerly, forward_cached over the written prefix; `step_fn`, a compiled static_step, reads the
        whole buffer."""
        if (weights is not None and step_fn is None and tok_B.shape[0] <= MAX_ROWS and not torch.is_grad_enabled()
                and _c_readable(cache)):
            return fused_step(weights, tok_B, cache.k_LBKSC, cache.v_LBKSC, cache_seqlens_B)
        if step_fn is not None:
            if int(cache_seqlens_B.max()) >= cache.max_len:
                raise ValueError(f"cache overflow: a row needs {int(cache_seqlens_B.max()) + 1} slots, "
                                 f"cache holds {cache.max_len}")
            return step_fn(self.model, tok_B, cache, cache_seqlens_B, weights)
        return self.forward_cached(tok_B[:, None], cache, cache_seqlens_B)[:, -1]
