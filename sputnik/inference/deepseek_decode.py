"""Our DeepSeek-V3's decode step and prefill in one C call (kernels/deepseek_step.c), fp32 on a CPU.

A decode step through torch (deepseek.py) is ~20 small matmuls, ~150 other ATen ops and an expert-
kernel call per MoE layer; at the tiny model's width their dispatch and per-op passes are most of the
step, and the compiled step still pays its graph call, guards and opaque kernels. deepseek_step.c runs
the same sums (absorbed MLA over the latent cache, router, shared and routed experts, head) in one
OpenMP region, every product over weights packed once in column strips.

What it reads is what the torch step reads: the derived copies of mla_decode_weights (absorbed,
RoPE-permuted), the MoE's fused router/shared-expert matrix and packed experts (moe_decode_weights),
the packed LM head (DeepSeekCachedModel.lm_head), each packed again here for the C products and
rebuilt when a parameter changes (weights.cached_weights). `decode_table` builds the ctypes table of
their addresses (once per wave, as the cached model's step_weights) and keeps the tensors alive.

W_UK and W_UV are folded into the query and output products where that keeps them small (the tiny
preset); where it would grow them (the small preset, V2-Lite, V3) the C step applies them per token and
head, as mla_decode does. Used by DeepSeekCachedModel.step and forward_cached when the table exists —
fp32 weights on a CPU, the C kernels on and built, no Abacus positions — and the cache is fp32 and
contiguous, with no routing tape replaying (a recording tape gets the experts the C call chose: RL
rollouts with routing replay stay on it). Values equal the torch path's up to rounding
(tests/test_deepseek_decode.py).

Shape legend: B rows, L layers, S cache slots, X = kv_lora_rank + rope dim (one latent row), V vocab.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from sputnik.inference.c_prefill import chunked_prefill
from sputnik.inference.mla_decode import mla_decode_weights
from sputnik.inference.moe_decode import ffn_decode_weights
from sputnik.inference.weights import cached_weights
from sputnik.kernels.cpu import deepseek_step_library, pack_linear, routed_ffn_available, strip_width
from sputnik.model.moe import MoE

PREFILL_TOKENS = 2048  # tokens per C call in a prefill (bounded scratch)
MAX_EXPERTS, MAX_TOPK = 1024, 64  # deepseek_step.c's fixed buffers
_ERRORS = {-1: "a token id is outside the vocabulary", -2: "a position is outside the cache or the RoPE tables",
           -3: "router sizes over the kernel's buffers", -4: "out of memory",
           -5: "an output index is outside the tokens"}
_LAYER_POINTERS = ("ln1", "ln2", "wa", "qa_norm", "kv_norm", "wq", "wo")
_FFN_POINTERS = ("wgu", "wd", "wrs", "bias", "wsd", "experts_gu", "experts_down")
_UNABSORBED = ("w_uk", "w_uv")  # W_UK [H, Nq, C] and W_UV [H, Vd, C] where they are not folded in
_SIZES = ("L", "D", "H", "C", "R", "Q", "V", "P", "F", "E", "K", "I", "Is", "G", "TG", "softmax", "norm_topk")


class _Layer(ctypes.Structure):  # deepseek_step.c's Layer, field for field
    _fields_ = ([(name, ctypes.c_void_p) for name in _LAYER_POINTERS] + [("moe", ctypes.c_int64)]
                + [(name, ctypes.c_void_p) for name in _FFN_POINTERS + _UNABSORBED])


class _Model(ctypes.Structure):  # deepseek_step.c's Model
    _fields_ = ([(name, ctypes.c_int64) for name in _SIZES]
                + [(name, ctypes.c_float) for name in ("eps", "scale", "route_scale")]
                + [(name, ctypes.c_void_p) for name in ("embed", "norm", "head", "cos", "sin")]
                + [("layers", ctypes.POINTER(_Layer))]
                + [(name, ctypes.c_int64) for name in ("Nq", "Vd", "absorb_q", "absorb_o")])


@dataclass
class DecodeTable:
    """The C step's table and the tensors it points into (kept alive with it)."""
    model: _Model
    kept: list
    num_layers: int
    row_width: int  # X: one latent cache row
    vocab: int
    moe_layers: int  # routed layers and experts a token (the routes a recording writes)
    top_k: int


def supported(model) -> bool:
    """Whether the C step can run `model` (a Transformer) at all: fp32 on a CPU, the kernels built, no
    Abacus positions, router sizes within the kernel's buffers."""
    c, w = model.config, model.lm_head.weight
    if w.device.type != "cpu" or w.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if c.abacus_max_index or c.n_routed_experts > MAX_EXPERTS or c.num_experts_per_tok > MAX_TOPK:
        return False
    if deepseek_step_library() is None or not routed_ffn_available():
        return False
    lib = deepseek_step_library()
    return lib.deepseek_step_expert_cols() == strip_width()  # the experts are packed for routed_ffn.c


