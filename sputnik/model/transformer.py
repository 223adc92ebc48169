"""The DeepSeek-V3 language model: embedding, decoder blocks (MLA + dense/MoE FFN), final norm,
LM head, multi-token-prediction modules; training loss, cached decode, expert-balance hooks.

Shape legend: B batch, T time, D hidden_size, V vocab_size, N = B·T flattened tokens.

State-dict keys equal transformers' `DeepseekV3ForCausalLM` (`model.embed_tokens.weight`,
`model.layers.{i}.…`, `model.norm.weight`, `lm_head.weight`) except the MTP modules, kept in
memory under `mtp.{k−1}.…` and exported as `model.layers.{L+k−1}.…` by hf.py.
Single-device code: no ranks, no optimizer, no dtype policy (autocast is applied from outside).
"""
from __future__ import annotations

import torch
from torch import nn

from sputnik.train.losses import linear_cross_entropy, mtp_loss
from sputnik.model.block import Block
from sputnik.model.config import ModelConfig
from sputnik.model.layers import MLP, RMSNorm
from sputnik.model.mla import DecodeStep, MLACache, cached_weights, rms_norm_rows
from sputnik.model.moe import MoE
from sputnik.inference.moe_decode import mlp_decode_weights, mlp_rows, moe_decode_weights, moe_few_tokens
from sputnik.model.mtp import MTPModule
from sputnik.model.output import ModelOutput
from sputnik.model.rope import RotaryTables


