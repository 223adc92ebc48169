"""DeepSeekMoE (V3): sigmoid router with group-limited top-k, auxiliary-loss-free bias balancing, the
complementary sequence-wise balance loss, fine-grained routed experts and always-on shared experts.

Paper: DeepSeek-V3 §2.1.2 (eqs. 12-20). Code semantics and state_dict keys: transformers 5.23
`DeepseekV3TopkRouter` / `DeepseekV3Experts` / `DeepseekV3MoE` (fused expert tensors included), so a
state_dict copies across without a mapping. No token is ever dropped: there is no capacity factor.

Shape legend: B batch, T time, N = B·T tokens, D hidden_size, E n_routed_experts, K num_experts_per_tok,
G n_group, X = E/G experts per group, I moe_intermediate_size, S = N·K token-slots (one per (token,
chosen expert) pair), M tokens of one expert, O/F output/input width of a grouped matmul.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sputnik.model import routing_replay
from sputnik.model.config import ModelConfig
from sputnik.model.layers import MLP, real_token_rows


# ---------------------------------------------------------------------------------------------
# Pure functions: the balancing rules
def expert_bias_delta(load_E: torch.Tensor, gamma: float) -> torch.Tensor:
    """Aux-loss-free balancing step (V3 §2.1.2; Wang et al. 2024, arXiv 2408.15664):
    Δb_i = γ · sign(mean_j c_j − c_i), c_i = tokens routed to expert i in the step.
    Overloaded experts get a lower selection bias, underloaded ones a higher; not a gradient."""
    return gamma * torch.sign(load_E.float().mean() - load_E.float())


def seq_balance_loss(scores_BTE: torch.Tensor, topk_idx_BTK: torch.Tensor, alpha: float,
                     valid_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Complementary sequence-wise balance loss (V3 eqs. 17-20), for each sequence of T tokens:
        f_i = E / (K·T) · Σ_t 1[i ∈ selected(t)]          (a constant: no gradient)
        s'_{i,t} = s_{i,t} / Σ_j s_{j,t}                  (sigmoid scores renormalised over all E)
        P_i = (1/T) Σ_t s'_{i,t}
        L = α · Σ_i f_i · P_i,   then the mean over the B sequences.
    Uniform routing gives f_i = 1, P_i = 1/E, L = α. The indicator uses the actual (biased,
    group-limited) selection, not eq. 18's unbiased top-K: it is the load the experts really get.
    valid_BT (bool): the sequence's real tokens (right padding excluded); T is then each row's count."""
    B, T, E = scores_BTE.shape
    K = topk_idx_BTK.shape[-1]
    m_BT = (torch.ones(B, T, device=scores_BTE.device, dtype=scores_BTE.dtype) if valid_BT is None
            else valid_BT.to(scores_BTE.dtype))
    len_B1 = m_BT.sum(1, keepdim=True).clamp(min=1)
    idx_BS = topk_idx_BTK.reshape(B, T * K)
    hits_BE = torch.zeros(B, E, device=scores_BTE.device, dtype=scores_BTE.dtype)
    hits_BE.scatter_add_(1, idx_BS, m_BT.repeat_interleave(K, dim=1))
    f_BE = hits_BE * (E / K) / len_B1
    p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True) * m_BT[..., None]).sum(1) / len_B1
    return alpha * (f_BE * p_BE).sum(-1).mean()