def _pack(w_IO: torch.Tensor) -> torch.Tensor:
    """An [in, out] decode copy -> the C products' strips (pack_linear of its [out, in] transpose)."""
    return pack_linear(w_IO.t(), cols=deepseek_step_library().deepseek_step_pack_cols())


def _derived(model) -> list[dict]:
    """Per layer, the packed products and the norms (rebuilt when a source parameter changes)."""
    layers = []
    for block in model.model.layers:
        attn, ffn = block.self_attn, block.mlp
        w_attn, w_ffn = mla_decode_weights(attn), ffn_decode_weights(ffn)
        v = dict(ln1=block.input_layernorm.weight, ln2=block.post_attention_layernorm.weight,
                 qa_norm=attn.q_a_layernorm.weight if attn.q_lora_rank > 0 else None,
                 kv_norm=attn.kv_a_layernorm.weight)
        sources = [w_attn["a"], w_attn["q"], w_attn["o"], attn.kv_b_proj.weight]
        if isinstance(ffn, MoE):
            v.update(moe=1, wgu=None, wd=None, experts_gu=w_ffn["gate_up_packed"], experts_down=w_ffn["down_packed"],
                     bias=None if ffn.gate.softmax else ffn.gate.e_score_correction_bias)
            sources += [ffn.gate.weight] + [w_ffn[k] for k in ("router_shared", "shared_down") if k in w_ffn]
        else:
            v.update(moe=0, wrs=None, bias=None, wsd=None, experts_gu=None, experts_down=None)
            sources += list(w_ffn)

        def build(block=block, w_attn=w_attn, w_ffn=w_ffn):
            out = dict(wa=_pack(w_attn["a"]), wq=_pack(w_attn["q"]), wo=_pack(w_attn["o"]),
                       w_uk=None if w_attn["absorb_q"] else w_attn["w_uk_HNC"].float().contiguous(),
                       w_uv=None if w_attn["absorb_o"] else w_attn["w_uv_HVC"].float().contiguous())
            if isinstance(block.mlp, MoE):  # moe_decode's [router | shared gate | shared up] copy when shared
                out["wrs"] = _pack(w_ffn["router_shared"] if "router_shared" in w_ffn
                                   else block.mlp.gate.weight.float().t())
                out["wsd"] = _pack(w_ffn["shared_down"]) if "shared_down" in w_ffn else None
            else:
                out["wgu"], out["wd"] = _pack(w_ffn[0]), _pack(w_ffn[1])
            return out

        v.update(cached_weights(block, "deepseek_step", sources, build, cast=False))
        layers.append(v)
    return layers


