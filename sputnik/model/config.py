"""ModelConfig: the DeepSeek-V3 architecture and the dense Llama family (Llama, Mistral, Qwen2, Qwen3)
with transformers' config names.

Field names equal transformers' `DeepseekV3Config` / `LlamaConfig` / `Qwen3Config` so that export to
config.json is a copy, not a mapping. The dense families differ only by switches (q/k/v and output
biases, q/k norms, head dim, sliding window, RoPE scaling); `family` names the config.json
`model_type` the model is exported as and is checked against the switches. Sizes are named presets (functions), the way nanochat and torchtitan
keep them: `tiny()` is the CPU speedrun size, `small()` the single-GPU size, `v3_671b()` the
published model (used by the cost planner, never instantiated here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sputnik.config import build, knob


@dataclass
class ModelConfig:
    architecture: Literal["deepseek_v3", "llama"] = knob("deepseek_v3", "deepseek_v3 (MLA + MoE + MTP) or llama (dense baseline)")
    vocab_size: int = knob(4096, "vocabulary size (must match the tokenizer)", min=2)
    hidden_size: int = knob(256, "model width d", min=8)
    num_hidden_layers: int = knob(4, "transformer blocks", min=1)
    num_attention_heads: int = knob(4, "attention heads", min=1)
    num_key_value_heads: int = knob(0, "llama only: KV heads for GQA (0 = num_attention_heads); MLA uses all heads", min=0)
    # --- dense family switches (architecture llama)
    family: Literal["llama", "mistral", "qwen2", "qwen3", "qwen3_moe"] = knob(
        "llama", "llama architecture: the HF family (config.json model_type) it is read and exported as")
    head_dim: int = knob(0, "llama: per-head q/k/v dim (0 = hidden_size / num_attention_heads; Qwen3 sets it)", min=0)
    qkv_bias: bool = knob(False, "llama: biases on q/k/v projections (Qwen2; Llama/Qwen3 attention_bias)")
    o_proj_bias: bool = knob(False, "llama: bias on the attention output projection (Llama/Qwen3 attention_bias)")
    qk_norm: bool = knob(False, "llama: RMSNorm over each head's q and k before RoPE (Qwen3)")
    sliding_window: int = knob(0, "llama: each token attends to at most this many latest positions (Mistral; 0 = off)", min=0)
    decoder_sparse_step: int = knob(1, "qwen3_moe: every k-th layer is a MoE (the rest dense MLPs)", min=1)
    mlp_only_layers: list[int] = knob(default_factory=list, help="qwen3_moe: layers that keep a dense MLP")
    router_aux_loss_coef: float = knob(0.0, "qwen3_moe: weight of the Switch load-balancing loss in training "
                                            "(0 = off, as transformers without output_router_logits)", min=0.0)
    intermediate_size: int = knob(768, "dense SwiGLU width (dense layers of deepseek_v3, every layer of llama)", min=1)
    # --- MLA (deepseek_v3)
    q_lora_rank: int = knob(128, "query latent rank d_c' (0 = no query compression: plain q_proj)", min=0)
    kv_lora_rank: int = knob(64, "joint KV latent rank d_c", min=1)
    qk_nope_head_dim: int = knob(32, "per-head q/k dim without RoPE", min=1)
    qk_rope_head_dim: int = knob(16, "per-head decoupled RoPE dim (shared key across heads)", min=2)
    v_head_dim: int = knob(32, "per-head value dim", min=1)
    # --- DeepSeekMoE (deepseek_v3)
    moe_intermediate_size: int = knob(128, "width of one routed expert (shared width = this x n_shared_experts)", min=1)
    n_routed_experts: int = knob(16, "fine-grained routed experts per MoE layer", min=1)
    n_shared_experts: int = knob(1, "always-on shared experts", min=0)
    num_experts_per_tok: int = knob(2, "routed experts per token (top-k)", min=1)
    n_group: int = knob(1, "expert groups for group-limited routing", min=1)
    topk_group: int = knob(1, "groups kept per token", min=1)
    routed_scaling_factor: float = knob(1.0, "multiplier on the normalised routed gates (2.5 in V3)", min=0.0)
    norm_topk_prob: bool = knob(True, "normalise gates over the selected experts")
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = knob(
        "noaux_tc", "routing: noaux_tc (V3: sigmoid scores, bias-steered selection, top-2 group scores), "
                    "greedy / group_limited_greedy (V2: softmax scores, groups scored by their best expert)")
    first_k_dense_replace: int = knob(1, "the first k layers use a dense SwiGLU instead of MoE", min=0)
    bias_update_speed: float = knob(0.001, "gamma of auxiliary-loss-free balancing (0 = frozen bias)", min=0.0)
    seq_aux_loss_alpha: float = knob(0.0001, "alpha of the complementary sequence-wise balance loss (0 = off)", min=0.0)
    moe_impl: Literal["grouped", "loop"] = knob("grouped", "routed-expert kernel: grouped (sorted tokens, grouped GEMM) or loop (reference)")
    # --- MTP
    num_nextn_predict_layers: int = knob(1, "multi-token-prediction depth D (0 = off)", min=0)
    mtp_loss_weight: float = knob(0.3, "lambda: weight of the MTP loss", min=0.0)
    # --- common
    max_position_embeddings: int = knob(2048, "longest sequence the RoPE tables cover", min=1)
    rope_theta: float = knob(10000.0, "RoPE base", min=1.0)
    rope_type: Literal["default", "yarn", "llama3", "linear"] = knob("default", "RoPE scaling (yarn: deepseek_v3; llama3, linear: llama)")
    rope_factor: float = knob(1.0, "YaRN / llama3 / linear scaling factor s", min=1.0)
    original_max_position_embeddings: int = knob(4096, "YaRN / llama3: pre-extension context", min=1)
    rope_low_freq_factor: float = knob(1.0, "llama3 RoPE: wavelengths above context/this are divided by the factor", min=0.0)
    rope_high_freq_factor: float = knob(4.0, "llama3 RoPE: wavelengths below context/this are kept", min=0.0)
    beta_fast: float = knob(32.0, "YaRN beta_fast", min=0.0)
    beta_slow: float = knob(1.0, "YaRN beta_slow", min=0.0)
    mscale: float = knob(1.0, "YaRN mscale", min=0.0)
    mscale_all_dim: float = knob(1.0, "YaRN mscale_all_dim", min=0.0)
    abacus_max_index: int = knob(0, "deepseek_v3: Abacus place embeddings for digit places 1..N added to digit tokens "
                                 "(model/abacus.py; 0 = off)", min=0, max=4096)
    abacus_train_offset: int = knob(0, "Abacus: training adds a random offset 0..K to each sequence's places, so that "
                                    "places past the training lengths are trained too (< abacus_max_index)", min=0)
    abacus_digit_ids: list[int] = knob(default_factory=list, help="Abacus: the token ids of the digits 0-9 (empty: "
                                       "taken from the tokenizer when the run starts)")
    rms_norm_eps: float = knob(1e-6, "RMSNorm epsilon", min=0.0)
    tie_word_embeddings: bool = knob(False, "share embedding and output matrices")
    initializer_range: float = knob(0.02, "std of the normal init", min=0.0)
    bos_token_id: int = knob(0, "begin-of-text id (export only)", min=0)
    eos_token_id: int = knob(1, "end-of-text id (export only)", min=0)
    pad_token_id: int = knob(0, "padding id (export only)", min=0)

    def __post_init__(self):
        self._check_abacus()
        if self.architecture == "llama":
            self._check_dense()
            return
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"rope_type={self.rope_type!r}: deepseek_v3 supports default and yarn")
        if (self.topk_method == "group_limited_greedy") != (self.n_group > 1) and self.topk_method != "noaux_tc":
            raise ValueError(f"topk_method={self.topk_method!r} with n_group={self.n_group}: group_limited_greedy "
                             "needs n_group > 1, greedy needs n_group = 1")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2 and self.topk_method == "noaux_tc":
            raise ValueError(f"n_group={self.n_group}: group-limited routing needs >= 2 experts per group "
                             f"(scores a group by its top-2), got {per_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be <= n_group={self.n_group}")
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be <= topk_group x experts per "
                             f"group = {self.topk_group * per_group}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} must be <= "
                             f"num_hidden_layers={self.num_hidden_layers}")

    def _check_abacus(self) -> None:
        if not self.abacus_max_index:
            if self.abacus_train_offset or self.abacus_digit_ids:
                raise ValueError("abacus_train_offset / abacus_digit_ids need abacus_max_index > 0")
            return
        if self.architecture != "deepseek_v3":
            raise ValueError(f"abacus_max_index: Abacus positions are implemented for deepseek_v3, not {self.architecture}")
        if self.abacus_train_offset >= self.abacus_max_index:
            raise ValueError(f"abacus_train_offset={self.abacus_train_offset} must be < abacus_max_index="
                             f"{self.abacus_max_index} (offset places need table rows)")
        ids = self.abacus_digit_ids
        if ids and (len(ids) != 10 or len(set(ids)) != 10 or not all(0 <= i < self.vocab_size for i in ids)):
            raise ValueError(f"abacus_digit_ids={ids}: need the 10 distinct token ids of 0-9, each < vocab_size")

    def _check_dense(self) -> None:
        """Shapes, and the switches each family's transformers class hard-wires (so the export loads
        there as the same model)."""
        h = self.num_attention_heads
        kv = self.num_key_value_heads or h
        if not self.head_dim and self.hidden_size % h:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={h} "
                             "(or set head_dim)")
        if h % kv:
            raise ValueError(f"num_attention_heads={h} must be divisible by num_key_value_heads={kv}")
        if self.attention_head_dim % 2:
            raise ValueError(f"head dim {self.attention_head_dim} must be even for RoPE")
        if self.rope_type == "yarn":
            raise ValueError("rope_type='yarn' is implemented for deepseek_v3 only (llama: default, llama3, linear)")
        if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                             f"rope_low_freq_factor={self.rope_low_freq_factor}")
        required = {  # family -> switch values its transformers class fixes
            "llama": dict(qk_norm=False, sliding_window=0),
            "mistral": dict(qkv_bias=False, o_proj_bias=False, qk_norm=False),
            "qwen2": dict(qkv_bias=True, o_proj_bias=False, qk_norm=False, sliding_window=0),
            "qwen3": dict(qk_norm=True, sliding_window=0),
            "qwen3_moe": dict(qk_norm=True, sliding_window=0),
        }[self.family]
        for key, value in required.items():
            if getattr(self, key) != value:
                raise ValueError(f"family={self.family!r} needs {key}={value!r}, got {getattr(self, key)!r}")
        if self.family == "qwen3_moe" and self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be <= "
                             f"n_routed_experts={self.n_routed_experts}")
        if self.family in ("llama", "qwen3", "qwen3_moe") and self.qkv_bias != self.o_proj_bias:
            raise ValueError(f"family={self.family!r}: attention_bias covers q/k/v and o_proj alike "
                             f"(qkv_bias={self.qkv_bias}, o_proj_bias={self.o_proj_bias})")

    # Derived sizes used across the model
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attention_head_dim(self) -> int:  # llama: head_dim, 0 meaning derived from the width
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:  # llama
        return self.num_key_value_heads or self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.architecture == "llama":  # Qwen3-MoE's rule (transformers' Qwen3MoeDecoderLayer)
            return (self.family == "qwen3_moe" and layer_idx not in self.mlp_only_layers
                    and (layer_idx + 1) % self.decoder_sparse_step == 0)
        return layer_idx >= self.first_k_dense_replace


def _with(base: dict, overrides: dict) -> dict:
    return {**base, **overrides}


# ---------------------------------------------------------------------------------------------
# Named sizes. The benchmark configs are the ones the model issue fixes (peer-figures.md).
def tiny(**overrides) -> ModelConfig:
    """CPU speedrun size: 8.22M total / 4.09M active without MTP (vocab 4096)."""
    return build(ModelConfig, _with(dict(
        vocab_size=4096, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=768,
        moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
        topk_group=1, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32), overrides))


def tiny_dense(**overrides) -> ModelConfig:
    """Llama twin of tiny (4.33M at vocab 4096)."""
    return build(ModelConfig, _with(dict(architecture="llama", vocab_size=4096, hidden_size=256, num_hidden_layers=4,
                                   intermediate_size=384, num_attention_heads=4, num_nextn_predict_layers=0,
                                   ), overrides))


def small(**overrides) -> ModelConfig:
    """Single-GPU size: 681.7M total / 179.9M active without MTP."""
    return build(ModelConfig, _with(dict(
        vocab_size=32768, hidden_size=1024, num_hidden_layers=12, first_k_dense_replace=1, intermediate_size=2816,
        moe_intermediate_size=256, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, n_group=1,
        topk_group=1, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096), overrides))


def small_dense(**overrides) -> ModelConfig:
    return build(ModelConfig, _with(dict(architecture="llama", vocab_size=32768, hidden_size=1024, num_hidden_layers=12,
                                   intermediate_size=1792, num_attention_heads=16, num_nextn_predict_layers=0,
                                   max_position_embeddings=4096), overrides))


def v3_671b(**overrides) -> ModelConfig:
    """The published DeepSeek-V3 (for the cost planner and accounting tests)."""
    return build(ModelConfig, _with(dict(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=3, intermediate_size=18432,
        moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
        rope_type="yarn", rope_factor=40.0, original_max_position_embeddings=4096, num_nextn_predict_layers=1,
        ), overrides))


PRESETS = {"tiny": tiny, "tiny-dense": tiny_dense, "small": small, "small-dense": small_dense, "v3-671b": v3_671b}