# ---------------------------------------------------------------------------------------------
# Router
class Router(nn.Module):
    """V3 (topk_method "noaux_tc"): s = sigmoid(x Wᵀ) in fp32; select K experts by s + b under group
    limits; gate from unbiased s:
        z = s + b;  group score_g = sum of the top-2 z in group g;  keep the topk_group best groups,
        z = −inf elsewhere;  idx = topk(z, K);  w = s[idx] / (Σ s[idx] + 1e-20) · routed_scaling_factor.
    The bias b (`e_score_correction_bias`) only steers selection, never the gate values (V3 eq. 16).
    V2 ("greedy", "group_limited_greedy"; DeepSeek-V2 / V2-Lite checkpoints): s = softmax(x Wᵀ) in fp32,
    group score_g = max s in group g, s = 0 outside the topk_group best groups, idx = topk(s, K),
    w = s[idx] · routed_scaling_factor (not renormalised, as transformers' DeepseekV2TopkRouter); no bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = config.norm_topk_prob, config.routed_scaling_factor
        self.softmax = config.topk_method != "noaux_tc"
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=config.initializer_range)
        if not self.softmax:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts), persistent=True)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the bias to 8 mantissa bits, which swallows γ = 0.001 steps once
        # |b| > 0.25; HF pins it with _keep_in_fp32_modules_strict, we pin it here (device still follows fn).
        if self.softmax:
            return super()._apply(fn, recurse)
        bias_E = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved_E = self.e_score_correction_bias
        if moved_E.dtype != torch.float32:
            src_E = moved_E if bias_E.is_meta or moved_E.is_meta else bias_E
            self._buffers["e_score_correction_bias"] = src_E.to(device=moved_E.device, dtype=torch.float32)
        return self

    def forward(self, x_ND: torch.Tensor):
        """Returns topk_idx_NK (int64), topk_weight_NK (fp32, differentiable) and scores_NE (fp32 sigmoid or
        softmax scores, differentiable; the balance loss needs them)."""
        return self.route(F.linear(x_ND.float(), self.weight.float()))

    def route(self, logits_NE: torch.Tensor):
        """The rule of the class docstring from the router logits (fp32) -> (topk_idx_NK, topk_weight_NK,
        scores_NE); the decode path (moe_decode.moe_few_tokens) computes the logits its own way."""
        if self.softmax:
            scores_NE = logits_NE.softmax(dim=-1)
            choice_NE = scores_NE.detach()
            if self.n_group > 1:
                N, G = choice_NE.shape[0], self.n_group
                group_NG = choice_NE.view(N, G, -1).max(dim=-1).values
                keep_idx = group_NG.topk(self.topk_group, dim=-1, sorted=False).indices
                keep_NG = torch.zeros_like(group_NG, dtype=torch.bool).scatter_(1, keep_idx, True)
                choice_NE = choice_NE.view(N, G, -1).masked_fill(~keep_NG.unsqueeze(-1), 0.0).view(N, -1)
            topk_idx_NK = routing_replay.choose(self, torch.topk(choice_NE, k=self.top_k, dim=-1, sorted=False).indices)
            return topk_idx_NK, scores_NE.gather(1, topk_idx_NK) * self.routed_scaling_factor, scores_NE
        scores_NE = logits_NE.sigmoid()
        # Selection is a discrete choice: detach so no graph is kept for it.
        choice_NE = scores_NE.detach() + self.e_score_correction_bias
        if self.n_group > 1:  # with one group the limit is a no-op; skip its three extra kernels
            choice_NE = self._limit_groups(choice_NE)
        # sorted=False as in HF: only the set matters, and the same call gives HF's slot order.
        topk_idx_NK = torch.topk(choice_NE, k=self.top_k, dim=-1, sorted=False).indices
        # RL's routing replay may substitute the sampler's choice; the gates still come from these scores
        topk_idx_NK = routing_replay.choose(self, topk_idx_NK)
        topk_weight_NK = scores_NE.gather(1, topk_idx_NK)
        if self.norm_topk_prob:  # sigmoid scores do not sum to 1, so V3 renormalises over the chosen K
            topk_weight_NK = topk_weight_NK / (topk_weight_NK.sum(-1, keepdim=True) + 1e-20)
        return topk_idx_NK, topk_weight_NK * self.routed_scaling_factor, scores_NE

    def _limit_groups(self, choice_NE: torch.Tensor) -> torch.Tensor:
        """Node-limited routing (V3 §2.1.2): mask all but the topk_group groups with the best top-2 sums."""
        N, G = choice_NE.shape[0], self.n_group
        choice_NGX = choice_NE.view(N, G, self.num_experts // G)
        group_score_NG = choice_NGX.topk(2, dim=-1).values.sum(-1)
        keep_idx = group_score_NG.topk(self.topk_group, dim=-1, sorted=False).indices
        keep_NG = torch.zeros_like(group_score_NG, dtype=torch.bool).scatter_(1, keep_idx, True)
        # −inf, not 0 (HF 4.5x used 0.0 and could pick a masked expert when all kept z are negative)
        return choice_NGX.masked_fill(~keep_NG.unsqueeze(-1), float("-inf")).view(N, -1)


# ---------------------------------------------------------------------------------------------
# Routed experts: a loop reference and a sorted / grouped-GEMM fast path
@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device type, dtype) whether torch._grouped_mm runs forward and backward correctly.
    torch ≤ 2.8 has no CPU kernel and CUDA needs SM80+; torch 2.13 runs CPU fp32/bf16 as well."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The first call may come from inside no_grad / inference_mode / autocast (e.g. generation); the probe
    # needs a backward, and a cached False would silently pin the slow path for the whole run.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
        return _probe_grouped_mm(device_type, dtype)


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    try:
        x_SF = torch.randn(24, 16, device=device_type).to(dtype).requires_grad_()
        w_EOF = torch.randn(3, 16, 16, device=device_type).to(dtype).requires_grad_()
        offsets = torch.tensor([8, 8, 24], device=device_type, dtype=torch.int32)  # includes an empty group
        y_SO = torch._grouped_mm(x_SF, w_EOF.transpose(-2, -1), offs=offsets)
        y_SO.backward(torch.ones_like(y_SO))
        ref_SO = torch.cat([x_SF[:8] @ w_EOF[0].T, x_SF[8:] @ w_EOF[2].T])
        return bool(torch.allclose(y_SO.float(), ref_SO.float(), atol=0.5, rtol=0.05))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _block_mm(x_SF: torch.Tensor, w_EFO: torch.Tensor, offsets_E: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Eager y_SO = x_SF @ w_EFO[e] per expert block (block e ends at offsets_E[e]); torch._grouped_mm
    if `grouped` allows it and it runs here, else one mm per block."""
    if grouped and grouped_mm_supported(x_SF.device.type, x_SF.dtype):
        return torch._grouped_mm(x_SF, w_EFO, offs=offsets_E)
    y_SO, start = x_SF.new_empty(x_SF.shape[0], w_EFO.shape[-1]), 0
    for e, end in enumerate(offsets_E.tolist()):
        torch.mm(x_SF[start:end], w_EFO[e], out=y_SO[start:end])
        start = end
    return y_SO


