"""Decoding our DeepSeek-V3 `Transformer` over its compressed latent cache: the model's forward on token
rows with the absorbed MLA (mla_decode.py), the inference FFN paths (moe_decode.py) and derived weight
copies (weights.py). Decode is bound by per-op overhead at small batch, not FLOPs, so the same math
runs in fewer, fused ops here; tests check every path against the model's forward.

`DeepSeekCachedModel` is the engine's cached-model contract for this architecture (decoders.py):
    cache = cm.new_cache(batch, max_len)
    logits = cm.forward_cached(ids_BT, cache, seqlens_B, logits_at_B=None, return_hidden=False)
    w = cm.step_weights();  logits_BV = cm.step(tok_B, cache, seqlens_B, w)
and, for self-speculative decoding, cm.draft(...) with the MTP module. `static_step` is the one-token
step with shapes that depend only on (batch, cache length): what graphs.py compiles and captures.

Shape legend: B rows, T new tokens a row, N = B·T token rows, D hidden, V vocab.
"""
from __future__ import annotations

import torch

from sputnik.inference import deepseek_decode
from sputnik.kernels.cpu import linear_packed, linear_rows_available, pack_linear
from sputnik.inference.mla_decode import DecodeStep, MLACache, mla_decode, mla_decode_weights, rms_norm_rows
from sputnik.inference.moe_decode import FEW_TOKENS, ffn_decode_weights, mlp_rows, moe_few_tokens
from sputnik.inference.weights import cached_weights
from sputnik.model.block import Block
from sputnik.model.moe import MoE
from sputnik.model.routing_replay import active_tape
from sputnik.model.transformer import Transformer


def decode_block(block: Block, h_ND: torch.Tensor, step: DecodeStep, cache: MLACache, w: tuple | None = None,
                 prefill: bool = False) -> torch.Tensor:
    """Block.forward on token rows over the latent cache: h += MLA(norm(h)); h += FFN(norm(h)).
    w: (attention weights, FFN weights) fetched by the caller (a compiled step takes them as inputs).
    A MoE runs its few-token path, except in a prefill past FEW_TOKENS tokens, which takes the
    model's own grouped path, as a training forward would."""
    w_attn, w_ffn = w if w is not None else (mla_decode_weights(block.self_attn), ffn_decode_weights(block.mlp))
    h_ND = h_ND + mla_decode(block.self_attn, rms_norm_rows(h_ND, block.input_layernorm), step, cache, w_attn)
    x_ND = rms_norm_rows(h_ND, block.post_attention_layernorm)
    if not isinstance(block.mlp, MoE):
        return h_ND + mlp_rows(block.mlp, x_ND, w_ffn)
    if prefill and x_ND.shape[0] > FEW_TOKENS:
        return h_ND + block.mlp(x_ND[None])[0][0]
    return h_ND + moe_few_tokens(block.mlp, x_ND, w_ffn)


def embed_rows(model: Transformer, ids_BT: torch.Tensor, cache: MLACache, cache_seqlens_B: torch.Tensor) -> torch.Tensor:
    """Token embeddings of the new tokens as rows [B·T, D], plus their Abacus places when the model
    has them (continued from the cache; the cache records the new places)."""
    h_ND = model.model.embed_tokens(ids_BT.reshape(-1))
    if cache.abacus_BS is not None:
        abacus = model.model.abacus_embed
        index_BT = cache.abacus_places(ids_BT, cache_seqlens_B, abacus)
        h_ND = h_ND + abacus(index_BT, h_ND.dtype).reshape(h_ND.shape)
    return h_ND


def static_step(model: Transformer, tok_B: torch.Tensor, cache: MLACache, cache_seqlens_B: torch.Tensor,
                weights: dict, kv_len: int | None = None) -> torch.Tensor:
    """logits_BV of one new token per row: embedding, blocks on token rows, final norm, lm_head. With
    kv_len None every position of the buffer is read under a −inf bias, so shapes depend only on
    (B, cache length) and the step has no host sync: it can be compiled or captured (graphs.py).
    Eager callers pass kv_len (the longest row + 1) to read only the written prefix. The caller has
    checked that no row overflows. `weights`: DeepSeekCachedModel.step_weights()."""
    cos2_PR, sin2_PR = weights["rope"]
    step = cache.static_step(cache_seqlens_B, model.config.num_attention_heads, cos2_PR, sin2_PR,
                             model.model.embed_tokens.weight.dtype, kv_len)
    h_ND = embed_rows(model, tok_B[:, None], cache, cache_seqlens_B)
    for layer, w in zip(model.model.layers, weights["layers"]):
        h_ND = decode_block(layer, h_ND, step, cache, w)
    return lm_head_logits(rms_norm_rows(h_ND, model.model.norm), weights["lm_head"], model.lm_head.weight.shape[0])


