"""MoE and MLP layers for inference with a few tokens a call (decode steps, no autograd): the same
sums as the model's training path (model/moe.py MoE.forward, layers.MLP.forward) in fewer, cheaper
ops, over weight copies derived once per weight update (weights.cached_weights).

The routed experts have one path per situation, each measured against the others (LOG.md):
  - CPU, fp32, a C compiler: the hand-written kernel (kernels/cpu.py, routed_ffn.c);
  - inside a compiled CPU step with a few tokens: gathered per slot in the graph (routed_experts_gathered);
  - otherwise `routed_rows`: per-expert matmuls for 1-2 tokens, a padded bmm with several threads,
    the grouped GEMM (always on CUDA: device-side offsets, no host sync, so CUDA graphs can capture it).

Shape legend as in moe.py: N tokens, D hidden, E experts, K chosen per token, I expert width, S = N·K slots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sputnik.inference.weights import cached_weights
from sputnik.kernels import cpu as cpu_kernels
from sputnik.model.layers import MLP
from sputnik.model.moe import MoE, routed_experts_grouped

# A prefill (several tokens) takes the MoE's grouped training path past this many tokens; one-token
# decode steps always take the few-token path below. Measured (same run, tiny, 1 thread): the
# few-token path 0.65x the grouped time at 1-2 tokens, even at 3-4.
FEW_TOKENS = 2


def ffn_decode_weights(ffn) -> dict | tuple:
    """The derived weights of a block's FFN: moe_decode_weights for a MoE, mlp_decode_weights else."""
    return moe_decode_weights(ffn) if isinstance(ffn, MoE) else mlp_decode_weights(ffn)


def mlp_decode_weights(mlp: MLP) -> tuple[torch.Tensor, torch.Tensor]:
    """[in, out] copies (gate and up fused) of a SwiGLU MLP's weights, rebuilt after a weight update."""
    def build():
        return (torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t().contiguous(),
                mlp.down_proj.weight.t().contiguous())

    sources = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    return cached_weights(mlp, "mlp_decode", sources, build)


def mlp_rows(mlp: MLP, x_ND: torch.Tensor, w: tuple | None = None) -> torch.Tensor:
    """MLP.forward (SwiGLU) on token rows for inference: gate and up in one matmul against cached
    [in, out] copies of the weights (`w` = mlp_decode_weights(mlp), fetched by a compiled step's caller)."""
    gate_up_D2I, down_ID = mlp_decode_weights(mlp) if w is None else w
    gate_NI, up_NI = torch.mm(x_ND, gate_up_D2I).chunk(2, dim=-1)
    return torch.mm(F.silu(gate_NI) * up_NI, down_ID)


def moe_decode_weights(moe: MoE) -> dict:
    """The few-token path's [in, out] weight copies (rebuilt after a weight update, see cached_weights).
    Cached per state of the kernel switch: the C kernel's packed copies are not the torch path's, and
    a copy built while the kernels were on must not route a kernels-off caller into C."""
    fused = moe.gate.weight.dtype == torch.float32 and moe.shared_experts is not None
    name = "moe_decode" if cpu_kernels.cpu_kernels_enabled() else "moe_decode:torch"
    return cached_weights(moe, name, [p for p in moe.parameters()], lambda: _build_few_token_weights(moe, fused))


def moe_few_tokens(moe: MoE, x_ND: torch.Tensor, w: dict | None = None) -> torch.Tensor:
    """MoE.forward for a handful of tokens without autograd: Router.forward's selection and gates and
    the same sum, in fewer ops. In fp32 the router and the shared expert's gate/up share one matmul.
    The routed experts: in fp32 on a CPU, the hand-written kernel (kernels/cpu.py, routed_ffn.c) when
    it could be built, otherwise `routed_rows` (on CUDA the grouped GEMM), both opaque to
    torch.compile; a compiled CPU step with a few tokens gathers them inside the graph instead. `w` is
    moe_decode_weights(moe), fetched by the caller when the step is compiled."""
    gate, shared = moe.gate, moe.shared_experts
    w = moe_decode_weights(moe) if w is None else w
    acc_dtype = torch.promote_types(x_ND.dtype, torch.float32)  # as the training path: sum in >= fp32
    if "router_shared" in w and x_ND.dtype == torch.float32:
        logits_NE, gate_NI, up_NI = torch.mm(x_ND, w["router_shared"]).split(w["split"], dim=-1)
        y_ND = torch.mm(F.silu(gate_NI) * up_NI, w["shared_down"])
    else:
        logits_NE = F.linear(x_ND.float(), gate.weight.float())
        y_ND = (mlp_rows(shared, x_ND).to(acc_dtype) if shared is not None
                else torch.zeros(x_ND.shape, dtype=acc_dtype, device=x_ND.device))
    # --- Router.forward's rule (V3's biased sigmoid selection or V2's softmax), on these logits
    topk_idx_NK, weight_NK, _ = gate.route(logits_NE.float())
    weight_NK = weight_NK.to(x_ND.dtype)
    compiling, kernel = torch.compiler.is_compiling(), "gate_up_packed" in w
    gather_max = GATHER_MAX_TOKENS_KERNEL if kernel else GATHER_MAX_TOKENS
    if compiling and x_ND.device.type == "cpu" and x_ND.shape[0] <= gather_max:
        experts = moe.experts  # the parameters' layouts suit the gathered form: no derived copies
        routed_ND = routed_experts_gathered(x_ND, topk_idx_NK, weight_NK, experts.gate_up_proj, experts.down_proj)
    elif kernel:
        rows = cpu_kernels.routed_ffn_rows if compiling else cpu_kernels._routed_ffn_rows
        routed_ND = rows(x_ND, topk_idx_NK, weight_NK, w["gate_up_packed"], w["down_packed"])
    else:
        rows = routed_rows if compiling else _routed_rows
        routed_ND = rows(x_ND, topk_idx_NK, weight_NK, w["gate_up_ED2I"], w["down_EID"])
    return (y_ND + routed_ND).to(x_ND.dtype)


