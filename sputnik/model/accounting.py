"""Parameter counts and FLOPs per token, by arithmetic on a ModelConfig (no nn.Module is built).

The cost planner (`sputnik cost`) and the ledger use these numbers for 671B-parameter configs that
could never be instantiated here, so everything is closed-form in the config fields. Shapes follow
the Hugging Face DeepSeek-V3 / Llama state dicts (reference §8.2); a test checks the published
totals: tiny 8.22M / 4.09M active, small 681.7M / 179.9M, V3 671.03B / 37.55B (reference §2.6).

Symbols: d hidden_size, V vocab_size, L num_hidden_layers, n_h heads, E routed experts, k experts
per token, N_s shared experts, I dense intermediate, I_e expert intermediate.
"""
from __future__ import annotations

from sputnik.model.config import ModelConfig


# ---------------------------------------------------------------------------------------------
# Building blocks (parameters of one module, HF key names in the comments)
def _swiglu(d: int, inter: int) -> int:
    """gate_proj [I, d] + up_proj [I, d] + down_proj [d, I] = 3·d·I (no biases)."""
    return 3 * d * inter


def _mla(c: ModelConfig) -> int:
    """Multi-head Latent Attention of one layer.
    q: q_a_proj [d_c', d] + q_a_layernorm [d_c'] + q_b_proj [n_h·(d_nope+d_rope), d_c']
       (or q_proj [n_h·(d_nope+d_rope), d] when q_lora_rank = 0);
    kv: kv_a_proj_with_mqa [d_c+d_rope, d] + kv_a_layernorm [d_c] + kv_b_proj [n_h·(d_nope+d_v), d_c];
    o_proj [d, n_h·d_v]."""
    d, h = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank:
        q = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
    else:
        q = d * h * c.qk_head_dim
    kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + h * c.v_head_dim * d


def _gqa(c: ModelConfig) -> int:
    """Llama-family attention: q_proj [n_h·hd, d], k_proj and v_proj [n_kv·hd, d], o_proj [d, n_h·hd],
    plus the family's q/k/v biases [(n_h + 2·n_kv)·hd], o_proj bias [d] and q/k norms [hd] each."""
    d, hd, h, kv = c.hidden_size, c.attention_head_dim, c.num_attention_heads, c.kv_heads
    weights = 2 * d * h * hd + 2 * d * kv * hd
    biases = c.qkv_bias * (h + 2 * kv) * hd + c.o_proj_bias * d
    return weights + biases + c.qk_norm * 2 * hd


def _moe(c: ModelConfig) -> tuple[int, int, int, int]:
    """(total, active, one expert, router) of one DeepSeekMoE layer. Router: gate.weight [E, d]; the
    e_score_correction_bias [E] is a buffer moved by the balancing rule, not a gradient-trained
    parameter, so it is left out as transformers' num_parameters() does (tiny: 4.09M, not 4.10M).
    Active = router + shared experts + k routed experts."""
    d = c.hidden_size
    expert = _swiglu(d, c.moe_intermediate_size)
    shared = _swiglu(d, c.moe_intermediate_size * c.n_shared_experts) if c.n_shared_experts else 0
    router = c.n_routed_experts * d
    total = router + shared + c.n_routed_experts * expert
    active = router + shared + c.num_experts_per_tok * expert
    return total, active, expert, router


