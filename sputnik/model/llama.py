"""The Llama family: RMSNorm, RoPE (rotate_half), grouped-query attention, SwiGLU, with the switches
that make it Llama 1/2/3.x (llama3 RoPE scaling), Mistral (sliding window), Qwen2/2.5 (q/k/v biases),
Qwen3 (q/k RMSNorm, explicit head dim), Qwen3-MoE (Qwen3 with softmax-routed experts in its sparse
layers) or SmolLM2 (a Llama layout): one model, not one copy per family (ModelConfig.family and its
checks).

Two roles: the users' own checkpoints on Sputnik's fast path (hf_llama.py reads and writes their
directories), and the dense control arm for the DeepSeek-V3 `Transformer`. Same interface as it
(forward with chunked loss, `hidden_states`, `lm_head`, an empty expert load and a no-op bias
update) so every stage treats both alike; inference/llama.py decodes it over a preallocated KV cache
through the attention hook. Module names equal transformers' (`model.layers.{i}.self_attn.q_proj.weight`,
`...q_norm.weight`, `lm_head.weight`), so `state_dict()` *is* the HF checkpoint.

Shape legend: B batch, T time (new tokens), S key slots (cache length), D hidden_size,
H query heads, K key/value heads, C head_dim, F = C/2 rotary frequencies, P RoPE table positions,
V vocab, N = B·T flattened rows, L layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sputnik.train.losses import linear_cross_entropy
from sputnik.model.config import ModelConfig
from sputnik.model.documents import document_attention
from sputnik.model.layers import MLP, Linear, RMSNorm, real_token_rows
from sputnik.model import routing_replay
from sputnik.model.moe import Experts
from sputnik.model.output import ModelOutput


# ---------------------------------------------------------------------------------------------
# Rotary position embedding, Llama (GPT-NeoX) convention
def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """inv_freq_F, f < C/2: θ^(−2f/C), then the config's scaling.
    linear:  inv_freq / s (positions interpolated s times).
    llama3 (Llama 3.1+): with context L0, λ_f = 2π / inv_freq_f the wavelength, keep frequencies of
    λ < L0/high_freq_factor, divide those of λ > L0/low_freq_factor by s, and in between blend
    (1 − a)·inv_freq/s + a·inv_freq with a = (L0/λ − low) / (high − low)."""
    C = config.attention_head_dim
    inv_freq_F = 1.0 / (config.rope_theta ** (torch.arange(0, C, 2, dtype=torch.float32, device=device) / C))
    s = config.rope_factor
    if config.rope_type == "linear":
        return inv_freq_F / s
    if config.rope_type == "llama3":
        L0, low, high = config.original_max_position_embeddings, config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelen_F = 2 * math.pi / inv_freq_F
        scaled_F = torch.where(wavelen_F > L0 / low, inv_freq_F / s, inv_freq_F)
        a_F = (L0 / wavelen_F - low) / (high - low)
        blended_F = (1 - a_F) * scaled_F / s + a_F * scaled_F
        medium_F = ~(wavelen_F < L0 / high) & ~(wavelen_F > L0 / low)
        return torch.where(medium_F, blended_F, scaled_F)
    return inv_freq_F


class RotaryTables(nn.Module):
    """cos/sin tables [P, C] in fp32 for every position up to max_position_embeddings.

        angle_{p,f} = p · inv_freq_f (rope_inv_freq),  cos_PC = [cos angle ; cos angle]
    Same fp32 products as HF's rotary embeddings, so the angles are bit-equal. Buffers are
    non-persistent: recomputed from the config, never stored in a checkpoint (as in HF).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        cos_PC, sin_PC = self._tables(config.max_position_embeddings)
        self.register_buffer("cos_PC", cos_PC, persistent=False)
        self.register_buffer("sin_PC", sin_PC, persistent=False)

    def _tables(self, num_positions: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq_F = rope_inv_freq(self.config, device)
        angle_PF = torch.arange(num_positions, dtype=torch.float32, device=device)[:, None] * inv_freq_F[None, :]
        angle_PC = torch.cat([angle_PF, angle_PF], dim=-1)  # frequency f drives dims f and f + C/2
        return angle_PC.cos(), angle_PC.sin()

    def reset(self) -> None:
        """Recompute in place (after `to_empty()` from the meta device, where buffers are garbage)."""
        cos_PC, sin_PC = self._tables(self.cos_PC.shape[0], device=self.cos_PC.device)
        self.cos_PC.copy_(cos_PC)
        self.sin_PC.copy_(sin_PC)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1 ; x2] -> [−x2 ; x1]: Llama pairs dim j with dim j + C/2 (not adjacent dims as DeepSeek)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHTC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x' = x·cos + rotate_half(x)·sin, i.e. (x_j, x_{j+F}) rotated by angle_j.
    cos/sin: [T, C] (positions 0..T−1) or [B, 1, T, C] (per-row positions when decoding)."""
    return x_BHTC * cos + rotate_half(x_BHTC) * sin


# ---------------------------------------------------------------------------------------------
# Blocks
def sliding_causal_mask(T: int, window: int, device=None) -> torch.Tensor:
    """[T, T] bool: query t sees keys t − window < s ≤ t (Mistral's sliding window)."""
    t_T = torch.arange(T, device=device)
    offset_TT = t_T[:, None] - t_T[None, :]
    return (offset_TT >= 0) & (offset_TT < window)


class LlamaAttention(nn.Module):
    """softmax(q kᵀ / √C + causal) v with K ≤ H key/value heads; query head h reads KV head
    h // (H/K), the grouping of HF's `repeat_kv`. Family switches: q/k/v and o biases, a per-head
    RMSNorm of q and k before RoPE (Qwen3), a sliding window (Mistral)."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        D, C = config.hidden_size, config.attention_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.kv_heads, C
        self.sliding_window = config.sliding_window
        self.q_proj = Linear(D, self.num_heads * C, bias=config.qkv_bias)
        self.k_proj = Linear(D, self.num_kv_heads * C, bias=config.qkv_bias)
        self.v_proj = Linear(D, self.num_kv_heads * C, bias=config.qkv_bias)
        self.o_proj = Linear(self.num_heads * C, D, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(C, config.rms_norm_eps)
            self.k_norm = RMSNorm(C, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        # SDPA's enable_gqa instead of repeating K/V to H heads: measured on 2 CPU threads it is
        # as fast for training (32 vs 35 ms fwd+bwd, B=8 T=256 H=4 K=2) and 3x faster at decode.
        self.gqa = self.num_kv_heads != self.num_heads

    def _qkv(self, x_BTD, cos, sin):
        B, T, _ = x_BTD.shape
        q_BTHC = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim)
        k_BTKC = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim)
        v_BKTC = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q_BTHC, k_BTKC = self.q_norm(q_BTHC), self.k_norm(k_BTKC)
        q_BHTC, k_BKTC = q_BTHC.transpose(1, 2), k_BTKC.transpose(1, 2)
        return apply_rope(q_BHTC, cos, sin), apply_rope(k_BKTC, cos, sin), v_BKTC

    def forward_rows(self, x_ND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows_N: torch.Tensor,
                     B: int, T: int) -> torch.Tensor:
        """forward() for the real tokens of a right-padded [B, T] batch only: x_ND are its rows rows_N
        (flat indices, layers.real_token_rows), cos/sin the [T, C] tables. Projections, q/k norms and
        RoPE run on the N rows; q, k, v are laid out [B, heads, T, C] for the causal attention with
        zeros at the padding, which no real query sees (right padding, causal)."""
        n, C = x_ND.shape[0], self.head_dim
        pos_N = rows_N % T
        cos_N1C, sin_N1C = cos[pos_N][:, None], sin[pos_N][:, None]
        q_NHC = self.q_proj(x_ND).view(n, self.num_heads, C)
        k_NKC = self.k_proj(x_ND).view(n, self.num_kv_heads, C)
        v_NKC = self.v_proj(x_ND).view(n, self.num_kv_heads, C)
        if self.qk_norm:
            q_NHC, k_NKC = self.q_norm(q_NHC), self.k_norm(k_NKC)

        def padded_BXTC(x_NXC):
            return x_NXC.new_zeros(B * T, *x_NXC.shape[1:]).index_copy(0, rows_N, x_NXC).view(B, T, -1, C).transpose(1, 2)
        q_BHTC = padded_BXTC(apply_rope(q_NHC, cos_N1C, sin_N1C))
        k_BKTC = padded_BXTC(apply_rope(k_NKC, cos_N1C, sin_N1C))
        o_BHTC = self._attention(q_BHTC, k_BKTC, padded_BXTC(v_NKC))
        return self.o_proj(o_BHTC.transpose(1, 2).reshape(B * T, -1).index_select(0, rows_N))

    def _attention(self, q_BHTC, k_BKTC, v_BKTC) -> torch.Tensor:
        T = q_BHTC.shape[2]
        if self.sliding_window and T > self.sliding_window:
            mask_TT = sliding_causal_mask(T, self.sliding_window, q_BHTC.device)
            return F.scaled_dot_product_attention(q_BHTC, k_BKTC, v_BKTC, attn_mask=mask_TT, enable_gqa=self.gqa)
        return F.scaled_dot_product_attention(q_BHTC, k_BKTC, v_BKTC, is_causal=True, enable_gqa=self.gqa)

    def _out(self, o_BHTC: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = o_BHTC.shape
        return self.o_proj(o_BHTC.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x_BTD, cos, sin, attend=None):
        """Causal self-attention; cos/sin [T, C] (positions 0..T−1) or [B, 1, T, C] (given positions).
        attend(self, q_BHTC, k_BKTC, v_BKTC) -> o_BHTC replaces the causal attention (the KV-cache
        decode writes and reads its cache there, inference/llama.py)."""
        q_BHTC, k_BKTC, v_BKTC = self._qkv(x_BTD, cos, sin)
        if attend is not None:
            return self._out(attend(self, q_BHTC, k_BKTC, v_BKTC))
        return self._out(self._attention(q_BHTC, k_BKTC, v_BKTC))


class SoftmaxMoE(nn.Module):
    """Qwen3-MoE's sparse block: softmax top-k routing over E experts, no shared expert.

        p = softmax(W_g x),  S = top-k(p),  w_e = p_e (/ Σ_S p if norm_topk_prob),  y = Σ_{e∈S} w_e FFN_e(x)
    The experts are moe.Experts (HF 5.x fused tensors, the grouped-GEMM path of our DeepSeekMoE).
    Returns the routing statistics of the valid tokens too: tokens per expert (counts_E, the expert
    load the trainer logs) and Σ_tokens p (probs_E), from which the model forms the Switch
    load-balancing loss over all its MoE layers, as transformers' load_balancing_loss_func does."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Linear(config.hidden_size, config.n_routed_experts, bias=False)
        self.experts = Experts(config)
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None):
        """-> (y_BTD, load_E, probs_E). On a CPU the padding rows of a right-padded batch are not
        computed (layers.real_token_rows; 0 in the output)."""
        B, T, D = x_BTD.shape
        rows_N = real_token_rows(valid_BT, x_BTD)
        if rows_N is None:
            y_ND, load_E, probs_E = self._forward(x_BTD.reshape(-1, D), valid_BT)
            return y_ND.view(B, T, D), load_E, probs_E
        y_ND, load_E, probs_E = self.forward_rows(x_BTD.reshape(-1, D).index_select(0, rows_N))
        return y_ND.new_zeros(B * T, D).index_copy(0, rows_N, y_ND).view(B, T, D), load_E, probs_E

    def forward_rows(self, x_ND: torch.Tensor):
        """The layer on token rows that are all real (a right-padded batch's, gathered)."""
        return self._forward(x_ND, None)

    def _forward(self, x_ND: torch.Tensor, valid_BT: torch.Tensor | None):
        probs_NE = F.softmax(self.gate(x_ND), dim=-1, dtype=torch.float)
        idx_NK = routing_replay.choose(self, torch.topk(probs_NE, self.top_k, dim=-1).indices)  # RL may replay
        weight_NK = probs_NE.gather(1, idx_NK)
        if self.norm_topk_prob:
            weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)
        E, flat_S = probs_NE.shape[1], idx_NK.flatten()
        # scatter_add_, not bincount (which sizes its output from max() and syncs: no CUDA-graph capture)
        counts_E = torch.zeros(E, dtype=torch.long, device=x_ND.device).scatter_add_(0, flat_S, torch.ones_like(flat_S))
        y_ND = self.experts(x_ND, idx_NK, weight_NK.to(x_ND.dtype), counts_E)
        valid_N1 = None if valid_BT is None else valid_BT.reshape(-1, 1).to(probs_NE.dtype)
        load_E = counts_E if valid_N1 is None else torch.zeros(E, dtype=torch.long, device=x_ND.device).scatter_add_(
            0, flat_S, valid_N1.long().expand(-1, self.top_k).flatten())
        probs_E = probs_NE.sum(0) if valid_N1 is None else (probs_NE * valid_N1).sum(0)
        return y_ND, load_E, probs_E


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x)), the MLP a SoftmaxMoE in Qwen3-MoE's sparse
    layers. Returns (x, routing statistics or None)."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = SoftmaxMoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size,
                                                                                 config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x_BTD, cos, sin, attend=None, valid_BT=None):
        """valid_BT: the real tokens of a right-padded batch (routing statistics; on a CPU the layer
        computes those rows only and returns 0 at the padding)."""
        rows_N = real_token_rows(valid_BT, x_BTD) if attend is None and cos.dim() == 2 else None
        if rows_N is not None:
            return self.forward_rows(x_BTD, cos, sin, rows_N)
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, attend)
        if isinstance(self.mlp, SoftmaxMoE):
            y_BTD, load_E, probs_E = self.mlp(self.post_attention_layernorm(x_BTD), valid_BT)
            return x_BTD + y_BTD, (load_E, probs_E)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD)), None

    def forward_rows(self, x_BTD, cos, sin, rows_N):
        """The layer on the real tokens rows_N of a right-padded batch: every per-token layer on N rows
        instead of B·T; only the attention sees the [B, T] layout."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D).index_select(0, rows_N)
        x_ND = x_ND + self.self_attn.forward_rows(self.input_layernorm(x_ND), cos, sin, rows_N, B, T)
        stats = None
        if isinstance(self.mlp, SoftmaxMoE):
            y_ND, load_E, probs_E = self.mlp.forward_rows(self.post_attention_layernorm(x_ND))
            stats = (load_E, probs_E)
        else:
            y_ND = self.mlp(self.post_attention_layernorm(x_ND))
        out_ND = x_ND + y_ND
        return out_ND.new_zeros(B * T, D).index_copy(0, rows_N, out_ND).view(B, T, D), stats


# ---------------------------------------------------------------------------------------------
class LlamaModel(nn.Module):
    """Decoder-only dense LM with the HF family's state-dict keys. See the module docstring."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.architecture != "llama":
            raise ValueError(f"architecture={config.architecture!r}: LlamaModel needs 'llama'")
        self.config = config
        # An attribute-only container gives the "model." key prefix HF uses (no mapping table).
        self.model = nn.Module()
        # No padding_idx: our pad id defaults to the BOS id, whose row must keep learning.
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryTables(config)
        self.init_weights()  # also ties lm_head to embed_tokens when configured

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF's LlamaPreTrainedModel init: every Linear/Embedding ~ N(0, initializer_range²), biases 0, norms 1.
        Call again after `to_empty()` when the model was built on the meta device."""
        if self.config.tie_word_embeddings:
            # `to_empty()` materialises each module's parameters separately, silently untying them.
            self.lm_head.weight = self.model.embed_tokens.weight
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, Experts):
                nn.init.normal_(m.gate_up_proj, mean=0.0, std=std)
                nn.init.normal_(m.down_proj, mean=0.0, std=std)
        self.rotary.reset()

    # --- training / scoring path
    def _trunk(self, input_ids_BT: torch.Tensor, positions: torch.Tensor | None, attend,
               valid_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Embedding, layers, final norm -> (h_BTD, {MoE layer prefix: (tokens per expert, Σ probs)}).
        positions [B, T] default to 0..T−1; valid_BT: the real tokens (routing statistics count them)."""
        T = input_ids_BT.shape[1]
        if positions is None and T > self.rotary.cos_PC.shape[0]:
            raise ValueError(f"sequence length {T} > max_position_embeddings={self.rotary.cos_PC.shape[0]}")
        x_BTD = self.model.embed_tokens(input_ids_BT)
        # HF casts the fp32 tables to the activation dtype before the multiply; so do we.
        if positions is None:
            cos, sin = self.rotary.cos_PC[:T], self.rotary.sin_PC[:T]  # [T, C]
        else:
            cos, sin = self.rotary.cos_PC[positions][:, None], self.rotary.sin_PC[positions][:, None]  # [B, 1, T, C]
        cos, sin = cos.to(x_BTD.dtype), sin.to(x_BTD.dtype)
        if valid_BT is not None and valid_BT.shape != input_ids_BT.shape:
            raise ValueError(f"valid_BT {tuple(valid_BT.shape)} must match input_ids {tuple(input_ids_BT.shape)}")
        routing = {}
        for i, layer in enumerate(self.model.layers):
            x_BTD, stats = layer(x_BTD, cos, sin, attend, valid_BT)
            if stats is not None:
                routing[f"model.layers.{i}.mlp"] = stats
        return self.model.norm(x_BTD), routing

    def balance_loss(self, routing: dict, num_tokens) -> torch.Tensor:
        """Switch load balancing as transformers' load_balancing_loss_func: with f_e the fraction of the
        top-k slots and P_e the mean router probability of expert e, both pooled over every MoE layer's
        valid tokens, aux = E · Σ_e f_e · P_e; weighted by router_aux_loss_coef."""
        loads, probs = zip(*routing.values())
        rows = len(routing) * num_tokens
        f_E = torch.stack(loads).sum(0).float() / rows  # top-k slots per token: Σ_e f_e = k
        P_E = torch.stack(probs).sum(0) / rows
        return self.config.router_aux_loss_coef * self.config.n_routed_experts * (f_E * P_E).sum()

    def hidden_states(self, input_ids_BT: torch.Tensor, valid_BT: torch.Tensor | None = None, *,
                      positions: torch.Tensor | None = None, attend=None) -> ModelOutput:
        """`hidden`: h_BTD after the final RMSNorm (what the head multiplies); the expert load of the
        valid tokens in Qwen3-MoE layers (empty for the dense families)."""
        h_BTD, routing = self._trunk(input_ids_BT, positions, attend, valid_BT)
        return ModelOutput(hidden=h_BTD, expert_load={k: v[0] for k, v in routing.items()})

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                valid_BT: torch.Tensor | None = None, documents_BT: torch.Tensor | None = None) -> ModelOutput:
        """Without targets: logits [B, T, V]. With (already shifted, −100 = ignore) targets:
        ce = Σ_n CE(W h_n, t_n) / #valid through the chunked head (no [B, T, V] tensor);
        loss = ce + router_aux_loss_coef · balance loss (Qwen3-MoE; 0 for the dense families) and no MTP
        (reported as 0 so loops log both architectures alike). documents_BT: each token's document in
        a packed window (documents.py): attention stays within it."""
        attend = None
        if documents_BT is not None:
            if self.config.sliding_window:
                raise ValueError("document masking with a sliding window (Mistral) is not implemented")
            attend = document_attention(documents_BT)
        h_BTD, routing = self._trunk(input_ids_BT, None, attend, valid_BT)
        load = {k: v[0] for k, v in routing.items()}
        if targets_BT is None:
            return ModelOutput(logits=self.lm_head(h_BTD), expert_load=load)
        if targets_BT.shape != input_ids_BT.shape:
            raise ValueError(f"targets {tuple(targets_BT.shape)} must match input_ids {tuple(input_ids_BT.shape)}")
        loss_sum, num_valid = linear_cross_entropy(h_BTD.flatten(0, 1), self.lm_head.weight, targets_BT.flatten())
        ce = loss_sum / num_valid.clamp(min=1)  # an all-ignored batch gives 0, not NaN
        zero = ce.new_zeros(())
        aux = zero
        if routing and self.config.router_aux_loss_coef:
            tokens = input_ids_BT.numel() if valid_BT is None else valid_BT.sum()
            aux = self.balance_loss(routing, tokens)
        # ce_loss detached, as the Transformer reports its loss parts: for logging, not for backward.
        return ModelOutput(loss=ce + aux, ce_loss=ce.detach(), mtp_loss=zero, aux_loss=aux.detach(),
                           num_tokens=num_valid, expert_load=load)

    def update_expert_bias(self, load: dict[str, torch.Tensor]) -> None:
        """A dense model has no experts: nothing to balance (uniform loops for both architectures)."""