def _block_mm_weight_grad(x_SF: torch.Tensor, g_SO: torch.Tensor, offsets_E: torch.Tensor,
                          grouped: bool) -> torch.Tensor:
    """Eager ∂W: g_EFO[e] = x_eᵀ g_e over each expert's rows (zeros for an expert with no rows)."""
    if grouped and grouped_mm_supported(x_SF.device.type, x_SF.dtype):
        return torch._grouped_mm(x_SF.T, g_SO, offs=offsets_E)
    g_EFO, start = x_SF.new_zeros(offsets_E.shape[0], x_SF.shape[1], g_SO.shape[1]), 0
    for e, end in enumerate(offsets_E.tolist()):
        torch.mm(x_SF[start:end].T, g_SO[start:end], out=g_EFO[e])
        start = end
    return g_EFO


# Under torch.compile the probe cannot run, .tolist() breaks the graph and inductor accepts
# torch._grouped_mm only in bf16. These opaque ops keep the graph whole and run the eager kernels
# inside (the same calls as eager mode), with an explicit backward.
@torch.library.custom_op("sputnik::block_mm", mutates_args=())
def block_mm(x_SF: torch.Tensor, w_EFO: torch.Tensor, offsets_E: torch.Tensor, grouped: bool) -> torch.Tensor:
    return _block_mm(x_SF, w_EFO, offsets_E, grouped)


@block_mm.register_fake
def _(x_SF, w_EFO, offsets_E, grouped):
    return x_SF.new_empty(x_SF.shape[0], w_EFO.shape[-1])