class Transformer(nn.Module):
    """DeepSeek-V3 causal LM. `forward(ids, targets)` returns
        loss = CE_mean + λ · (1/D) Σ_k L^k_MTP + Σ_layers L_Bal
    with the LM head evaluated chunk by chunk (no [B, T, V] tensor) whenever targets are given."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.architecture != "deepseek_v3":
            raise ValueError(f"Transformer builds deepseek_v3, got architecture={config.architecture!r}")
        self.config = config
        D, V = config.hidden_size, config.vocab_size
        self.model = nn.Module()  # container: keys read `model.embed_tokens.weight` as in HF
        # No padding_idx: HF's would freeze the pad row's gradient, and our pad id is export-only.
        self.model.embed_tokens = nn.Embedding(V, D)
        self.model.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(D, config.rms_norm_eps)
        self.lm_head = nn.Linear(D, V, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(config, k) for k in range(1, config.num_nextn_predict_layers + 1))
        self.rope = RotaryTables(config)  # one fp32 cos/sin table shared by every layer
        self._moe_cache: dict[str, nn.Module] | None = None
        self.init_weights()

    # --- weights ----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Every matrix ~ N(0, initializer_range) (HF `_init_weights`; V3 used 0.006), RMSNorm
        weights 1, router bias 0. Also the re-init after building on the meta device."""
        std = self.config.initializer_range
        for module in self.modules():
            for p in module.parameters(recurse=False):  # a tied matrix is simply drawn twice
                if isinstance(module, RMSNorm):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std)
            for name, b in module.named_buffers(recurse=False):
                if name == "e_score_correction_bias":
                    b.zero_()
        self.rope.reset()

    def moe_layers(self) -> dict[str, nn.Module]:
        """{state-dict prefix: MoE module} over main layers and MTP blocks, in model order."""
        if self._moe_cache is None:  # the module tree is fixed after __init__; walk it once
            from sputnik.model.moe import MoE

            self._moe_cache = {name: m for name, m in self.named_modules() if isinstance(m, MoE)}
        return self._moe_cache

    def num_params(self, active: bool = False, include_mtp: bool = False) -> int:
        """nn.Parameters counted from the modules (tied matrices once; the router-bias buffers are
        not parameters). active=True: only the top-k of each MoE layer's routed experts."""
        total = sum(p.numel() for name, p in self.named_parameters()  # skips tied duplicates
                    if include_mtp or not name.startswith("mtp."))
        if active:
            for name, moe in self.moe_layers().items():
                if include_mtp or not name.startswith("mtp."):
                    E, k = self.config.n_routed_experts, self.config.num_experts_per_tok
                    per_expert = (moe.experts.gate_up_proj.numel() + moe.experts.down_proj.numel()) // E
                    total -= (E - k) * per_expert
        return total

    # --- forward ----------------------------------------------------------------------------
    def _trunk(self, input_ids_BT: torch.Tensor, cache: MLACache | None = None,
               cache_seqlens_B: torch.Tensor | None = None):
        """Embedding, blocks and final norm. Returns (emb_BTD, h_BTD post-norm, cos, sin)."""
        emb_BTD = self.model.embed_tokens(input_ids_BT)
        if cache is None:
            cos, sin = self.rope(input_ids_BT.shape[1], emb_BTD.dtype)
        else:
            cos, sin = self.rope(cache.prepare(cache_seqlens_B, input_ids_BT.shape[1]), emb_BTD.dtype)
        h_BTD = emb_BTD
        for layer in self.model.layers:
            h_BTD = layer(h_BTD, cos, sin, cache)
        return emb_BTD, self.model.norm(h_BTD), cos, sin

    def hidden_states(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """h_BTD after the final norm (what lm_head multiplies; h^0 of the MTP chain)."""
        return self._trunk(input_ids_BT)[1]

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None) -> ModelOutput:
        """targets_BT is already shifted (targets[b, t] = ids[b, t+1]; −100 = ignored)."""
        for moe in self.moe_layers().values():  # an MTP block skipped below must not leave a stale loss
            moe.last_aux_loss = None
        emb_BTD, h_BTD, cos, sin = self._trunk(input_ids_BT)
        if targets_BT is None:
            return ModelOutput(logits=self.lm_head(h_BTD))
        D, W_VD = self.config.hidden_size, self.lm_head.weight
        ce_sum, num_tokens = linear_cross_entropy(h_BTD.reshape(-1, D), W_VD, targets_BT.reshape(-1))
        ce = ce_sum / num_tokens.clamp(min=1)
        mtp = self._mtp_loss(emb_BTD, h_BTD, targets_BT, num_tokens, cos, sin)
        aux = self._aux_loss(h_BTD)
        loss = ce + self.config.mtp_loss_weight * mtp + aux
        return ModelOutput(loss=loss, ce_loss=ce.detach(), mtp_loss=mtp.detach(), aux_loss=aux.detach(),
                           num_tokens=num_tokens)

    def _mtp_loss(self, emb_BTD, h_BTD, targets_BT, num_tokens, cos, sin) -> torch.Tensor:
        """(1/D) Σ_k L^k with L^k = (1/T) Σ_{valid i} CE(P^k_i, targets[i+k]); T = num_tokens, the
        main loss's count, for every depth (eq. 25; see losses.mtp_loss). Module k runs on the
        first T−k positions; its input token t_{i+k} is ids[i+k] = the embedding row i+k, taken
        from input_ids (always a real token), while an ignored target masks the position."""
        T, depth_ce, h_prev_BTD = h_BTD.shape[1], [], h_BTD
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            h_prev_BTD = module(h_prev_BTD[:, : T - k], emb_BTD[:, k:], cos[: T - k], sin[: T - k])
            h_ND = module.head_input(h_prev_BTD).reshape(-1, self.config.hidden_size)
            depth_ce.append(linear_cross_entropy(h_ND, self.lm_head.weight, targets_BT[:, k:].reshape(-1)))
        if not depth_ce:
            return h_BTD.new_zeros(())
        return mtp_loss(depth_ce, num_tokens, 1.0) * len(depth_ce) / len(self.mtp)  # unweighted (λ outside)

    def _aux_loss(self, like: torch.Tensor) -> torch.Tensor:
        """Σ of the MoE layers' complementary sequence-wise balance losses of this forward."""
        losses = [m.last_aux_loss for m in self.moe_layers().values() if m.last_aux_loss is not None]
        return torch.stack(losses).sum() if losses else like.new_zeros(())

    # --- decode (inference engine) ----------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> MLACache:
        """Compressed MLA cache for the main layers and the MTP blocks (drafting)."""
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"max_len={max_len} > max_position_embeddings={self.config.max_position_embeddings}")
        w = self.lm_head.weight
        num_layers = self.config.num_hidden_layers + len(self.mtp)
        return MLACache(num_layers, batch, max_len, self.config.kv_lora_rank, self.config.qk_rope_head_dim,
                        dtype or w.dtype, device or w.device)

    def forward_cached(self, input_ids_BT: torch.Tensor, cache: MLACache, cache_seqlens_B: torch.Tensor,
                       return_hidden: bool = False, logits_at_B: torch.Tensor | None = None):
        """Append T tokens per row at positions cache_seqlens[b] … +T−1 and return their logits
        [B, T, V] (and the post-norm h_BTD for MTP drafting if return_hidden). The caller advances
        cache_seqlens (by T, or by each row's real token count when rows were right-padded: the
        padding slots are then overwritten by later steps). Runs MLA.decode (fused absorbed
        attention) and, under no_grad, the MoE layers' few-token path: the forward's math in
        fewer ops (decode is bound by per-op overhead on CPU). logits_at_B: only the logits of new
        token logits_at_B[b] of each row, [B, V] (a prefill needs just each prompt's last position)."""
        B, T = input_ids_BT.shape
        step = self._decode_step(cache, cache_seqlens_B, T)
        h_ND = self.model.embed_tokens(input_ids_BT.reshape(-1))  # token rows, N = B·T
        for layer in self.model.layers:
            h_ND = _decode_block(layer, h_ND, step, cache)
        if logits_at_B is not None:  # the lm_head on B rows instead of B·T
            assert not return_hidden, "logits_at_B drops the other positions' hidden states"
            rows_B = torch.arange(B, device=h_ND.device) * T + logits_at_B
            return torch.mm(rms_norm_rows(h_ND[rows_B], self.model.norm), self._lm_head_t())
        h_ND = rms_norm_rows(h_ND, self.model.norm)
        logits_BTV = torch.mm(h_ND, self._lm_head_t()).view(B, T, -1)
        return (logits_BTV, h_ND.view(B, T, -1)) if return_hidden else logits_BTV

    def draft(self, h_BTD: torch.Tensor, next_ids_BT: torch.Tensor, depth: int = 1,
              cache: MLACache | None = None, cache_seqlens_B: torch.Tensor | None = None):
        """MTP depth `depth` as a draft head: from h^{depth−1} at positions i and the token
        t_{i+depth}, (logits_BTV for t_{i+depth+1}, h^depth). Without a cache the positions are
        0..T−1; with one, the same positions as the main model's step (cache_seqlens[b] + t)."""
        module = self.mtp[depth - 1]
        if cache is None:
            cos, sin = self.rope(h_BTD.shape[1], h_BTD.dtype)
            return module.draft(h_BTD, next_ids_BT, self.model.embed_tokens, self.lm_head, cos, sin)
        # MTPModule.forward with the decode block (eq. 21: [enorm(Emb(t)); hnorm(h)] -> eh_proj -> block)
        B, T, D = h_BTD.shape
        step = self._decode_step(cache, cache_seqlens_B, T)
        merged_N2D = torch.cat([rms_norm_rows(self.model.embed_tokens(next_ids_BT.reshape(-1)), module.enorm),
                                rms_norm_rows(h_BTD.reshape(-1, D), module.hnorm)], dim=-1)
        h_ND = _decode_block(module, module.eh_proj(merged_N2D), step, cache)
        logits_ND = torch.mm(rms_norm_rows(h_ND, module.shared_head.norm), self._lm_head_t())
        return logits_ND.view(B, T, -1), h_ND.view(B, T, D)

    def decode_one(self, tok_B: torch.Tensor, cache: MLACache, cache_seqlens_B: torch.Tensor,
                   compiled: bool = False, weights: dict | None = None) -> torch.Tensor:
        """forward_cached(tok_B[:, None], …)[:, -1] -> logits_BV for one token per row, with shapes
        that depend only on (B, cache.max_len): attention reads the whole buffer under a −inf bias, so
        the step has no host sync and `compiled=True` runs it through torch.compile (inductor fuses
        the norm/RoPE/softmax/router chains; the matmuls stay library calls). The parameter-derived
        weights are fetched eagerly each step (cached_weights checks versions) and enter the compiled
        graph as inputs, so an optimizer step between calls can never leave it on stale weights.
        `weights`: decode_weights() fetched by the caller, who then answers for their being current
        (the engine fetches them once per wave: nothing updates the model inside a generate() call)."""
        longest = int(cache_seqlens_B.max())
        if longest >= cache.max_len:
            raise ValueError(f"cache overflow: a row needs {longest + 1} positions, cache holds {cache.max_len}")
        weights = self.decode_weights() if weights is None else weights
        if compiled:
            return self.decode_step_fn(True)(self, tok_B, cache, cache_seqlens_B, weights)
        # Eager: attend over the written prefix only (the static shape buys nothing without a compiler;
        # RL waves at batch 256 read ~half the buffer on average)
        return _static_step(self, tok_B, cache, cache_seqlens_B, weights, kv_len=longest + 1)

    def decode_step_fn(self, compiled: bool = False, static_shapes: bool = False):
        """The static decode step as a function (model, tok_B, cache, cache_seqlens_B, weights) ->
        logits_BV, eager (the whole static buffer) or compiled; decode_one calls the compiled one after
        its overflow check, and decode_graphs.DecodeGraphs runs it over its bucketed static cache.
        static_shapes (with compiled): one graph per (batch, cache length) with a C++ wrapper, for
        DecodeGraphs on CPU, whose buckets keep the number of shapes small. On CPU a step's Python-side
        cost (the generated wrapper's ~100 calls, symbolic sizes) is ~40% of a batch-1 step; static
        shapes and inductor's cpp_wrapper cut the step 12-15% at batch 1 and 32 (LOG.md, stop 19)."""
        if not compiled:
            return _static_step
        key = "_compiled_static_step" if static_shapes else "_compiled_step"
        fn = self.__dict__.get(key)
        if fn is None:  # one compile per model, shared by every Engine
            if static_shapes:
                fn = compile_static_shapes(_static_step)
            else:  # dynamic batch and cache length: one graph for all
                fn = torch.compile(_static_step, dynamic=True, fullgraph=True)
            self.__dict__[key] = fn
        return fn

    def decode_weights(self) -> dict:
        """Every parameter-derived tensor a decode step reads, as current cached copies (see
        cached_weights): per layer the attention's and the FFN's, the lm_head [D, V] and the RoPE tables."""
        layers = [(layer.self_attn.decode_weights(),
                   moe_decode_weights(layer.mlp) if isinstance(layer.mlp, MoE) else mlp_decode_weights(layer.mlp))
                  for layer in self.model.layers]
        return {"layers": layers, "lm_head": self._lm_head_t(), "rope": self._rope_tables()}

    def _lm_head_t(self) -> torch.Tensor:
        """lm_head weight as a cached [D, V] copy: decode calls torch.mm directly."""
        w = self.lm_head.weight
        return cached_weights(self.lm_head, "_decode_weights_cache", [w], lambda: w.t().contiguous())

    def _decode_step(self, cache: MLACache, cache_seqlens_B: torch.Tensor, num_new: int) -> DecodeStep:
        """Per-step state shared by all layers; RoPE tables re-laid out once for MLA.decode."""
        cos2_PR, sin2_PR = self._rope_tables()
        return cache.decode_step(cache_seqlens_B, num_new, self.config.num_attention_heads, cos2_PR, sin2_PR,
                                 self.model.embed_tokens.weight.dtype)

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.rope

        def tables():  # [cos; cos] and [−sin; sin] per position: MLA.decode's split-halves rotation
            return torch.cat([rope.cos_PF, rope.cos_PF], -1), torch.cat([-rope.sin_PF, rope.sin_PF], -1)

        return cached_weights(self, "_decode_rope_cache", [rope.cos_PF, rope.sin_PF], tables, cast=False)

    # --- auxiliary-loss-free balancing (called by the training loop after optimizer.step) ---
    def expert_load(self) -> dict[str, torch.Tensor]:
        """{MoE prefix: tokens routed to each expert [E]}, summed over the training forwards
        (micro-batches) since the last update_expert_bias(), which consumes and resets them."""
        return {name: m.last_load for name, m in self.moe_layers().items()}

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """b_i += γ·sign(mean load − load_i) in every MoE layer (V3 §2.1.2); no gradient."""
        for m in self.moe_layers().values():
            m.update_bias(self.config.bias_update_speed)


