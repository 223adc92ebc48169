"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1): naive form for training and
prefill, weight-absorbed form over a compressed latent cache for decode.

Shape legend: B batch, T new tokens, S cached key positions, D hidden_size, H heads,
N qk_nope_head_dim, R qk_rope_head_dim, K = N + R (qk head dim), V v_head_dim,
Q q_lora_rank, C kv_lora_rank, X = C + R (one cache row), F = R/2.

Module names equal transformers' `DeepseekV3Attention`, so state-dict keys are the HF keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sputnik.model.config import ModelConfig
from sputnik.model.layers import RMSNorm, block_causal_attention
from sputnik.model.rope import apply_rope, softmax_scale

# Largest B·H·T² for the blocked CPU attention: it keeps ~half the T×T probabilities (≈ 32 MB here).
BLOCK_ATTENTION_MAX = 2 ** 24


def cached_weights(owner, name: str, sources: list[torch.Tensor], build, cast: bool = True):
    """Inference-only tensors derived from parameters (fused or pre-multiplied matrices), stored on
    `owner` and rebuilt when a source was replaced (data_ptr) or modified in place (version counter:
    optimizer steps, load_state_dict, .to()). Writes through `p.data` bypass the version counter.

    Under autocast (RL rollouts on a GPU: fp32 master weights, bf16 compute) the fp32 matrices are
    kept a second time, already in the autocast dtype (`cast`; RoPE tables opt out): every consumer is
    a matmul that autocast would cast anyway, so the values are the same, but the step no longer
    re-reads and re-casts every weight."""
    dtype = _autocast_dtype(sources[0]) if cast and sources else None
    if dtype is not None:
        name, base = f"{name}@{dtype}", build
        build = lambda: _cast_floats(base(), dtype)  # noqa: E731
    key = tuple((t.data_ptr(), t._version) for t in sources)
    hit = owner.__dict__.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            value = build()
            # Refresh in place when the layout is unchanged (an optimizer step): the derived tensors keep
            # their addresses, which a captured CUDA graph of the decode step reads (decode_graphs.py).
            if hit is not None and _copy_into(hit[1], value):
                value = hit[1]
        hit = (key, value)
        owner.__dict__[name] = hit  # a plain attribute: not a parameter, buffer or state-dict entry
    return hit[1]


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The lower-precision dtype autocast is running in for t's device, if t is fp32 and it is on."""
    dev = t.device.type
    if t.dtype != torch.float32 or dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _cast_floats(tree, dtype: torch.dtype):
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.dtype == torch.float32 else tree
    if isinstance(tree, dict):
        return {k: _cast_floats(v, dtype) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cast_floats(v, dtype) for v in tree)
    return tree


def _same_layout(old, new) -> bool:
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):  # never write into a parameter
        return (old.shape == new.shape and old.dtype == new.dtype and old.device == new.device
                and old.stride() == new.stride() and not isinstance(old, nn.Parameter))
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same_layout(old[k], new[k]) for k in old)
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same_layout(a, b) for a, b in zip(old, new))
    return type(old) is type(new) and not isinstance(old, torch.Tensor) and old == new


def _copy_into(old, new) -> bool:
    """Copy the tensors of `new` into those of `old` (same nested dict/list/tuple layout, same shapes,
    dtypes, devices and strides, equal non-tensor leaves); False, touching nothing, otherwise."""
    if not _same_layout(old, new):
        return False

    def walk(a, b):
        if isinstance(a, torch.Tensor):
            if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():  # not already the same memory
                a.copy_(b)
        elif isinstance(a, dict):
            for k in a:
                walk(a[k], b[k])
        elif isinstance(a, (list, tuple)):
            for x, y in zip(a, b):
                walk(x, y)

    walk(old, new)
    return True


@dataclass
class DecodeStep:
    """What every layer of one cached forward shares, built once per step (MLACache.decode_step).
    The fast path keeps tokens as rows: N = B·T, row b·T + t."""
    batch: int
    num_new: int  # T
    slots_N: torch.Tensor  # flat cache row b·max_len + position of each new token
    bias_BMS: torch.Tensor  # 0 where key s is visible to query row m = t·H + h, −inf elsewhere ([B, 1, S] if T = 1)
    cos_NR: torch.Tensor  # [cos; cos] at each new token's position (RoPE pairs pre-split, see MLA.decode)
    sin_NR: torch.Tensor  # [−sin; sin]
    kv_len: int  # keys to read: the longest row's last position + 1