def lm_head_logits(x_ND: torch.Tensor, head: torch.Tensor, vocab: int) -> torch.Tensor:
    """x_ND times the LM head as DeepSeekCachedModel.lm_head holds it: packed strips for the CPU
    kernel (3 dims), else a [D, V] copy for torch.mm."""
    return linear_packed(x_ND, head, vocab) if head.dim() == 3 else torch.mm(x_ND, head)


class DeepSeekCachedModel:
    """The cached-model contract over a `Transformer` (module docstring)."""

    name = "deepseek_v3"
    static_step = staticmethod(static_step)  # the capturable step (graphs.GraphDecoder)

    def __init__(self, model: Transformer):
        self.model = model
        self.config = model.config

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> MLACache:
        """Compressed MLA cache for the main layers and the MTP blocks (drafting)."""
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"max_len={max_len} > max_position_embeddings={self.config.max_position_embeddings}")
        w = self.model.lm_head.weight
        num_layers = self.config.num_hidden_layers + len(self.model.mtp)
        return MLACache(num_layers, batch, max_len, self.config.kv_lora_rank, self.config.qk_rope_head_dim,
                        dtype or w.dtype, device or w.device, abacus=bool(self.config.abacus_max_index))

    @torch.no_grad()
    def forward_cached(self, input_ids_BT: torch.Tensor, cache: MLACache, cache_seqlens_B: torch.Tensor,
                       logits_at_B: torch.Tensor | None = None, return_hidden: bool = False):
        """Append T tokens per row at positions cache_seqlens[b] … +T−1 and return their logits
        [B, T, V] (and the post-norm h_BTD for MTP drafting if return_hidden). The caller advances
        cache_seqlens (by T, or by each row's real token count when rows were right-padded: the
        padding slots are then overwritten by later steps). logits_at_B: only the logits of new token
        logits_at_B[b] of each row, [B, V] (a prefill needs just each prompt's last position)."""
        B, T = input_ids_BT.shape
        m = self.model
        table = None if return_hidden else self._c_table(cache)
        if table is not None:  # the whole prefill in C calls (deepseek_decode.py)
            if int(cache_seqlens_B.max()) + T > cache.max_len:
                raise ValueError(f"cache overflow: a row needs {int(cache_seqlens_B.max()) + T} positions, "
                                 f"cache holds {cache.max_len}")
            tape = active_tape()  # recording (see _c_table): the experts of every token, row-major as the router's
            routes = None if tape is None else torch.empty(B, T, table.moe_layers, table.top_k, dtype=torch.int64)
            logits = deepseek_decode.fused_prefill(table, input_ids_BT, cache, cache_seqlens_B, logits_at_B, routes)
            if tape is not None:
                tape.record_rows(routes.view(B * T, table.moe_layers, table.top_k))
            return logits
        step = self._decode_step(cache, cache_seqlens_B, T)
        h_ND = embed_rows(m, input_ids_BT, cache, cache_seqlens_B)  # token rows, N = B·T
        for layer in m.model.layers:
            h_ND = decode_block(layer, h_ND, step, cache, prefill=True)
        if logits_at_B is not None:  # the lm_head on B rows instead of B·T
            assert not return_hidden, "logits_at_B drops the other positions' hidden states"
            rows_B = torch.arange(B, device=h_ND.device) * T + logits_at_B
            return self._logits(rms_norm_rows(h_ND[rows_B], m.model.norm))
        h_ND = rms_norm_rows(h_ND, m.model.norm)
        logits_BTV = self._logits(h_ND).view(B, T, -1)
        return (logits_BTV, h_ND.view(B, T, -1)) if return_hidden else logits_BTV

    @torch.no_grad()
    def draft(self, h_BTD: torch.Tensor, next_ids_BT: torch.Tensor, cache: MLACache, cache_seqlens_B: torch.Tensor,
              depth: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP depth `depth` as a draft head (V3 §5.4.3): from h^{depth−1} at the positions of the main
        model's step (cache_seqlens[b] + t) and the token t_{i+depth} that follows, (logits_BTV for
        t_{i+depth+1}, h^depth). MTPModule.forward on token rows: [enorm(Emb(t)); hnorm(h)] -> eh_proj
        -> block (eq. 21); the block's cache layer is num_hidden_layers + depth − 1."""
        m = self.model
        module = m.mtp[depth - 1]
        B, T, D = h_BTD.shape
        step = self._decode_step(cache, cache_seqlens_B, T)
        merged_N2D = torch.cat([rms_norm_rows(m.model.embed_tokens(next_ids_BT.reshape(-1)), module.enorm),
                                rms_norm_rows(h_BTD.reshape(-1, D), module.hnorm)], dim=-1)
        h_ND = decode_block(module, module.eh_proj(merged_N2D), step, cache, prefill=True)
        logits_ND = self._logits(rms_norm_rows(h_ND, module.shared_head.norm))
        return logits_ND.view(B, T, -1), h_ND.view(B, T, D)

    def step_weights(self) -> dict:
        """Every parameter-derived tensor a decode step reads, as current copies (weights.py): per
        layer the attention's and the FFN's, the LM head (lm_head()) and the RoPE tables, and the C
        step's table over them ("c_step", None where it cannot run). Fetched once per wave (re-fetching
        them each step was ~15% of a batch-1 step)."""
        layers = [(mla_decode_weights(layer.self_attn), ffn_decode_weights(layer.mlp)) for layer in self.model.model.layers]
        head, rope = self.lm_head(), self._rope_tables()
        return {"layers": layers, "lm_head": head, "rope": rope,
                "c_step": deepseek_decode.decode_table(self.model, head, rope)}

    @torch.no_grad()
    def step(self, tok_B: torch.Tensor, cache: MLACache, cache_seqlens_B: torch.Tensor, weights: dict | None = None,
             step_fn=None) -> torch.Tensor:
        """logits_BV of one token per row = forward_cached(tok_B[:, None], …)[:, -1]. With the C step's
        table (fp32 on a CPU; deepseek_decode.py) the whole step is one C call. Else eagerly it reads
        the written prefix only (the static shape buys nothing without a compiler; RL waves at batch
        256 read ~half the buffer on average); `step_fn`, a compiled static_step, reads the whole
        buffer. `weights`: step_weights(), fetched by a caller who answers for their being current."""
        longest = int(cache_seqlens_B.max())
        if longest >= cache.max_len:
            raise ValueError(f"cache overflow: a row needs {longest + 1} positions, cache holds {cache.max_len}")
        weights = self.step_weights() if weights is None else weights
        table, tape = weights.get("c_step"), active_tape()
        if (table is not None and step_fn is None and (tape is None or tape.replay is None)
                and deepseek_decode.cache_readable(cache, table)):
            if tape is None:
                return deepseek_decode.fused_step(table, tok_B, cache, cache_seqlens_B)
            routes = torch.empty(tok_B.shape[0], table.moe_layers, table.top_k, dtype=torch.int64)
            logits = deepseek_decode.fused_step(table, tok_B, cache, cache_seqlens_B, routes)
            tape.record_rows(routes)  # a recording tape (RL rollouts): the experts the C call chose
            return logits
        if step_fn is not None:
            return step_fn(self.model, tok_B, cache, cache_seqlens_B, weights)
        return static_step(self.model, tok_B, cache, cache_seqlens_B, weights, kv_len=longest + 1)

    def lm_head(self) -> torch.Tensor:
        """The LM head as decode multiplies by it, a cached copy: on a CPU in fp32 packed into strips
        for kernels/linear_rows.c (1.4-2.8x MKL at 1-128 rows here, LOG.md stop 32), else [D, V] for
        torch.mm. lm_head_logits takes either."""
        w = self.model.lm_head.weight
        if w.is_cpu and w.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and linear_rows_available():
            return cached_weights(self.model.lm_head, "lm_head_packed", [w], lambda: pack_linear(w), cast=False)
        return cached_weights(self.model.lm_head, "lm_head_t", [w], lambda: w.t().contiguous())

    def _c_table(self, cache: MLACache):
        """The C step's table when it can run this forward (no replaying routing tape, a cache it can
        write), else None."""
        tape = active_tape()
        if tape is not None and tape.replay is not None:
            return None
        table = deepseek_decode.decode_table(self.model, self.lm_head(), self._rope_tables())
        return table if table is not None and deepseek_decode.cache_readable(cache, table) else None

    def _logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        return lm_head_logits(x_ND, self.lm_head(), self.model.lm_head.weight.shape[0])

    def _decode_step(self, cache: MLACache, cache_seqlens_B: torch.Tensor, num_new: int) -> DecodeStep:
        """Per-step state shared by all layers; RoPE tables re-laid out once for mla_decode."""
        cos2_PR, sin2_PR = self._rope_tables()
        return cache.decode_step(cache_seqlens_B, num_new, self.config.num_attention_heads, cos2_PR, sin2_PR,
                                 self.model.model.embed_tokens.weight.dtype)

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.model.rope

        def tables():  # [cos; cos] and [−sin; sin] per position: mla_decode's split-halves rotation
            return torch.cat([rope.cos_PF, rope.cos_PF], -1), torch.cat([-rope.sin_PF, rope.sin_PF], -1)

        return cached_weights(self.model, "rope_tables", [rope.cos_PF, rope.sin_PF], tables, cast=False)
