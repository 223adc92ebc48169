"""Multi-head latent attention for decoding: the weight-absorbed form over a compressed latent cache
(DeepSeek-V2 §2.1.2, V3 §2.1.1), on token rows, over derived weight copies.

The cache holds per layer and token only [c_KV | k_R] (C + R numbers, the normed latent and the
rotated shared rope key) instead of 2·H·K for multi-head attention. Folding W_UK into the query and
W_UV into the output makes attention an MQA over those rows:
    q̃_h = W_UK,hᵀ q_C,h;  score_h,s = s·([q̃_h; q_R,h] · [c_s; k_R,s]);  z_h = Σ_s p_h,s c_s;  o_h = W_UV,h z_h.
Why not in the model: training sees queries and keys that are the same T tokens, where the expanded
per-head form is cheaper (model/mla.py); one query against a long cache is the absorbed form's case.
tests/oracles.py keeps the absorbed form written plainly, which mla_decode is tested against.

Shape legend: B batch, T new tokens, S cached key positions, D hidden_size, H heads,
N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, Q q_lora_rank, C kv_lora_rank, X = C + R (one
cache row), M = T·H query rows, N (rows) = B·T tokens where no head dim is involved.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sputnik.inference.weights import cached_weights
from sputnik.model.mla import MLA


@dataclass
class DecodeStep:
    """What every layer of one cached forward shares, built once per step (MLACache.decode_step).
    The fast path keeps tokens as rows: N = B·T, row b·T + t."""
    batch: int
    num_new: int  # T
    slots_N: torch.Tensor  # flat cache row b·max_len + position of each new token
    bias_BMS: torch.Tensor  # 0 where key s is visible to query row m = t·H + h, −inf elsewhere ([B, 1, S] if T = 1)
    cos_NR: torch.Tensor  # [cos; cos] at each new token's position (RoPE pairs pre-split, see mla_decode)
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
    already cached per row) and advances it after each step; `decode_step` / `static_step` turn it
    into write slots and a key mask shared by all layers of the step.

    A model with Abacus positions also caches each position's place index (abacus_BS, int64): a new
    digit's place is its left neighbour's plus one (model/abacus.py). Every row operation below moves
    it with the latent rows.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None, abacus: bool = False):
        self.kv_lora_rank, self.max_len = kv_lora_rank, max_len
        self.kv_BSX = [torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
                       for _ in range(num_layers)]
        self.abacus_BS = torch.zeros(batch, max_len, dtype=torch.long, device=device) if abacus else None

    def _like(self, kv_BSX: list[torch.Tensor], abacus_BS: torch.Tensor | None) -> "MLACache":
        new = MLACache.__new__(MLACache)
        new.kv_lora_rank, new.max_len, new.kv_BSX, new.abacus_BS = self.kv_lora_rank, self.max_len, kv_BSX, abacus_BS
        return new

    def _buffers(self) -> list[torch.Tensor]:
        return self.kv_BSX + ([] if self.abacus_BS is None else [self.abacus_BS])

    def select(self, rows_R: torch.Tensor) -> "MLACache":
        """A cache whose row r is a copy of row rows_R[r] (fork n samples of one prompt, or drop
        finished rows). The old cache stays valid."""
        return self._like([buf.index_select(0, rows_R) for buf in self.kv_BSX],
                          None if self.abacus_BS is None else self.abacus_BS.index_select(0, rows_R))

    @staticmethod
    def concat(caches: list["MLACache"]) -> "MLACache":
        """Stack the rows of several caches (same layers, ranks and max_len) into one: the server's
        scheduler joins a freshly prefilled request to the running batch this way."""
        if not caches:
            raise ValueError("MLACache.concat: no caches")
        first = caches[0]
        abacus = None if first.abacus_BS is None else torch.cat([c.abacus_BS for c in caches])
        return first._like([torch.cat(bufs, dim=0) for bufs in zip(*(c.kv_BSX for c in caches))], abacus)

    def first_rows(self, rows: int, copy: bool = False) -> "MLACache":
        """The first `rows` rows as a cache: views of these buffers (a static cache's live part), or
        copies."""
        take = (lambda buf: buf[:rows].clone()) if copy else (lambda buf: buf[:rows])  # noqa: E731
        return self._like([take(buf) for buf in self.kv_BSX], None if self.abacus_BS is None else take(self.abacus_BS))

    # --- what a static cache needs (graphs.GraphDecoder): shape, a zeroed twin, in-place row moves
    @property
    def rows_and_length(self) -> tuple[int, int]:
        return tuple(self.kv_BSX[0].shape[:2])

    def compatible(self, other: "MLACache") -> bool:
        """Whether `other`'s rows can be copied into this (larger) buffer."""
        a, b = self.kv_BSX[0], other.kv_BSX[0]
        return (len(self.kv_BSX) == len(other.kv_BSX) and a.shape[2] == b.shape[2] and a.dtype == b.dtype
                and a.device == b.device and (self.abacus_BS is None) == (other.abacus_BS is None))

    def zeros_like(self, rows: int, length: int) -> "MLACache":
        src = self.kv_BSX[0]
        return MLACache(len(self.kv_BSX), rows, length, self.kv_lora_rank, src.shape[-1] - self.kv_lora_rank,
                        src.dtype, src.device, abacus=self.abacus_BS is not None)

    def write_front(self, other: "MLACache") -> None:
        """Copy `other` (B rows, L positions) into this cache's first rows and positions."""
        B, L = other.rows_and_length
        for dst, src in zip(self._buffers(), other._buffers()):
            dst[:B, :L].copy_(src)

    def keep_front(self, rows_R: torch.Tensor) -> None:
        """Rows rows_R move to the front, in order, in place."""
        for buf in self._buffers():
            buf[: rows_R.shape[0]] = buf.index_select(0, rows_R)

    def abacus_places(self, ids_BT: torch.Tensor, cache_seqlens_B: torch.Tensor, abacus) -> torch.Tensor:
        """Place indices of T new tokens per row at positions seqlen_b + t, continuing each row's run
        from its cached left neighbour; written into abacus_BS (no host sync: a static step may run it)."""
        B, T = ids_BT.shape
        pos_B = cache_seqlens_B.long()
        rows_B = torch.arange(B, device=ids_BT.device)
        previous_B = self.abacus_BS[rows_B, (pos_B - 1).clamp(min=0)] * (pos_B > 0)
        index_BT = abacus.indices(ids_BT, previous_B)
        write_BT = (pos_B[:, None] + torch.arange(T, device=ids_BT.device)).clamp(max=self.max_len - 1)
        self.abacus_BS.scatter_(1, write_BT, index_BT)
        return index_BT

    def c_kv(self, layer_idx: int) -> torch.Tensor:
        return self.kv_BSX[layer_idx][..., : self.kv_lora_rank]

    def k_rope(self, layer_idx: int) -> torch.Tensor:
        return self.kv_BSX[layer_idx][..., self.kv_lora_rank:]

    def decode_step(self, cache_seqlens_B: torch.Tensor, num_new: int, num_heads: int, cos2_PR: torch.Tensor,
                    sin2_PR: torch.Tensor, dtype: torch.dtype) -> DecodeStep:
        """A cached forward's positions seqlen_b + t, their flat write slots, the key mask as an
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
        """Write the new rows at step.slots_N; return the readable prefix kv_BSX[:, :kv_len]."""
        buf_BSX = self.kv_BSX[layer_idx]
        buf_BSX.view(-1, buf_BSX.shape[-1]).index_copy_(0, step.slots_N, kv_NX.to(buf_BSX.dtype))
        return buf_BSX[:, : step.kv_len]


def mla_decode(attn: MLA, x_ND: torch.Tensor, step: DecodeStep, cache: MLACache, w: dict | None = None) -> torch.Tensor:
    """MLA.forward for T new tokens per row over the latent cache, on token rows x_ND (N = B·T): the
    absorbed form (module docstring), reassociated into fewer ops (decode is bound by per-op overhead, not FLOPs, at small batch):
      - every projection is one torch.mm against a cached [in, out] copy of its weight;
      - q_a_proj and kv_a_proj_with_mqa run as one matmul;
      - W_UK is pre-multiplied into W_UQ and W_UV into W_O where the products are small (absorb);
      - RoPE's pair split is a permutation of weight rows, and the projections also emit the halves
        swapped, so the rotation is one addcmul: x·[cos; cos] + swap(x)·[−sin; sin];
      - softmax scale and key mask enter through one baddbmm.
    `w` is mla_decode_weights(attn), fetched by the caller (a compiled step takes them as inputs)."""
    w = mla_decode_weights(attn) if w is None else w
    B, T, N = step.batch, step.num_new, x_ND.shape[0]
    H, R, C = attn.H, attn.R, attn.C
    a_NA = torch.mm(x_ND, w["a"])  # A = [Q |] C + R + R (rope key, then its swapped halves)
    if attn.q_lora_rank > 0:
        q_in, c_NC, k_rope_NR, k_swap_NR = a_NA.split([attn.q_lora_rank, C, R, R], dim=-1)
        q_in = rms_norm_rows(q_in, attn.q_a_layernorm)
    else:
        q_in, (c_NC, k_rope_NR, k_swap_NR) = x_ND, a_NA.split([C, R, R], dim=-1)
    q_NZ = torch.mm(q_in, w["q"])  # Z = H·Y + H·R: per head [latent or nope | rope], then swapped ropes
    Y = q_NZ.shape[1] // H - R
    q_NHY = q_NZ[:, : H * Y].view(N, H, Y)
    q_rope_NHR = q_NHY[..., Y - R:]
    q_rope_NHR.copy_(torch.addcmul(q_rope_NHR * step.cos_NR[:, None], q_NZ[:, H * Y:].view(N, H, R),
                                   step.sin_NR[:, None]))
    if not w["absorb_q"]:  # Y = N + R: fold W_UK in now (q̃ = W_UKᵀ q_C per head)
        q_lat_NHC = torch.einsum("mhn,hnc->mhc", q_NHY[..., : attn.N], w["w_uk_HNC"])
        q_NHY = torch.cat([q_lat_NHC, q_rope_NHR], dim=-1)
    row_NX = torch.cat([rms_norm_rows(c_NC, attn.kv_a_layernorm),
                        torch.addcmul(k_rope_NR * step.cos_NR, k_swap_NR, step.sin_NR)], dim=-1)
    kv_BSX = cache.write(attn.layer_idx, row_NX, step).to(x_ND.dtype)
    scores_BMS = torch.baddbmm(step.bias_BMS, q_NHY.reshape(B, T * H, C + R), kv_BSX.transpose(1, 2),
                               alpha=attn.scale)  # M = T·H query rows against the shared [c | k_R] keys
    p_BMS = (torch.softmax(scores_BMS, dim=-1) if scores_BMS.dtype == torch.float32
             else torch.softmax(scores_BMS, dim=-1, dtype=torch.float32).to(x_ND.dtype))
    z_BMC = torch.bmm(p_BMS, kv_BSX[..., :C])
    if w["absorb_o"]:
        return torch.mm(z_BMC.view(N, H * C), w["o"])
    o_NHV = torch.einsum("mhc,hvc->mhv", z_BMC.view(N, H, C), w["w_uv_HVC"])
    return torch.mm(o_NHV.reshape(N, H * attn.V), w["o"])


def mla_decode_weights(attn: MLA, absorb: bool | None = None) -> dict:
    """The [in, out] matrices mla_decode reads, derived from attn's parameters (weights.cached_weights).
    absorb: pre-multiply W_UK into W_UQ and W_UV into W_O (None = where the products stay small)."""
    w_q = attn.q_b_proj.weight if attn.q_lora_rank > 0 else attn.q_proj.weight
    sources = [w_q, attn.kv_a_proj_with_mqa.weight, attn.kv_b_proj.weight, attn.o_proj.weight]
    if attn.q_lora_rank > 0:
        sources.append(attn.q_a_proj.weight)
    return cached_weights(attn, f"mla_decode(absorb={absorb})", sources, lambda: _build_mla_weights(attn, absorb))

def _build_mla_weights(attn: MLA, absorb: bool | None) -> dict:
    """[in, out] matrices for decode. Absorbing is one matmul instead of two but the product can
    be larger than the factors: do it while it is at most 2x their size (tiny: yes; V3, where
    C = 512 ≫ N = V = 128: no); `absorb` (None = auto) forces either way."""
    H, N, R, V, C = attn.H, attn.N, attn.R, attn.V, attn.C
    w_q = attn.q_b_proj.weight if attn.q_lora_rank > 0 else attn.q_proj.weight
    q_in, D, dtype = w_q.shape[1], attn.o_proj.weight.shape[0], w_q.dtype
    evens_odds = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)]).to(w_q.device)  # apply_rope's split
    odds_evens = evens_odds.roll(R // 2)  # the same halves swapped
    kv_a = attn.kv_a_proj_with_mqa.weight
    kv_a = torch.cat([kv_a[:C], kv_a[C:][evens_odds], kv_a[C:][odds_evens]])
    a = torch.cat([attn.q_a_proj.weight, kv_a]) if attn.q_lora_rank > 0 else kv_a
    w_uk_HNC, w_uv_HVC = attn.kv_b_proj.weight.view(H, N + V, C).split([N, V], dim=1)
    w_q_HKQ = w_q.view(H, N + R, q_in)
    absorb_q = absorb if absorb is not None else C * q_in <= 2 * (N * q_in + N * C)
    absorb_o = absorb if absorb is not None else D * C <= 2 * (D * V + V * C)
    nope_HYQ = (torch.einsum("hnc,hnq->hcq", w_uk_HNC.float(), w_q_HKQ[:, :N].float()).to(dtype)
                if absorb_q else w_q_HKQ[:, :N])
    rope_HRQ = w_q_HKQ[:, N:]
    q = torch.cat([torch.cat([nope_HYQ, rope_HRQ[:, evens_odds]], dim=1).reshape(-1, q_in),
                   rope_HRQ[:, odds_evens].reshape(-1, q_in)])
    o = (torch.einsum("dhv,hvc->hcd", attn.o_proj.weight.view(D, H, V).float(), w_uv_HVC.float())
         .to(dtype).reshape(H * C, D) if absorb_o else attn.o_proj.weight.t())
    return {"a": a.t().contiguous(), "q": q.t().contiguous(), "o": o.contiguous(), "absorb_q": absorb_q,
            "absorb_o": absorb_o, "w_uk_HNC": w_uk_HNC, "w_uv_HVC": w_uv_HVC}