def _routed_rows(x_ND: torch.Tensor, topk_idx_NK: torch.Tensor, weight_NK: torch.Tensor,
                 gate_up_ED2I: torch.Tensor, down_EID: torch.Tensor) -> torch.Tensor:
    """Σ_k w_{n,k} FFN_{idx_{n,k}}(x_n) in ≥ fp32, inference only, eager inside a compiled step (the
    choice is data-dependent). Up to FEW_TOKENS tokens the chosen experts are read on the host and each
    runs as two plain matmuls: no sort, and no grouped GEMM walking all E experts for K rows
    (torch._grouped_mm on CPU visits every expert). More tokens: sort the slots by expert, grouped GEMM.
    On CUDA always the grouped GEMM: it reads the expert offsets on the device, so the step has no host
    sync and can be captured in a CUDA graph (graphs.py)."""
    N, K = topk_idx_NK.shape
    acc_dtype = torch.promote_types(x_ND.dtype, torch.float32)
    if N > FEW_TOKENS or x_ND.is_cuda:
        counts_E = torch.zeros(gate_up_ED2I.shape[0], dtype=torch.int64, device=x_ND.device)
        counts_E.scatter_add_(0, topk_idx_NK.flatten(), torch.ones_like(topk_idx_NK.flatten()))
        if x_ND.device.type == "cpu" and torch.get_num_threads() > 1 and N >= PADDED_MIN_TOKENS:
            capacity = int(counts_E.max())
            if gate_up_ED2I.shape[0] * capacity <= PADDED_MAX_WASTE * N * K:
                return routed_experts_padded(x_ND, topk_idx_NK, weight_NK, gate_up_ED2I, down_EID, counts_E,
                                             capacity).to(acc_dtype)
        return routed_experts_grouped(x_ND, topk_idx_NK, weight_NK, gate_up_ED2I.transpose(1, 2),
                                      down_EID.transpose(1, 2), counts_E).to(acc_dtype)
    y_ND = torch.zeros(x_ND.shape, dtype=acc_dtype, device=x_ND.device)
    for n, experts in enumerate(topk_idx_NK.tolist()):  # the I-wide hidden is weighted (as the grouped path)
        x_1D = x_ND[n: n + 1]
        for k, e in enumerate(experts):
            gate_1I, up_1I = torch.mm(x_1D, gate_up_ED2I[e]).chunk(2, dim=-1)
            y_ND[n: n + 1] += torch.mm(F.silu(gate_1I) * (up_1I * weight_NK[n: n + 1, k: k + 1]), down_EID[e])
    return y_ND


# Gathered experts (CPU, compiled decode steps with a few tokens): each (token, expert) slot reads its
# expert's weights and the FFN runs as two reductions over the slots. The shapes are static and
# nothing leaves the graph: inside a compiled step it replaces the opaque `routed_rows` call (a Python
# body of ~20 eager ops). Why the thresholds (LOG.md, stops 18-20; compiled step, tiny, 2 threads):
# gathered beats routed_rows at every batch up to 64 (batch 32: 3.4-3.5 vs 4.0 ms a step) but loses
# eagerly, where inductor cannot fuse the gathers; against the C kernel (kernels/cpu.py), an opaque call
# a few us dearer than an in-graph kernel, it wins up to 8 tokens and loses from 16 (generated tok/s
# at batch 8 / 16: 5645 vs 5480, 8014 vs 8177).
GATHER_MAX_TOKENS = 64  # compiled steps without the C kernel
GATHER_MAX_TOKENS_KERNEL = 8  # compiled steps with it