@torch.library.custom_op("sputnik::block_mm_weight_grad", mutates_args=())
def block_mm_weight_grad(x_SF: torch.Tensor, g_SO: torch.Tensor, offsets_E: torch.Tensor,
                         grouped: bool) -> torch.Tensor:
    return _block_mm_weight_grad(x_SF, g_SO, offsets_E, grouped)


@block_mm_weight_grad.register_fake
def _(x_SF, g_SO, offsets_E, grouped):
    return x_SF.new_empty(offsets_E.shape[0], x_SF.shape[1], g_SO.shape[1])


def _block_mm_setup(ctx, inputs, output):
    x_SF, w_EFO, offsets_E, grouped = inputs
    ctx.save_for_backward(x_SF, w_EFO, offsets_E)
    ctx.grouped = grouped


def _block_mm_backward(ctx, g_SO):
    x_SF, w_EFO, offsets_E = ctx.saved_tensors
    g_SO = g_SO.contiguous()
    return (block_mm(g_SO, w_EFO.transpose(-2, -1), offsets_E, ctx.grouped),
            block_mm_weight_grad(x_SF, g_SO, offsets_E, ctx.grouped), None, None)


block_mm.register_autograd(_block_mm_backward, setup_context=_block_mm_setup)


def grouped_linear(x_SF: torch.Tensor, w_EOF: torch.Tensor, counts_E: torch.Tensor,
                   use_grouped_mm: bool | None = None) -> torch.Tensor:
    """y_s = W_{e(s)} x_s for rows sorted by expert (expert e owns the next counts_E[e] rows) -> y_SO.
    use_grouped_mm None = whenever supported here; the fallback is one matmul per expert block."""
    if torch.is_autocast_enabled(x_SF.device.type):  # _grouped_mm is not autocast-aware
        dtype = torch.get_autocast_dtype(x_SF.device.type)
        x_SF, w_EOF = x_SF.to(dtype), w_EOF.to(dtype)
    x_SF = x_SF.to(w_EOF.dtype)
    # Strides must be 16-byte aligned for the CUDA kernel (and CPU kernels of torch <= 2.10).
    aligned = all(n * w_EOF.element_size() % 16 == 0 for n in w_EOF.shape[1:])
    if torch.compiler.is_compiling():
        if w_EOF.is_cuda and w_EOF.dtype == torch.bfloat16 and aligned and use_grouped_mm is not False:
            use_grouped_mm = True  # inductor lowers bf16 CUDA grouped GEMMs itself
        else:  # support is probed when the op runs (eagerly, inside the compiled graph)
            offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
            return block_mm(x_SF, w_EOF.transpose(-2, -1), offsets_E, aligned and use_grouped_mm is not False)
    if use_grouped_mm is None:
        use_grouped_mm = aligned and grouped_mm_supported(x_SF.device.type, w_EOF.dtype)
    if use_grouped_mm:
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return torch._grouped_mm(x_SF, w_EOF.transpose(-2, -1), offs=offsets_E)
    # split/unbind rather than slicing: their backward is one cat/stack, whereas E slices each zero-fill a
    # full-size gradient (measured ~10x slower backward on CPU). .tolist() syncs once on GPU.
    blocks = x_SF.split(counts_E.tolist())
    return torch.cat([F.linear(x_MF, w_OF) for x_MF, w_OF in zip(blocks, w_EOF.unbind(0))])


def routed_experts_loop(x_ND, topk_idx_NK, topk_weight_NK, gate_up_E2ID, down_EDI) -> torch.Tensor:
    """Reference: y_n = Σ_k w_{n,k} · FFN_{idx_{n,k}}(x_n), one plain pass per expert (like HF eager)."""
    acc_dtype = torch.promote_types(x_ND.dtype, torch.float32)  # accumulate gates·outputs in ≥ fp32
    y_ND = torch.zeros(x_ND.shape, device=x_ND.device, dtype=acc_dtype)
    for e in range(gate_up_E2ID.shape[0]):
        token_M, slot_M = torch.where(topk_idx_NK == e)
        gate_MI, up_MI = F.linear(x_ND.index_select(0, token_M), gate_up_E2ID[e]).chunk(2, dim=-1)
        out_MD = F.linear(F.silu(gate_MI) * up_MI, down_EDI[e])
        y_ND.index_add_(0, token_M, (out_MD * topk_weight_NK[token_M, slot_M].unsqueeze(-1)).to(acc_dtype))
    return y_ND.to(x_ND.dtype)


