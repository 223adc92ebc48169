"""The dense Llama family's decode step and prefill in one C call (kernels/llama_step.c), fp32 on a CPU.

A batch-1 step through torch is ~200 ATen ops around ~60 linear layers; at SmolLM2's width their
dispatch is a third of the step, whose floor is reading every weight once. llama_step.c runs the
whole forward (embedding, layers, final norm, head) in one OpenMP region. At a few rows it reads
the model's own parameter tensors in place: nothing is copied, so an optimizer step that updates
them in place is seen as it is. What is built here (`decode_weights`: once per wave as the cached
model's step_weights, and per prefill call) is the table of their addresses; it keeps the tensors it
points to alive. A LoRA layer contributes its merged weight (W + s·B·A, cached until A or B changes).

From PACKED_MIN_ROWS rows on the forward is arithmetic-bound, and reads a second copy of the
projections and the head packed in column strips (rows_gemm.h's register-blocked loop, ~1.5-2x the
row-major tiles at 32 rows): built on the first such call and kept until a parameter changes
(weights.py), so a model decoded in batches holds its matmul weights twice (SmolLM2-135M: +0.5 GB).

Qwen3-MoE's sparse layers run there too: the router (a linear layer like the others), its softmax
top-k in C, and the chosen experts through routed_experts.h (routed_ffn.c's loops) over a copy of the
experts packed in its strips, built once and rebuilt when they change.

Used by LlamaCachedModel.step (batches of at most MAX_ROWS rows) and forward_cached (prefill) when the
table exists — fp32 weights and cache on a CPU, the C kernels on and built — and the cache is
contiguous, with no routing tape active. The values equal the torch path's up to rounding
(tests/test_llama_decode.py).

Shape legend: B rows, L layers, K key/value heads, S cache slots, C head dim, V vocab.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from sputnik.inference.c_prefill import chunked_prefill
from sputnik.inference.weights import cached_weights
from sputnik.kernels.cpu import llama_step_library, pack_experts, pack_linear, routed_ffn_available
from sputnik.model.llama import SoftmaxMoE

MAX_ROWS = 64  # past this the torch path's MKL GEMMs are as fast
PACKED_MIN_ROWS = 8  # from here the packed copy's register blocks beat the row-major tiles
PREFILL_TOKENS = 2048  # tokens per C call in a prefill (scratch ~ tokens x 2 x intermediate_size floats)
MAX_HEAD_DIM = 512  # llama_step.c's per-thread accumulator
_ERRORS = {-1: "a token id is outside the vocabulary", -2: "a position is outside the cache or the RoPE tables",
           -3: f"head dim over {MAX_HEAD_DIM}", -4: "out of memory", -5: "an output index is outside the tokens"}
_LAYER_FIELDS = ("ln1", "ln2", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "qn", "kn", "wg", "wu", "wd", "router",
                 "experts_gu", "experts_down")
_MATRICES = ("wq", "wk", "wv", "wo", "wg", "wu", "wd", "router")  # packed for the batched step (absent: None)


class _Layer(ctypes.Structure):  # llama_step.c's Layer, field for field
    _fields_ = [(name, ctypes.c_void_p) for name in _LAYER_FIELDS]


_SPARSE = ("E", "topk", "I", "norm_topk")  # the sparse layers' sizes (Qwen3-MoE; 0 without)


class _Model(ctypes.Structure):  # llama_step.c's Model
    _fields_ = ([(name, ctypes.c_int64) for name in ("L", "D", "H", "K", "C", "F", "V", "P", "window", "packed")]
                + [("eps", ctypes.c_float)]
                + [(name, ctypes.c_void_p) for name in ("embed", "norm", "head", "cos", "sin")]
                + [("layers", ctypes.POINTER(_Layer))]
                + [(name, ctypes.c_int64) for name in _SPARSE])


@dataclass
class DecodeWeights:
    """The C step's weight tables and the tensors they point into (kept alive with them): `rows` reads
    the model's own [out, in] weights; `packed()` a strip-packed copy, built on first use."""
    owner: torch.nn.Module
    rows: _Model
    values: list[dict]  # per layer, _LAYER_FIELDS -> tensor or None
    globals: dict  # embed, norm, head, cos, sin
    kept: list
    _packed: _Model | None = None

    def packed(self) -> _Model:
        if self._packed is None:
            names = [(i, k) for i, v in enumerate(self.values) for k in _MATRICES if v[k] is not None]
            sources = [self.values[i][k] for i, k in names] + [self.globals["head"]]
            strips = cached_weights(self.owner, "llama_step_packed", sources,
                                    lambda: [pack_rows(t) for t in sources], cast=False)
            values = [dict(v) for v in self.values]
            for (i, k), packed in zip(names, strips):
                values[i][k] = packed
            it = iter(strips[len(names):])
            self._packed = _table(self.rows, values, dict(self.globals, head=next(it)), self.kept, packed=True)
        return self._packed