def decode_table(model, lm_head: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> DecodeTable | None:
    """The C step's table for `model` (a Transformer) as its parameters are now, or None where it cannot
    run (see supported). lm_head: DeepSeekCachedModel.lm_head() (packed); rope: its [cos; cos], [−sin; sin]
    tables."""
    if not supported(model) or lm_head.dim() != 3:
        return None
    c, kept = model.config, []

    def ptr(t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.detach()
        assert t.dtype == torch.float32 and t.is_contiguous() and t.is_cpu, "deepseek_step reads fp32 contiguous CPU tensors"
        kept.append(t)
        return t.data_ptr()

    values = _derived(model)
    layers = (_Layer * len(values))()
    for row, v in zip(layers, values):
        for name in _LAYER_POINTERS + _FFN_POINTERS + _UNABSORBED:
            setattr(row, name, ptr(v[name]))
        row.moe = v["moe"]
    kept.append(layers)
    attn, first_moe = model.model.layers[0].self_attn, next((b.mlp for b in model.model.layers if isinstance(b.mlp, MoE)), None)
    gate = first_moe.gate if first_moe is not None else None
    cos2_PR, sin2_PR = rope
    sizes = dict(L=c.num_hidden_layers, D=c.hidden_size, H=c.num_attention_heads, C=c.kv_lora_rank,
                 R=c.qk_rope_head_dim, Q=c.q_lora_rank, V=c.vocab_size, P=cos2_PR.shape[0], F=c.intermediate_size,
                 E=c.n_routed_experts if gate else 0, K=c.num_experts_per_tok if gate else 0,
                 I=c.moe_intermediate_size if gate else 0,
                 Is=c.moe_intermediate_size * c.n_shared_experts if gate and first_moe.shared_experts else 0,
                 G=gate.n_group if gate else 1, TG=gate.topk_group if gate else 1,
                 softmax=int(gate.softmax) if gate else 0, norm_topk=int(gate.norm_topk_prob) if gate else 0)
    w_attn = mla_decode_weights(attn)
    table = _Model(**sizes, Nq=c.qk_nope_head_dim, Vd=c.v_head_dim, absorb_q=int(w_attn["absorb_q"]),
                   absorb_o=int(w_attn["absorb_o"]), eps=model.model.norm.eps, scale=attn.scale,
                   route_scale=gate.routed_scaling_factor if gate else 1.0,
                   embed=ptr(model.model.embed_tokens.weight), norm=ptr(model.model.norm.weight), head=ptr(lm_head),
                   cos=ptr(cos2_PR), sin=ptr(sin2_PR), layers=layers)
    moe_layers = sum(v["moe"] for v in values)
    return DecodeTable(table, kept, c.num_hidden_layers, c.kv_lora_rank + c.qk_rope_head_dim, c.vocab_size,
                       moe_layers, c.num_experts_per_tok if moe_layers else 0)


def cache_readable(cache, table: DecodeTable) -> bool:
    """Whether the C step can write `cache` (an MLACache) in place: fp32, contiguous, its main layers'
    buffers of one shape, no Abacus places."""
    bufs = cache.kv_BSX[: table.num_layers]
    first = bufs[0]
    return (cache.abacus_BS is None and len(bufs) == table.num_layers and first.dim() == 3
            and first.shape[2] == table.row_width
            and all(b.dtype == torch.float32 and b.is_cpu and b.is_contiguous() and b.shape == first.shape for b in bufs))


def forward_tokens(table: DecodeTable, tok_N: torch.Tensor, row_N: torch.Tensor, pos_N: torch.Tensor, cache,
                   out_M: torch.Tensor, routes_NLK: torch.Tensor | None = None) -> torch.Tensor:
    """logits_MV of tokens out_M after one forward over N tokens, token n written into cache row row_N[n]
    at slot pos_N[n] and attending to that row's slots ≤ pos_N[n] (deepseek_step.c's deepseek_forward).
    routes_NLK (int64 [N, MoE layers, K], or None): filled with the experts each token was routed to."""
    R, S, _ = cache.kv_BSX[0].shape
    pointers = (ctypes.c_void_p * table.num_layers)(*[b.data_ptr() for b in cache.kv_BSX[: table.num_layers]])
    tok_N, row_N, pos_N, out_M = (t.to(torch.int64).contiguous() for t in (tok_N, row_N, pos_N, out_M))
    logits_MV = torch.empty(out_M.shape[0], table.vocab, dtype=torch.float32)
    if tok_N.shape[0] == 0:
        return logits_MV
    if routes_NLK is not None and not (routes_NLK.dtype == torch.int64 and routes_NLK.is_contiguous()
                                       and routes_NLK.shape == (tok_N.shape[0], table.moe_layers, table.top_k)):
        raise ValueError(f"deepseek_step: routes must be int64 [{tok_N.shape[0]}, {table.moe_layers}, {table.top_k}]")
    rc = deepseek_step_library().deepseek_forward(
        ctypes.addressof(table.model), tok_N.data_ptr(), row_N.data_ptr(), pos_N.data_ptr(), tok_N.shape[0],
        pointers, R, S, out_M.data_ptr(), out_M.shape[0], logits_MV.data_ptr(), torch.get_num_threads(),
        None if routes_NLK is None else routes_NLK.data_ptr())
    if rc != 0:
        raise ValueError(f"deepseek_step: {_ERRORS.get(rc, f'error {rc}')}")
    return logits_MV


def fused_step(table: DecodeTable, tok_B: torch.Tensor, cache, pos_B: torch.Tensor,
               routes_BLK: torch.Tensor | None = None) -> torch.Tensor:
    """logits_BV of one new token per row at position pos_B[b] (= the cache slot it writes):
    DeepSeekCachedModel.step's values (and the experts each row was routed to, into routes_BLK)."""
    B = tok_B.shape[0]
    if cache.kv_BSX[0].shape[0] != B:
        raise ValueError(f"deepseek_step: cache of {cache.kv_BSX[0].shape[0]} rows for {B} tokens")
    rows_B = torch.arange(B)
    return forward_tokens(table, tok_B, rows_B, pos_B, cache, rows_B, routes_BLK)


def fused_prefill(table: DecodeTable, ids_BT: torch.Tensor, cache, seqlens_B: torch.Tensor,
                  logits_at_B: torch.Tensor | None, routes_BTLK: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeekCachedModel.forward_cached's values (without return_hidden): T new tokens per row at
    positions seqlens_B[b] + t, logits [B, T, V] or, with logits_at_B, [B, V] of token logits_at_B[b] of
    each row; in chunks of at most PREFILL_TOKENS tokens (c_prefill.py). routes_BTLK (int64, or None):
    filled with the experts each token was routed to."""
    B = ids_BT.shape[0]
    if cache.kv_BSX[0].shape[0] != B:
        raise ValueError(f"deepseek_step: cache of {cache.kv_BSX[0].shape[0]} rows for {B} rows of tokens")
    def forward(tok_N, row_N, pos_N, out_M):
        if routes_BTLK is None:
            return forward_tokens(table, tok_N, row_N, pos_N, cache, out_M)
        routes_NLK = torch.empty(tok_N.shape[0], table.moe_layers, table.top_k, dtype=torch.int64)
        logits_MV = forward_tokens(table, tok_N, row_N, pos_N, cache, out_M, routes_NLK)
        routes_BTLK[row_N, pos_N - seqlens_B.to(torch.int64)[row_N]] = routes_NLK  # this chunk's time steps
        return logits_MV

    return chunked_prefill(forward, ids_BT, seqlens_B, logits_at_B, table.vocab, PREFILL_TOKENS)