def routed_experts_gathered(x_ND, topk_idx_NK, weight_NK, gate_up_E2ID, down_EDI):
    """Σ_k w_{n,k} FFN_{idx_{n,k}}(x_n) with the chosen experts' weights gathered per slot from the
    parameters' own layouts (gate_up [E, 2I, D], down [E, D, I]): each output is a reduction over the
    contiguous last dimension, which inductor vectorises (the [E, D, 2I] copies with bmm were
    decomposed by inductor into reductions over a strided dimension: 65 vs 50 us at 1 token, 420 vs
    273 at 16, tiny, 2 threads, LOG.md stop 19). In ≥ fp32, inference only."""
    N, K = topk_idx_NK.shape
    acc_dtype = torch.promote_types(x_ND.dtype, torch.float32)
    slot_S = topk_idx_NK.reshape(-1)
    x_S1D = x_ND.repeat_interleave(K, dim=0)[:, None, :]
    gate_SI, up_SI = (gate_up_E2ID.index_select(0, slot_S) * x_S1D).sum(-1).chunk(2, dim=-1)
    hidden_S1I = (F.silu(gate_SI) * (up_SI * weight_NK.reshape(-1, 1)))[:, None, :]  # weighted as the grouped path
    out_SD = (down_EDI.index_select(0, slot_S) * hidden_S1I).sum(-1)
    return out_SD.view(N, K, -1).sum(1).to(acc_dtype)


# Padded experts (CPU, inference, several threads): torch._grouped_mm on CPU runs one small matmul per
# expert on the calling threads, and at ~4 rows an expert it gets slower with 2 threads than with 1
# (1.38 vs 1.20 ms at 32 tokens, tiny). One bmm over [E, capacity, D] splits across the threads:
# 0.66 ms at 32 tokens, 1.03 vs 2.25 at 64, same values (2e-8); at 1 thread it loses below 64 tokens
# (LOG.md, 2026-12-02). Routing so skewed that padding would multiply the work by more than
# PADDED_MAX_WASTE keeps the grouped path.
PADDED_MIN_TOKENS = 16
PADDED_MAX_WASTE = 4


def routed_experts_padded(x_ND, topk_idx_NK, weight_NK, gate_up_ED2I, down_EID, counts_E, capacity: int):
    """Σ_k w_{n,k} FFN_{idx_{n,k}}(x_n) with every expert's rows padded to `capacity` (zeros, weight
    0): two batched matmuls over [E, capacity, ·] instead of a grouped GEMM. Inference only."""
    N, K = topk_idx_NK.shape
    E, D = gate_up_ED2I.shape[0], x_ND.shape[1]
    flat_S = topk_idx_NK.flatten()
    slot_S = torch.argsort(flat_S, stable=True)  # slots grouped by expert
    expert_S = flat_S.index_select(0, slot_S)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    row_S = expert_S * capacity + (torch.arange(N * K, device=x_ND.device) - start_E.index_select(0, expert_S))
    x_PD = x_ND.new_zeros(E * capacity, D).index_copy_(0, row_S, x_ND.index_select(0, slot_S // K))
    w_P1 = weight_NK.new_zeros(E * capacity, 1).index_copy_(
        0, row_S, weight_NK.flatten().index_select(0, slot_S).unsqueeze(-1))
    gate_ECI, up_ECI = torch.bmm(x_PD.view(E, capacity, D), gate_up_ED2I).chunk(2, dim=-1)
    hidden_ECI = F.silu(gate_ECI) * (up_ECI * w_P1.view(E, capacity, 1))  # weighted as the grouped path
    out_PD = torch.bmm(hidden_ECI, down_EID).view(E * capacity, -1)
    y_SD = out_PD.new_empty(N * K, out_PD.shape[1]).index_copy_(0, slot_S, out_PD.index_select(0, row_S))
    return y_SD.view(N, K, -1).sum(1)


# The same function as an op opaque to torch.compile (compiled decode steps). Eager callers use the
# plain function: the custom-op dispatch costs ~0.15 ms a call, ~10% of a batch-1 decode step.
routed_rows = torch.library.custom_op("sputnik::routed_rows", _routed_rows, mutates_args=())


@routed_rows.register_fake
def _(x_ND, topk_idx_NK, weight_NK, gate_up_ED2I, down_EID):
    return x_ND.new_empty(x_ND.shape, dtype=torch.promote_types(x_ND.dtype, torch.float32))


def _build_few_token_weights(moe: MoE, fused: bool) -> dict:
    gate_up_ED2I = moe.experts.gate_up_proj.transpose(1, 2)
    down_EID = moe.experts.down_proj.transpose(1, 2)
    kernel = (gate_up_ED2I.device.type == "cpu" and gate_up_ED2I.dtype == torch.float32
              and not torch.is_autocast_enabled("cpu") and cpu_kernels.routed_ffn_available())
    if kernel:  # fp32 on a CPU with a C compiler: routed_ffn.c, with its packed copies
        w = cpu_kernels.pack_experts(moe.experts)
    else:
        w = {"gate_up_ED2I": gate_up_ED2I.contiguous(), "down_EID": down_EID.contiguous()}
    if fused:
        s = moe.shared_experts
        w["router_shared"] = torch.cat([moe.gate.weight.float(), s.gate_proj.weight, s.up_proj.weight]).t().contiguous()
        w["split"] = [moe.gate.num_experts, s.gate_proj.weight.shape[0], s.up_proj.weight.shape[0]]
        w["shared_down"] = s.down_proj.weight.t().contiguous()
    return w