def pack_rows(w_OI: torch.Tensor) -> torch.Tensor:
    """[O, I] -> [ceil(O / C), I, C] strips, C = llama_step_pack_cols(): strip s holds output columns
    s·C ... as [I, C] rows, zero past O (rows_gemm.h's gemm_packed)."""
    return pack_linear(w_OI, cols=llama_step_library().llama_step_pack_cols())


def _weight(linear) -> torch.Tensor:
    """What the module multiplies by when decoding: a LoRA layer's merged weight, else its own."""
    return linear.merged_weight() if hasattr(linear, "merged_weight") else linear.weight


def _table(like: _Model, values: list[dict], globals_: dict, kept: list, packed: bool) -> _Model:
    """A _Model with like's sizes over these tensors (fp32, contiguous; each kept alive in `kept`)."""

    def ptr(t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.detach().to(torch.float32).contiguous()
        kept.append(t)
        return t.data_ptr()

    layers = (_Layer * len(values))()
    for row, v in zip(layers, values):
        for name in _LAYER_FIELDS:
            setattr(row, name, ptr(v[name]))
    kept.append(layers)
    sizes = {name: getattr(like, name) for name in ("L", "D", "H", "K", "C", "F", "V", "P", "window", "eps") + _SPARSE}
    return _Model(**sizes, packed=int(packed), **{k: ptr(t) for k, t in globals_.items()}, layers=layers)


def decode_weights(model) -> DecodeWeights | None:
    """The tables for `model` (a LlamaModel) as its parameters are now, or None when the C step cannot
    run it (not fp32 on a CPU, kernels off or unbuilt, an unsupported head dim or top-k)."""
    c = model.config
    sparse = any(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    if (model.lm_head.weight.device.type != "cpu" or model.lm_head.weight.dtype != torch.float32
            or c.attention_head_dim > MAX_HEAD_DIM or (sparse and not 1 <= c.num_experts_per_tok <= c.n_routed_experts)):
        return None
    if llama_step_library() is None or (sparse and not routed_ffn_available()):
        return None
    values = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        v = dict(ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                 wq=_weight(a.q_proj), bq=a.q_proj.bias, wk=_weight(a.k_proj), bk=a.k_proj.bias,
                 wv=_weight(a.v_proj), bv=a.v_proj.bias, wo=_weight(a.o_proj), bo=a.o_proj.bias,
                 qn=a.q_norm.weight if a.qk_norm else None, kn=a.k_norm.weight if a.qk_norm else None)
        if isinstance(mlp, SoftmaxMoE):
            packed = cached_weights(mlp, "llama_step_experts", [mlp.experts.gate_up_proj, mlp.experts.down_proj],
                                    lambda mlp=mlp: pack_experts(mlp.experts), cast=False)
            v.update(wg=None, wu=None, wd=None, router=_weight(mlp.gate), experts_gu=packed["gate_up_packed"],
                     experts_down=packed["down_packed"])
        else:
            v.update(wg=_weight(mlp.gate_proj), wu=_weight(mlp.up_proj), wd=_weight(mlp.down_proj), router=None,
                     experts_gu=None, experts_down=None)
        values.append(v)
    globals_ = dict(embed=model.model.embed_tokens.weight, norm=model.model.norm.weight, head=model.lm_head.weight,
                    cos=model.rotary.cos_PC, sin=model.rotary.sin_PC)
    sizes = _Model(L=c.num_hidden_layers, D=c.hidden_size, H=c.num_attention_heads, K=c.kv_heads,
                   C=c.attention_head_dim, F=c.intermediate_size, V=c.vocab_size, P=model.rotary.cos_PC.shape[0],
                   window=c.sliding_window, eps=model.model.norm.eps, E=c.n_routed_experts if sparse else 0,
                   topk=c.num_experts_per_tok if sparse else 0, I=c.moe_intermediate_size if sparse else 0,
                   norm_topk=int(bool(c.norm_topk_prob)) if sparse else 0)
    kept: list = []
    return DecodeWeights(model, _table(sizes, values, globals_, kept, packed=False), values, globals_, kept)


def forward_tokens(weights: DecodeWeights, tok_N: torch.Tensor, row_N: torch.Tensor, pos_N: torch.Tensor,
                   k_LRKSC: torch.Tensor, v_LRKSC: torch.Tensor, out_M: torch.Tensor) -> torch.Tensor:
    """logits_MV of tokens out_M after one forward over N tokens, token n written into cache row row_N[n]
    at slot pos_N[n] and attending to that row's slots ≤ pos_N[n] (llama_step.c's llama_forward)."""
    L, R, K, S, C = k_LRKSC.shape
    N = tok_N.shape[0]
    m = weights.packed() if N >= PACKED_MIN_ROWS else weights.rows
    if not (k_LRKSC.dtype == v_LRKSC.dtype == torch.float32 and k_LRKSC.is_contiguous() and v_LRKSC.is_contiguous()
            and v_LRKSC.shape == k_LRKSC.shape and (L, K, C) == (m.L, m.K, m.C) and row_N.shape == pos_N.shape == (N,)):
        raise ValueError(f"llama_step: cache {tuple(k_LRKSC.shape)} {k_LRKSC.dtype} does not fit the model "
                         f"(L={m.L}, K={m.K}, C={m.C}) or the {N} tokens")
    tok_N, row_N, pos_N, out_M = (t.to(torch.int64).contiguous() for t in (tok_N, row_N, pos_N, out_M))
    logits_MV = torch.empty(out_M.shape[0], m.V, dtype=torch.float32)
    rc = llama_step_library().llama_forward(
        ctypes.addressof(m), tok_N.data_ptr(), row_N.data_ptr(), pos_N.data_ptr(), N, k_LRKSC.data_ptr(),
        v_LRKSC.data_ptr(), R, S, out_M.data_ptr(), out_M.shape[0], logits_MV.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"llama_step: {_ERRORS.get(rc, f'error {rc}')}")
    return logits_MV


def fused_step(weights: DecodeWeights, tok_B: torch.Tensor, k_LBKSC: torch.Tensor, v_LBKSC: torch.Tensor,
               pos_B: torch.Tensor) -> torch.Tensor:
    """logits_BV of one new token per row at position pos_B[b] (= the cache slot it writes):
    LlamaCachedModel.step's values."""
    rows_B = torch.arange(tok_B.shape[0])
    if k_LBKSC.shape[1] != tok_B.shape[0]:
        raise ValueError(f"llama_step: cache {tuple(k_LBKSC.shape)} does not fit the {tok_B.shape[0]} rows")
    return forward_tokens(weights, tok_B, rows_B, pos_B, k_LBKSC, v_LBKSC, rows_B)


def fused_prefill(weights: DecodeWeights, ids_BT: torch.Tensor, k_LBKSC: torch.Tensor, v_LBKSC: torch.Tensor,
                  seqlens_B: torch.Tensor, logits_at_B: torch.Tensor | None) -> torch.Tensor:
    """LlamaCachedModel.forward_cached's values: T new tokens per row at positions seqlens_B[b] + t,
    logits [B, T, V] or, with logits_at_B, [B, V] of token logits_at_B[b] of each row; in chunks of at
    most PREFILL_TOKENS tokens (c_prefill.py)."""
    B = ids_BT.shape[0]
    if k_LBKSC.shape[1] != B:
        raise ValueError(f"llama_step: cache {tuple(k_LBKSC.shape)} does not fit the {B} rows")
    return chunked_prefill(lambda tok_N, row_N, pos_N, out_M: forward_tokens(weights, tok_N, row_N, pos_N, k_LBKSC,
                                                                                v_LBKSC, out_M),
                           ids_BT, seqlens_B, logits_at_B, weights.rows.V, PREFILL_TOKENS)