def _decode_block(block: Block, h_ND: torch.Tensor, step: DecodeStep, cache: MLACache) -> torch.Tensor:
    """Block.forward on token rows with MLA.decode and the inference FFN paths:
    h += MLA(norm(h)); h += FFN(norm(h)) (MoE: few-token path under no_grad, else MoE.forward)."""
    h_ND = h_ND + block.self_attn.decode(rms_norm_rows(h_ND, block.input_layernorm), step, cache)
    x_ND = rms_norm_rows(h_ND, block.post_attention_layernorm)
    if isinstance(block.mlp, MLP):
        return h_ND + mlp_rows(block.mlp, x_ND)
    return h_ND + block.mlp(x_ND[None])[0]


def compile_static_shapes(fn):
    """torch.compile for one graph per input shape, with inductor's C++ wrapper (decode_graphs' buckets
    keep the shapes few). Every bucket x length is a recompile of the same code object: the process's
    recompile limit is raised from torch's default 8 to 64."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})


def _static_step(model: Transformer, tok_B: torch.Tensor, cache: MLACache, cache_seqlens_B: torch.Tensor,
                 weights: dict, kv_len: int | None = None) -> torch.Tensor:
    """Transformer.decode_one's body (a free function: the compiled callable): embedding, blocks on
    token rows with the static-shape step, final norm, lm_head. kv_len: see MLACache.static_step."""
    cos2_PR, sin2_PR = weights["rope"]
    step = cache.static_step(cache_seqlens_B, model.config.num_attention_heads, cos2_PR, sin2_PR,
                             model.model.embed_tokens.weight.dtype, kv_len)
    h_ND = model.model.embed_tokens(tok_B)
    for layer, (w_attn, w_ffn) in zip(model.model.layers, weights["layers"]):
        h_ND = h_ND + layer.self_attn.decode(rms_norm_rows(h_ND, layer.input_layernorm), step, cache, w_attn)
        x_ND = rms_norm_rows(h_ND, layer.post_attention_layernorm)
        ffn = moe_few_tokens if isinstance(layer.mlp, MoE) else mlp_rows
        h_ND = h_ND + ffn(layer.mlp, x_ND, w_ffn)
    return torch.mm(rms_norm_rows(h_ND, model.model.norm), weights["lm_head"])