def routed_experts_grouped(x_ND, topk_idx_NK, topk_weight_NK, gate_up_E2ID, down_EDI, counts_E,
                           use_grouped_mm: bool | None = None) -> torch.Tensor:
    """Same sum as routed_experts_loop with no Python loop over tokens: sort the S token-slots by expert,
    gather x once, two grouped matmuls, weight, and scatter back."""
    N, K = topk_idx_NK.shape
    # Stable sort: a deterministic slot order inside each expert block (slot s = n·K + k).
    slot_S = torch.argsort(topk_idx_NK.flatten(), stable=True)
    token_S = slot_S // K
    x_SD = x_ND.index_select(0, token_S)
    gate_SI, up_SI = grouped_linear(x_SD, gate_up_E2ID, counts_E, use_grouped_mm).chunk(2, dim=-1)
    # w·W_down(h) = W_down(w·h): weighting the I-wide hidden instead of the D-wide output halves that
    # multiply and its backward at tiny (I = D/2) and V3 (I = 2048 < D = 7168) sizes.
    weight_S1 = topk_weight_NK.flatten().index_select(0, slot_S).unsqueeze(-1)
    hidden_SI = F.silu(gate_SI) * (up_SI * weight_S1)
    weighted_SD = grouped_linear(hidden_SI, down_EDI, counts_E, use_grouped_mm)
    acc_dtype = torch.promote_types(x_ND.dtype, torch.float32)
    # Un-sort with index_copy_ (a permutation: no collisions) and sum the K slots of each token: unlike
    # index_add_ this is deterministic on CUDA (no atomics) and sums in ≥ fp32 for bf16 activations.
    y_SD = torch.empty(N * K, x_ND.shape[1], device=x_ND.device, dtype=acc_dtype)
    y_SD.index_copy_(0, slot_S, weighted_SD.to(acc_dtype))  # every row is written: empty, not zeros
    return y_SD.view(N, K, -1).sum(1).to(x_ND.dtype)