# ---------------------------------------------------------------------------------------------
def param_counts(cfg: ModelConfig) -> dict:
    """Parameter counts (integers) of a deepseek_v3 or llama config.

    total  = embedding + head + Σ_layers (2 RMSNorms + attention + FFN) + final norm
    active = parameters touched by one token: every non-expert parameter + shared experts +
             the top-k routed experts (= total for llama).
    MTP (deepseek_v3, D = num_nextn_predict_layers modules), each = enorm [d] + hnorm [d] +
    eh_proj [d, 2d] + one block (MoE when the main model has MoE layers) + shared_head.norm [d];
    its embedding and head are the main model's, so not counted again. `total`/`active` exclude
    MTP (the published 671B does); `total_with_mtp`/`active_with_mtp` include it.
    The head is 0 when tie_word_embeddings (it is the embedding matrix)."""
    d, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    embedding = V * d
    head = 0 if cfg.tie_word_embeddings else V * d
    norms = 2 * d  # input_layernorm + post_attention_layernorm
    if cfg.architecture == "llama":
        attn, dense = _gqa(cfg), _swiglu(d, cfg.intermediate_size)
        n_moe = sum(cfg.is_moe_layer(i) for i in range(L))  # Qwen3-MoE: softmax router, no shared expert
        n_dense = L - n_moe
        expert, router = _swiglu(d, cfg.moe_intermediate_size), cfg.n_routed_experts * d
        moe_total, moe_active = (router + cfg.n_routed_experts * expert, router + cfg.num_experts_per_tok * expert) \
            if n_moe else (0, 0)
        layer = norms + attn + dense
        body = L * (norms + attn) + n_dense * dense + n_moe * moe_total
        per_layer = dict(attention=attn, dense_mlp=dense, norms=norms, layer=layer)
        if n_moe:
            per_layer.update(moe=moe_total, moe_active=moe_active, expert=expert, router=router)
        mtp = mtp_active = 0
    else:
        attn, dense = _mla(cfg), _swiglu(d, cfg.intermediate_size)
        moe_total, moe_active, expert, router = _moe(cfg)
        n_dense = cfg.first_k_dense_replace
        n_moe = L - n_dense
        body = L * (norms + attn) + n_dense * dense + n_moe * moe_total
        per_layer = dict(attention=attn, dense_mlp=dense, moe=moe_total, moe_active=moe_active,
                         expert=expert, router=router, norms=norms)
        # one MTP module; its block is MoE iff the main model has any MoE layer
        mtp_ffn, mtp_ffn_active = (moe_total, moe_active) if n_moe else (dense, dense)
        mtp_fixed = 2 * d + 2 * d * d + norms + attn + d  # enorm, hnorm, eh_proj, block norms+attn, shared_head.norm
        mtp = cfg.num_nextn_predict_layers * (mtp_fixed + mtp_ffn)
        mtp_active = cfg.num_nextn_predict_layers * (mtp_fixed + mtp_ffn_active)
    total = embedding + head + body + d  # + final norm
    active = total - n_moe * (moe_total - moe_active)
    return dict(total=total, active=active, embedding=embedding, head=head, final_norm=d,
                num_dense_layers=n_dense, num_moe_layers=n_moe, per_layer=per_layer,
                mtp=mtp, mtp_active=mtp_active,
                total_with_mtp=total + mtp, active_with_mtp=active + mtp_active)


def flops_per_token(cfg: ModelConfig, seq_len: int, *, training: bool = True, include_mtp: bool = True) -> dict:
    """FLOPs per token (multiply-add = 2 FLOPs), the PaLM/Chinchilla convention.

    matmul    = 2 · N_active_nonembedding, forward. N counts the lm_head [V, d] matmul (even when
                tied) but not the embedding lookup. Norm weights are included in N (negligible).
    attention = Σ_layers 2 · n_h · (d_qk + d_v) · seq_len/2, forward: q·kᵀ and p·v against, on
                average, seq_len/2 earlier positions (causal). d_qk = d_nope + d_rope for MLA and
                the head dim for llama.
    MTP (include_mtp, deepseek_v3): each module adds 2·(its active params) + 2·V·d (its own pass
                through the shared head) to matmul and one layer to attention; `mtp` reports
                that share of `total` separately.
    training multiplies everything by 3 (forward + backward, the backward costing 2× forward);
    so 6·N·D for the matmuls, the familiar rule.
    Ignored: softmax, RMSNorm arithmetic, SiLU, RoPE, routing top-k and the optimizer step."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    p = param_counts(cfg)
    d, V = cfg.hidden_size, cfg.vocab_size
    head_matmul = V * d
    n_matmul = p["active"] - p["embedding"] - p["head"] + head_matmul
    if cfg.architecture == "llama":
        qk, v, n_h = cfg.attention_head_dim, cfg.attention_head_dim, cfg.num_attention_heads
    else:
        qk, v, n_h = cfg.qk_head_dim, cfg.v_head_dim, cfg.num_attention_heads
    attn_layer = 2 * n_h * (qk + v) * seq_len / 2
    n_attn_layers = cfg.num_hidden_layers
    mtp = 0.0
    if include_mtp and cfg.architecture == "deepseek_v3" and cfg.num_nextn_predict_layers:
        n_matmul += p["mtp_active"] + cfg.num_nextn_predict_layers * head_matmul
        n_attn_layers += cfg.num_nextn_predict_layers
        mtp = 2.0 * (p["mtp_active"] + cfg.num_nextn_predict_layers * head_matmul) + \
            cfg.num_nextn_predict_layers * attn_layer
    mult = 3.0 if training else 1.0
    matmul = mult * 2.0 * n_matmul
    attention = mult * n_attn_layers * attn_layer
    return dict(matmul=matmul, attention=attention, total=matmul + attention, mtp=mult * mtp,
                n_matmul_params=n_matmul, training=training, seq_len=seq_len)