def rms_norm_rows(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """RMSNorm.forward for inference in one F.rms_norm call instead of ~12 dispatches (fp32: the same
    values, tested against the module). Other dtypes go through the module (it rounds in between)."""
    if x.dtype != torch.float32:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


class MLACache:
    """Preallocated decode cache holding ONLY what MLA needs (§1.5): per layer one buffer
    kv_BSX = [c_KV (post kv_a_layernorm, C) | k_R (post-RoPE shared key, R)], i.e. C + R numbers
    per token per layer instead of 2·H·K for MHA. Keeping both in one row lets decode score all
    keys with one batched matmul (q̃ and q_R concatenated against [c | k_R]).

    Rows may hold sequences of different lengths: the caller owns `cache_seqlens` [B] (tokens
    already cached per row) and advances it after each step; `prepare` turns it into write
    positions and a key mask shared by all layers of the step.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        self.kv_lora_rank, self.max_len = kv_lora_rank, max_len
        self.kv_BSX = [torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
                       for _ in range(num_layers)]
        self.positions_BT = self.key_mask_BT1S = None

    def select(self, rows_R: torch.Tensor) -> "MLACache":
        """A cache whose row r is a copy of row rows_R[r] (fork n samples of one prompt, or drop
        finished rows). The old cache stays valid."""
        new = MLACache.__new__(MLACache)
        new.kv_lora_rank, new.max_len = self.kv_lora_rank, self.max_len
        new.kv_BSX = [buf.index_select(0, rows_R) for buf in self.kv_BSX]
        new.positions_BT = new.key_mask_BT1S = None
        return new

    @staticmethod
    def concat(caches: list["MLACache"]) -> "MLACache":
        """Stack the rows of several caches (same layers, ranks and max_len) into one: the server's
        scheduler joins a freshly prefilled request to the running batch this way."""
        if not caches:
            raise ValueError("MLACache.concat: no caches")
        first = caches[0]
        new = MLACache.__new__(MLACache)
        new.kv_lora_rank, new.max_len = first.kv_lora_rank, first.max_len
        new.kv_BSX = [torch.cat(bufs, dim=0) for bufs in zip(*(c.kv_BSX for c in caches))]
        new.positions_BT = new.key_mask_BT1S = None
        return new

    def c_kv(self, layer_idx: int) -> torch.Tensor:
        return self.kv_BSX[layer_idx][..., : self.kv_lora_rank]

    def k_rope(self, layer_idx: int) -> torch.Tensor:
        return self.kv_BSX[layer_idx][..., self.kv_lora_rank:]

    def prepare(self, cache_seqlens_B: torch.Tensor, num_new: int) -> torch.Tensor:
        """Positions of the new tokens (seqlen_b + t) and the key mask (key s visible to new token
        t of row b iff s <= seqlen_b + t). One host sync per step (the longest row decides how
        much of the buffer the step reads), not one per layer."""
        steps_T = torch.arange(num_new, device=cache_seqlens_B.device)
        self.positions_BT = cache_seqlens_B.long()[:, None] + steps_T[None, :]
        kv_len = int(self.positions_BT.max()) + 1
        if kv_len > self.max_len:
            raise ValueError(f"cache overflow: a row needs {kv_len} positions, cache holds {self.max_len}")
        keys_S = torch.arange(kv_len, device=cache_seqlens_B.device)
        self.key_mask_BT1S = (keys_S[None, None, :] <= self.positions_BT[:, :, None]).unsqueeze(2)
        return self.positions_BT

    def decode_step(self, cache_seqlens_B: torch.Tensor, num_new: int, num_heads: int, cos2_PR: torch.Tensor,
                    sin2_PR: torch.Tensor, dtype: torch.dtype) -> DecodeStep:
        """The fast path's `prepare`: positions seqlen_b + t, their flat write slots, the key mask as an
        additive bias laid out for baddbmm over T·H query rows, and the RoPE factors. One host sync
        (the longest row decides how much of the buffer the step reads; free on CPU)."""
        B, dev = cache_seqlens_B.shape[0], cache_seqlens_B.device
        pos_BT = cache_seqlens_B.long()[:, None]
        if num_new > 1:
            pos_BT = pos_BT + torch.arange(num_new, device=dev)
        kv_len = int(pos_BT.max()) + 1
        if kv_len > self.max_len:
            raise ValueError(f"cache overflow: a row needs {kv_len} positions, cache holds {self.max_len}")
        slots_N = (pos_BT + torch.arange(0, B * self.max_len, self.max_len, device=dev)[:, None]).view(-1)
        hidden_BTS = torch.arange(kv_len, device=dev) > pos_BT[:, :, None]
        bias_BTS = torch.zeros(hidden_BTS.shape, dtype=dtype, device=dev).masked_fill_(hidden_BTS, float("-inf"))
        if num_new > 1:  # query rows are (t, h) pairs: repeat each t's mask for the H heads
            bias_BTS = bias_BTS[:, :, None].expand(B, num_new, num_heads, kv_len).reshape(B, num_new * num_heads, kv_len)
        pos_N = pos_BT.view(-1)
        return DecodeStep(B, num_new, slots_N, bias_BTS, cos2_PR[pos_N].to(dtype), sin2_PR[pos_N].to(dtype), kv_len)

    def static_step(self, cache_seqlens_B: torch.Tensor, num_heads: int, cos2_PR: torch.Tensor,
                    sin2_PR: torch.Tensor, dtype: torch.dtype, kv_len: int | None = None) -> DecodeStep:
        """decode_step for one token per row with shapes that depend only on (B, max_len): keys are
        the whole buffer (the bias hides the unwritten tail) and there is no host sync, so the step can
        be compiled or captured once per batch size. The caller checks that no row overflows.
        kv_len (eager callers, who know the longest row anyway): read only the first kv_len positions."""
        B, S, dev = cache_seqlens_B.shape[0], self.kv_BSX[0].shape[1], cache_seqlens_B.device  # S = max_len as a
        pos_B = cache_seqlens_B.long()                              # tensor size: dynamic under torch.compile
        slots_B = pos_B + torch.arange(B, device=dev) * S           # flat rows of the [B·max_len, X] buffer
        K = S if kv_len is None else kv_len                         # keys read
        hidden_BK = torch.arange(K, device=dev) > pos_B[:, None]
        bias_B1K = torch.zeros(B, 1, K, dtype=dtype, device=dev).masked_fill_(hidden_BK[:, None], float("-inf"))
        return DecodeStep(B, 1, slots_B, bias_B1K, cos2_PR[pos_B].to(dtype), sin2_PR[pos_B].to(dtype), K)

    def write(self, layer_idx: int, kv_NX: torch.Tensor, step: DecodeStep) -> torch.Tensor:
        """The fast path's `update`: write the new rows at step.slots_N; return kv_BSX[:, :kv_len]."""
        buf_BSX = self.kv_BSX[layer_idx]
        buf_BSX.view(-1, buf_BSX.shape[-1]).index_copy_(0, step.slots_N, kv_NX.to(buf_BSX.dtype))
        return buf_BSX[:, : step.kv_len]

    def update(self, layer_idx: int, kv_BTX: torch.Tensor) -> torch.Tensor:
        """Write the new rows at their positions; return the readable prefix kv_BSX[:, :kv_len]."""
        buf_BSX, pos_BT = self.kv_BSX[layer_idx], self.positions_BT
        rows_BT = torch.arange(buf_BSX.shape[0], device=buf_BSX.device)[:, None].expand_as(pos_BT)
        buf_BSX[rows_BT, pos_BT] = kv_BTX.to(buf_BSX.dtype)
        return buf_BSX[:, : self.key_mask_BT1S.shape[-1]]


class MLA(nn.Module):
    """Multi-head latent attention.

    c_Q = RMSNorm(W_DQ x); [q_C; q_R]_h = W_UQ c_Q (per head [nope | rope]); q_R ← RoPE(q_R)
    [c~; k_R] = W_DKV x; c_KV = RMSNorm(c~); k_R ← RoPE(k_R)  (one rope key shared by all heads)
    [k_C; v]_h = W_UKV c_KV;  k_h = [k_C,h ; k_R]
    o_h = softmax(s · q_h·k_hᵀ + causal) v_h;  out = W_O [o_1; …; o_H]
    s = K^−1/2 (× mscale² under YaRN).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        D, H = config.hidden_size, config.num_attention_heads
        self.H, self.N, self.R, self.V = H, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.C, self.q_lora_rank = config.kv_lora_rank, config.q_lora_rank
        K = self.N + self.R
        if self.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * K, bias=False)
        else:  # V2-Lite style: no query compression
            self.q_proj = nn.Linear(D, H * K, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.C + self.R, bias=False)
        self.kv_a_layernorm = RMSNorm(self.C, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.C, H * (self.N + self.V), bias=False)
        self.o_proj = nn.Linear(H * self.V, D, bias=False)
        self.scale = softmax_scale(config)
        # Pad V to K for SDPA: None = auto (pad where V < K, see _attend_naive), True/False = force.
        self.pad_v: bool | None = None
        # Decode path: pre-multiply W_UK / W_UV (None = auto by size, see _build_decode_weights).
        self.absorb_decode: bool | None = None

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: MLACache | None = None) -> torch.Tensor:
        """cos/sin from RotaryTables: [T,1,F] for positions 0..T−1, or [B,T,1,F] at the cache's
        positions. Without a cache: causal self-attention over the T tokens (training, scoring).
        With a cache (after `cache.prepare`): append the T tokens and attend over the row's past."""
        B, T, _ = x_BTD.shape
        q_nope_BTHN, q_rope_BTHR, c_BTC, k_rope_BT1R = self.project(x_BTD, cos, sin)
        if cache is None:
            o_BTHV = self._attend_naive(q_nope_BTHN, q_rope_BTHR, c_BTC, k_rope_BT1R)
        else:
            kv_BSX = cache.update(self.layer_idx, torch.cat([c_BTC, k_rope_BT1R.squeeze(2)], dim=-1))
            o_BTHV = self._attend_absorbed(q_nope_BTHN, q_rope_BTHR, kv_BSX, cache.key_mask_BT1S)
        return self.o_proj(o_BTHV.reshape(B, T, self.H * self.V))

    def project(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """-> q_nope [B,T,H,N], q_rope [B,T,H,R] (rotated), the normed latent c_KV [B,T,C] and the
        rotated shared key k_R [B,T,1,R]: everything before attention."""
        B, T, _ = x_BTD.shape
        q_BTHK = (self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD))) if self.q_lora_rank > 0
                  else self.q_proj(x_BTD)).view(B, T, self.H, self.N + self.R)
        q_nope_BTHN, q_rope_BTHR = q_BTHK.split([self.N, self.R], dim=-1)
        q_rope_BTHR = apply_rope(q_rope_BTHR, cos, sin)
        c_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.C, self.R], dim=-1)
        c_BTC = self.kv_a_layernorm(c_BTC)  # the RMSNorm touches the latent only, never k_R
        k_rope_BT1R = apply_rope(k_rope_BTR.unsqueeze(2), cos, sin)
        return q_nope_BTHN, q_rope_BTHR, c_BTC, k_rope_BT1R

    def heads(self, q_nope_BTHN, q_rope_BTHR, c_BTC, k_rope_BT1R):
        """Per-head q, k [B,H,T,N+R] and v [B,H,T,V] of the naive (expanded) form."""
        B, T, H = q_nope_BTHN.shape[:3]
        kv_BTHX = self.kv_b_proj(c_BTC).view(B, T, H, self.N + self.V)
        k_nope_BTHN, v_BTHV = kv_BTHX.split([self.N, self.V], dim=-1)
        q_BHTK = torch.cat([q_nope_BTHN, q_rope_BTHR], dim=-1).transpose(1, 2)
        k_BHTK = torch.cat([k_nope_BTHN, k_rope_BT1R.expand(B, T, H, self.R)], dim=-1).transpose(1, 2)
        return q_BHTK, k_BHTK, v_BTHV.transpose(1, 2)

    def _attend_naive(self, q_nope_BTHN, q_rope_BTHR, c_BTC, k_rope_BT1R) -> torch.Tensor:
        """Expanded K/V per head, fused causal SDPA. Cheaper than the absorbed form when queries
        and keys are the same T tokens (K-dim scores instead of C+R; §1.6)."""
        B, T, H = q_nope_BTHN.shape[:3]
        q_BHTK, k_BHTK, v_BHTV = self.heads(q_nope_BTHN, q_rope_BTHR, c_BTC, k_rope_BT1R)
        K = self.N + self.R
        if (q_BHTK.device.type == "cpu" and q_BHTK.dtype == torch.float32 and torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
                and B * H * T * T <= BLOCK_ATTENTION_MAX):
            # CPU training on short sequences: blocked matmuls beat the flash kernel (layers.py)
            o_GTV = block_causal_attention(q_BHTK.reshape(B * H, T, K), k_BHTK.reshape(B * H, T, K),
                                           v_BHTV.reshape(B * H, T, self.V), self.scale)
            return o_GTV.view(B, H, T, self.V).transpose(1, 2)
        # Flash kernels (CUDA flash-attn, and the CPU flash kernel) want the value dim equal to the
        # qk dim; with V < K SDPA falls back to a slower kernel. Zero-padding V to K and slicing the
        # output is exact: the padded columns of p·v are p·0 = 0.
        pad = self.pad_v if self.pad_v is not None else self.V < K
        if pad and self.V != K:
            v_BHTV = F.pad(v_BHTV, (0, K - self.V))
        o_BHTV = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTV, is_causal=True, scale=self.scale)
        return o_BHTV[..., : self.V].transpose(1, 2)

    def _attend_absorbed(self, q_nope_BTHN, q_rope_BTHR, kv_BSX, key_mask_BT1S) -> torch.Tensor:
        """Decode form (§1.6): fold W_UK into the query and W_UV into the output so attention runs
        as MQA over the cached rows [c_KV | k_R]; per-head K and V are never materialised.

        q̃_h = W_UK,hᵀ q_C,h;  score_h,s = s·([q̃_h; q_R,h] · [c_s; k_R,s]);  z_h = Σ_s p_h,s c_s;
        o_h = W_UV,h z_h.
        """
        B, T, H = q_nope_BTHN.shape[:3]
        w_HYC = self.kv_b_proj.weight.view(H, self.N + self.V, self.C)
        w_uk_HNC, w_uv_HVC = w_HYC[:, : self.N], w_HYC[:, self.N:]
        q_lat_BTHC = torch.einsum("bthn,hnc->bthc", q_nope_BTHN, w_uk_HNC)
        q_BMX = torch.cat([q_lat_BTHC, q_rope_BTHR], dim=-1).reshape(B, T * H, self.C + self.R)  # M = T·H
        kv_BSX = kv_BSX.to(q_BMX.dtype)  # no-op unless the cache was allocated in another dtype
        scores_BTHS = torch.bmm(q_BMX, kv_BSX.transpose(1, 2)).view(B, T, H, -1) * self.scale
        scores_BTHS = scores_BTHS.masked_fill(~key_mask_BT1S, float("-inf"))
        p_BMS = torch.softmax(scores_BTHS, dim=-1, dtype=torch.float32).to(q_BMX.dtype).view(B, T * H, -1)
        z_BTHC = torch.bmm(p_BMS, kv_BSX[..., : self.C]).view(B, T, H, self.C)
        return torch.einsum("bthc,hvc->bthv", z_BTHC, w_uv_HVC)

    # --- fast decode path (the engine's forward_cached) ---------------------------------------
    def decode(self, x_ND: torch.Tensor, step: DecodeStep, cache: MLACache, w: dict | None = None) -> torch.Tensor:
        """forward(x, cos, sin, cache) for the inference engine on token rows x_ND (N = B·T), the same
        math reassociated into fewer ops (decode is bound by per-op overhead, not FLOPs, at small batch):
          - every projection is one torch.mm against a cached [in, out] copy of its weight;
          - q_a_proj and kv_a_proj_with_mqa run as one matmul;
          - W_UK is pre-multiplied into W_UQ and W_UV into W_O where the products are small (absorb);
          - RoPE's pair split is a permutation of weight rows, and the projections also emit the halves
            swapped, so the rotation is one addcmul: x·[cos; cos] + swap(x)·[−sin; sin];
          - softmax scale and key mask enter through one baddbmm.
        `w` is `decode_weights()` fetched by the caller (a compiled step takes them as inputs)."""
        w = self.decode_weights() if w is None else w
        B, T, N = step.batch, step.num_new, x_ND.shape[0]
        H, R, C = self.H, self.R, self.C
        a_NA = torch.mm(x_ND, w["a"])  # A = [Q |] C + R + R (rope key, then its swapped halves)
        if self.q_lora_rank > 0:
            q_in, c_NC, k_rope_NR, k_swap_NR = a_NA.split([self.q_lora_rank, C, R, R], dim=-1)
            q_in = rms_norm_rows(q_in, self.q_a_layernorm)
        else:
            q_in, (c_NC, k_rope_NR, k_swap_NR) = x_ND, a_NA.split([C, R, R], dim=-1)
        q_NZ = torch.mm(q_in, w["q"])  # Z = H·Y + H·R: per head [latent or nope | rope], then swapped ropes
        Y = q_NZ.shape[1] // H - R
        q_NHY = q_NZ[:, : H * Y].view(N, H, Y)
        q_rope_NHR = q_NHY[..., Y - R:]
        q_rope_NHR.copy_(torch.addcmul(q_rope_NHR * step.cos_NR[:, None], q_NZ[:, H * Y:].view(N, H, R),
                                       step.sin_NR[:, None]))
        if not w["absorb_q"]:  # Y = N + R: fold W_UK in now (q̃ = W_UKᵀ q_C per head)
            q_lat_NHC = torch.einsum("mhn,hnc->mhc", q_NHY[..., : self.N], w["w_uk_HNC"])
            q_NHY = torch.cat([q_lat_NHC, q_rope_NHR], dim=-1)
        row_NX = torch.cat([rms_norm_rows(c_NC, self.kv_a_layernorm),
                            torch.addcmul(k_rope_NR * step.cos_NR, k_swap_NR, step.sin_NR)], dim=-1)
        kv_BSX = cache.write(self.layer_idx, row_NX, step).to(x_ND.dtype)
        scores_BMS = torch.baddbmm(step.bias_BMS, q_NHY.reshape(B, T * H, C + R), kv_BSX.transpose(1, 2),
                                   alpha=self.scale)  # M = T·H query rows against the shared [c | k_R] keys
        p_BMS = (torch.softmax(scores_BMS, dim=-1) if scores_BMS.dtype == torch.float32
                 else torch.softmax(scores_BMS, dim=-1, dtype=torch.float32).to(x_ND.dtype))
        z_BMC = torch.bmm(p_BMS, kv_BSX[..., :C])
        if w["absorb_o"]:
            return torch.mm(z_BMC.view(N, H * C), w["o"])
        o_NHV = torch.einsum("mhc,hvc->mhv", z_BMC.view(N, H, C), w["w_uv_HVC"])
        return torch.mm(o_NHV.reshape(N, H * self.V), w["o"])

    def decode_weights(self) -> dict:
        w_q = self.q_b_proj.weight if self.q_lora_rank > 0 else self.q_proj.weight
        sources = [w_q, self.kv_a_proj_with_mqa.weight, self.kv_b_proj.weight, self.o_proj.weight]
        if self.q_lora_rank > 0:
            sources.append(self.q_a_proj.weight)
        return cached_weights(self, "_decode_weights_cache", sources, self._build_decode_weights)

    def _build_decode_weights(self) -> dict:
        """[in, out] matrices for decode. Absorbing is one matmul instead of two but the product can
        be larger than the factors: do it while it is at most 2x their size (tiny: yes; V3, where
        C = 512 ≫ N = V = 128: no). `self.absorb_decode` (None = auto) forces either way."""
        H, N, R, V, C = self.H, self.N, self.R, self.V, self.C
        w_q = self.q_b_proj.weight if self.q_lora_rank > 0 else self.q_proj.weight
        q_in, D, dtype = w_q.shape[1], self.o_proj.weight.shape[0], w_q.dtype
        evens_odds = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)]).to(w_q.device)  # apply_rope's split
        odds_evens = evens_odds.roll(R // 2)  # the same halves swapped
        kv_a = self.kv_a_proj_with_mqa.weight
        kv_a = torch.cat([kv_a[:C], kv_a[C:][evens_odds], kv_a[C:][odds_evens]])
        a = torch.cat([self.q_a_proj.weight, kv_a]) if self.q_lora_rank > 0 else kv_a
        w_uk_HNC, w_uv_HVC = self.kv_b_proj.weight.view(H, N + V, C).split([N, V], dim=1)
        w_q_HKQ = w_q.view(H, N + R, q_in)
        absorb_q = self.absorb_decode if self.absorb_decode is not None else C * q_in <= 2 * (N * q_in + N * C)
        absorb_o = self.absorb_decode if self.absorb_decode is not None else D * C <= 2 * (D * V + V * C)
        nope_HYQ = (torch.einsum("hnc,hnq->hcq", w_uk_HNC.float(), w_q_HKQ[:, :N].float()).to(dtype)
                    if absorb_q else w_q_HKQ[:, :N])
        rope_HRQ = w_q_HKQ[:, N:]
        q = torch.cat([torch.cat([nope_HYQ, rope_HRQ[:, evens_odds]], dim=1).reshape(-1, q_in),
                       rope_HRQ[:, odds_evens].reshape(-1, q_in)])
        o = (torch.einsum("dhv,hvc->hcd", self.o_proj.weight.view(D, H, V).float(), w_uv_HVC.float())
             .to(dtype).reshape(H * C, D) if absorb_o else self.o_proj.weight.t())
        return {"a": a.t().contiguous(), "q": q.t().contiguous(), "o": o.contiguous(), "absorb_q": absorb_q,
                "absorb_o": absorb_o, "w_uk_HNC": w_uk_HNC, "w_uv_HVC": w_uv_HVC}