class Experts(nn.Module):
    """E SwiGLU experts FFN_e(x) = W_down,e (silu(W_gate,e x) ⊙ W_up,e x) as HF 5.x fused tensors:
    gate_up_proj [E, 2I, D] (rows [W_gate; W_up] per expert), down_proj [E, D, I]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        nn.init.normal_(self.gate_up_proj, std=config.initializer_range)  # as HF _init_weights
        nn.init.normal_(self.down_proj, std=config.initializer_range)
        self.impl = config.moe_impl
        self.use_grouped_mm: bool | None = None  # None = auto-detect; tests force the fallback with False

    def forward(self, x_ND, topk_idx_NK, topk_weight_NK, counts_E) -> torch.Tensor:
        if self.impl == "loop":
            return routed_experts_loop(x_ND, topk_idx_NK, topk_weight_NK, self.gate_up_proj, self.down_proj)
        return routed_experts_grouped(x_ND, topk_idx_NK, topk_weight_NK, self.gate_up_proj, self.down_proj,
                                      counts_E, self.use_grouped_mm)


# ---------------------------------------------------------------------------------------------
# The MoE block
@dataclass
class Routing:
    """What an MoE forward reports besides its output, for the trainer's balancing (the model keeps no
    state of its own). load_E: tokens routed to each expert, counted at valid positions only (right
    padding is not load and must not steer the bias); aux_loss: the sequence-wise balance loss of a
    training forward (None in eval mode or when seq_aux_loss_alpha == 0)."""
    load_E: torch.Tensor
    aux_loss: torch.Tensor | None


class MoE(nn.Module):
    """h ↦ Σ_shared FFN^s(h) + Σ_i w_i FFN^r_i(h) (V3 eq. 13; the residual is added by the Block).
    Returns (y, Routing); the aux-loss-free bias moves only when the trainer calls
    Transformer.update_expert_bias with a step's summed load (train/balance.py)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.seq_aux_loss_alpha = config.seq_aux_loss_alpha
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """valid_BT (bool [B, T]): the real tokens of a right-padded batch; None = all of them. On a
        CPU the padding rows are not computed at all (layers.real_token_rows; 0 in the output);
        elsewhere they are, and masked out of the load and the balance loss."""
        B, T, D = x_BTD.shape
        if valid_BT is not None and tuple(valid_BT.shape) != (B, T):
            raise ValueError(f"valid_BT has shape {tuple(valid_BT.shape)}, the tokens of this MoE forward are [{B}, {T}]")
        rows_N = real_token_rows(valid_BT, x_BTD)
        if rows_N is None:
            y_ND, routing = self._forward(x_BTD.reshape(B * T, D), B, T, valid_BT, None)
            return y_ND.view(B, T, D), routing
        y_ND, routing = self.forward_rows(x_BTD.reshape(B * T, D).index_select(0, rows_N), valid_BT, rows_N)
        return y_ND.new_zeros(B * T, D).index_copy(0, rows_N, y_ND).view(B, T, D), routing

    def forward_rows(self, x_ND: torch.Tensor, valid_BT: torch.Tensor, rows_N: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """The layer on the real tokens only: x_ND are the rows rows_N (flat indices) of a right-padded
        batch whose mask is valid_BT [B, T]."""
        return self._forward(x_ND, *valid_BT.shape, valid_BT, rows_N)

    def _forward(self, x_ND, B: int, T: int, valid_BT, rows_N) -> tuple[torch.Tensor, Routing]:
        """x_ND: all B·T rows (rows_N None) or the real ones rows_N."""
        topk_idx_NK, topk_weight_NK, scores_NE = self.gate(x_ND)
        # scatter_add_ instead of bincount: bincount sizes its output from max() and syncs on CUDA.
        flat_S = topk_idx_NK.flatten()
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_ND.device)
        counts_E.scatter_add_(0, flat_S, torch.ones_like(flat_S))
        if valid_BT is None or rows_N is not None:  # every computed row is a real token
            load_E = counts_E.float()
        else:
            load_E = torch.zeros(self.num_experts, device=x_ND.device).scatter_add_(
                0, flat_S, valid_BT.reshape(-1).float().repeat_interleave(self.top_k))
        aux_loss = None
        if self.training and self.seq_aux_loss_alpha > 0:  # a training loss: eval forwards skip it
            scores_BTE, topk_idx_BTK = scores_NE, topk_idx_NK
            if rows_N is not None:  # back to [B, T]: padding rows get scores of 1 (never 0/0), masked out
                scores_BTE = scores_NE.new_ones(B * T, self.num_experts).index_copy(0, rows_N, scores_NE)
                topk_idx_BTK = topk_idx_NK.new_zeros(B * T, self.top_k).index_copy(0, rows_N, topk_idx_NK)
            aux_loss = seq_balance_loss(scores_BTE.view(B, T, -1), topk_idx_BTK.view(B, T, -1), self.seq_aux_loss_alpha,
                                        None if valid_BT is None else valid_BT.to(torch.bool))
        y_ND = self.experts(x_ND, topk_idx_NK, topk_weight_NK, counts_E)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        return y_ND, Routing(load_E, aux_loss)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, gamma: float) -> None:
        """b ← b + γ·sign(mean(c) − c), c = load_E: the tokens each expert received over a whole
        optimizer step (its micro-batches and ranks, summed by the trainer). Not a gradient."""
        if self.gate.softmax:  # V2 routing has no selection bias: nothing to move
            return
        bias_E = self.gate.e_score_correction_bias
        bias_E += expert_bias_delta(load_E.to(device=bias_E.device, dtype=torch.float32), gamma)
