"""CUDA-graph replay of the engine's decode step, one graph per batch-size bucket.

A decode step of a small model on a GPU launches a few hundred short kernels; at batch 1 the host
spends longer launching them than the GPU spends running them. Captured once into a CUDA graph, the
whole step is one launch. Capture needs fixed addresses and shapes, so the runner owns:
  - a static MLA cache [rows, max_len] that waves are copied into (after the prefill and the fork),
    compacted in place as rows finish;
  - static inputs (token and cached length per row) and, per bucket b, the logits [b, V] the graph
    writes. A live batch of B rows replays the smallest captured bucket b >= B; rows B..b-1 are
    padding (length 0, token 0) and write only their own unused cache rows;
  - the weights the step reads: Transformer.decode_weights() refreshes its derived copies in place
    (mla.cached_weights), and parameters are updated in place by the optimizers, so an RL update
    between rollouts is seen by the graphs. A parameter or derived tensor that moved (`.to()`,
    `load_state_dict` with a new layout) drops every graph and they are captured again.

The step is Transformer's static decode step (whole-buffer attention under a −inf bias, MoE through
the grouped GEMM with offsets on the device): no host sync, so it can be captured. Sampling stays
outside the graph. The first replay of each new graph is checked against the eager step on the same
inputs; a mismatch or any capture error turns graphs off for this runner with a warning (a logged,
bounded fallback: eager decoding is correct, only slower).

`capture=False` runs the same buffers, bucketing, padding and compaction with a plain call instead of
a graph: the CPU tests check everything except the capture itself that way. That is also how a
compiled step runs on CPU, with static shapes (one graph per bucket), and there `step_sampled` ends
the compiled step with the sampling (engine.sample_plain, the rows' uniforms drawn by the engine):
its ~10 small ops over [B, V] cost ~8% of a batch-1 step as separate eager calls.
"""
from __future__ import annotations

import logging
import math

import torch

from sputnik.inference.engine import mask_vocab, sample_plain
from sputnik.model.mla import MLACache
from sputnik.model.transformer import compile_static_shapes

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
LEN_ALIGN = 128  # the static cache's length is the wave's rounded up: fewer re-captures as lengths vary
# Without capture (CPU), every position of the static buffer is read each step and a new length is a
# recompile either way: a finer alignment wastes less attention on empty positions.
LEN_ALIGN_NO_CAPTURE = 32


def bucket_for(rows: int) -> int:
    for b in BUCKETS:
        if b >= rows:
            return b
    return int(math.ceil(rows / 256) * 256)


def step_and_sample(model, tok_B, cache, cache_seqlens_B, weights, u_B1, temperature: float,
                    vocab_limit: int | None):
    """The static decode step, then engine.sample_plain on its logits (engine.mask_vocab first, as the
    engine's eager path) -> (logits_BV, tokens_B, logprobs_B); one function, so one compiled graph."""
    logits_BV = model.decode_step_fn(False)(model, tok_B, cache, cache_seqlens_B, weights)
    tokens_B, logprobs_B = sample_plain(mask_vocab(logits_BV, vocab_limit), u_B1, temperature)
    return logits_BV, tokens_B, logprobs_B


_compiled_step_and_sample = None


def compiled_step_and_sample():
    """step_and_sample compiled for static shapes (as Transformer.decode_step_fn(static_shapes=True));
    made once per process."""
    global _compiled_step_and_sample
    if _compiled_step_and_sample is None:
        _compiled_step_and_sample = compile_static_shapes(step_and_sample)
    return _compiled_step_and_sample


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


class DecodeGraphs:
    def __init__(self, model, compiled: bool = False, capture: bool | None = None):
        """model: a sputnik Transformer (has decode_weights / decode_step_fn). compiled: capture the
        torch.compile'd step instead of the eager one. capture: None = on CUDA devices. Compiled and
        not captured (CPU): the step is compiled for static shapes, one graph per bucket (see
        Transformer.decode_step_fn)."""
        self.model = model
        dev = model.lm_head.weight.device
        self.capture = (dev.type == "cuda") if capture is None else capture
        if self.capture and dev.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.fn = model.decode_step_fn(compiled, static_shapes=compiled and not self.capture)  # what is captured
        self.eager = model.decode_step_fn(False)  # what each new graph is checked against
        self.len_align = LEN_ALIGN if self.capture else LEN_ALIGN_NO_CAPTURE
        # Sampling inside the step: compiled steps without capture (CPU). Buckets checked so far.
        self.sampled_fn = compiled_step_and_sample() if compiled and not self.capture else None
        self.sampled_checked: set[int] = set()
        self.disabled: str | None = None  # why graphs were turned off, if they were
        self.cache: MLACache | None = None
        self.rows = 0  # live rows at the front of the static cache
        self.graphs: dict[int, object] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None
        self._weights = None
        self._param_key = None
        self.stats = {"captures": 0, "replays": 0}

    # --- the static cache -------------------------------------------------------------------
    def adopt(self, cache: MLACache) -> None:
        """Copy a wave's cache (after prefill and fork) into the static cache's first rows."""
        B, L = cache.kv_BSX[0].shape[:2]
        buf = self.cache.kv_BSX[0] if self.cache is not None else None
        max_pos = self.model.config.max_position_embeddings
        length = max(L, min(int(math.ceil(L / self.len_align) * self.len_align), max_pos))  # aligned, within the RoPE tables
        if (buf is None or len(self.cache.kv_BSX) != len(cache.kv_BSX) or buf.shape[0] < bucket_for(B)
                or buf.shape[1] < L or buf.dtype != cache.kv_BSX[0].dtype or buf.device != cache.kv_BSX[0].device):
            rows = max(bucket_for(B), buf.shape[0] if buf is not None else 0)
            length = max(length, buf.shape[1] if buf is not None else 0)
            self._reset()
            src = cache.kv_BSX[0]
            self.cache = MLACache(len(cache.kv_BSX), rows, length, cache.kv_lora_rank,
                                  src.shape[-1] - cache.kv_lora_rank, src.dtype, src.device)
            self.tok = torch.zeros(rows, dtype=torch.long, device=src.device)
            self.seqlens = torch.zeros(rows, dtype=torch.long, device=src.device)
        for dst, src in zip(self.cache.kv_BSX, cache.kv_BSX):
            dst[:B, :L].copy_(src)
        self.rows = B
        # Weights cannot change inside a wave (generation runs under no_grad): check them once per wave.
        self._current_weights()

    def compact(self, keep_R: torch.Tensor) -> None:
        """Rows keep_R (indices into the live rows) move to the front, in order."""
        for buf in self.cache.kv_BSX:
            buf[: keep_R.shape[0]] = buf.index_select(0, keep_R)
        self.rows = keep_R.shape[0]

    # --- one step --------------------------------------------------------------------------
    def step(self, tok_B: torch.Tensor, seqlens_B: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the next token for the B live rows (their tokens and cached lengths)."""
        B, b = self._stage(tok_B, seqlens_B)
        weights = self._weights
        if b not in self.graphs:
            return self._capture(b, weights)[:B]
        self.stats["replays"] += 1
        if not self.capture:  # a plain call: its output is already a fresh tensor
            return self._call(b, weights)[:B]
        self.graphs[b]()
        return self.logits[b][:B]

    def can_sample(self, params) -> bool:
        """Whether step_sampled serves these sampling settings (no top-k/top-p; a compiled CPU step)."""
        return self.sampled_fn is not None and params.top_k == 0 and params.top_p == 1.0

    def step_sampled(self, tok_B: torch.Tensor, seqlens_B: torch.Tensor, u_B1: torch.Tensor | None,
                     temperature: float, vocab_limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens_B, logprobs_B) of the next token for the B live rows: the step and the sampling
        (engine.sample_plain with the rows' uniforms u_B1, None when greedy) in one compiled call. The
        first call of each bucket is checked against the eager step's logits, as step() checks graphs."""
        B, b = self._stage(tok_B, seqlens_B)
        u_b1 = None
        if u_B1 is not None:  # padding rows sample too (and are dropped): any uniform will do
            u_b1 = torch.cat([u_B1, u_B1.new_full((b - B, 1), 0.5)]) if b > B else u_B1
        weights = self._weights
        logits_bV, tok_b, logp_b = self.sampled_fn(self.model, self.tok[:b], self._view(b), self.seqlens[:b],
                                                   weights, u_b1, temperature, vocab_limit)
        if b in self.sampled_checked:
            self.stats["replays"] += 1
            return tok_b[:B], logp_b[:B]
        self.sampled_checked.add(b)
        self.stats["captures"] += 1
        want = self._check(logits_bV, b, weights, "compiled step")
        if self.disabled:
            tok_b, logp_b = sample_plain(mask_vocab(want, vocab_limit), u_b1, temperature)
        return tok_b[:B], logp_b[:B]

    def _stage(self, tok_B: torch.Tensor, seqlens_B: torch.Tensor) -> tuple[int, int]:
        """Copy the live rows' tokens and lengths into the static inputs, zero the padding rows of
        their bucket -> (B live rows, bucket b)."""
        B = tok_B.shape[0]
        if B != self.rows:
            raise ValueError(f"DecodeGraphs: {B} tokens for {self.rows} live rows")
        b = bucket_for(B)
        if b > self.cache.kv_BSX[0].shape[0]:
            raise ValueError(f"DecodeGraphs: bucket {b} > static rows {self.cache.kv_BSX[0].shape[0]}")
        self.tok[:B].copy_(tok_B)
        self.tok[B:b].zero_()
        self.seqlens[:B].copy_(seqlens_B)
        self.seqlens[B:b].zero_()
        return B, b

    def _check(self, got_bV: torch.Tensor, b: int, weights, what: str) -> torch.Tensor:
        """The eager step on the same inputs (run last, so the cache ends up holding its writes either
        way) -> its logits; turns the runner off if `got_bV` differs from them."""
        want = self.eager(self.model, self.tok[:b], self._view(b), self.seqlens[:b], weights)
        err = float((got_bV.float() - want.float()).abs().max())
        if not err <= 1e-3 * (1.0 + float(want.float().abs().max())):  # also catches NaN
            self.disable(f"{what} differs from the eager step by {err:.3g} (bucket {b})")
        return want

    def _view(self, b: int) -> MLACache:
        view = MLACache.__new__(MLACache)
        view.kv_lora_rank, view.max_len = self.cache.kv_lora_rank, self.cache.max_len
        view.kv_BSX = [buf[:b] for buf in self.cache.kv_BSX]
        view.positions_BT = view.key_mask_BT1S = None
        return view

    def _call(self, b: int, weights) -> torch.Tensor:
        return self.fn(self.model, self.tok[:b], self._view(b), self.seqlens[:b], weights)

    def _capture(self, b: int, weights) -> torch.Tensor:
        """Capture bucket b, replay it once and check it against the eager step on the same inputs
        (which runs last, so the cache ends up holding the eager step's writes either way)."""
        self.stats["captures"] += 1
        if self.capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: library handles, lazy probes, autotuning
                for _ in range(2):
                    self._call(b, weights)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[b] = self._call(b, weights)
            self.pool = graph.pool()
            self.graphs[b] = graph.replay
            graph.replay()
        else:  # the same buffers, a plain call in place of the replay
            self.logits[b] = self._call(b, weights)
            self.graphs[b] = True
        return self._check(self.logits[b], b, weights, "graph replay")

    # --- weights -------------------------------------------------------------------------
    def _current_weights(self):
        """decode_weights() of now; drops the graphs if any tensor they read has moved."""
        weights = self.model.decode_weights()
        params = tuple(p.data_ptr() for p in self.model.parameters())
        ptrs = tuple(t.data_ptr() for t in _tensors(weights))
        if self._weights is None or (params, ptrs) != self._param_key:
            if self.graphs:
                log.info("decode graphs: weights moved, capturing again")
            self.graphs, self.logits, self.pool, self.sampled_checked = {}, {}, None, set()
            self._param_key = (params, ptrs)
        self._weights = weights
        return weights

    def _reset(self) -> None:
        self.graphs, self.logits, self.pool, self.cache, self.sampled_checked = {}, {}, None, None, set()

    def disable(self, why: str) -> None:
        """Turn graphs off for good; the static cache stays readable for export()."""
        self.disabled = why
        log.warning("decode graphs (%s) off: %s; decoding eagerly", "CUDA graphs" if self.capture else "compiled, static shapes", why)
        self.graphs, self.logits, self.pool = {}, {}, None

    def export(self) -> MLACache:
        """The live rows as an ordinary cache (to go on eagerly after disable())."""
        out = MLACache.__new__(MLACache)
        out.kv_lora_rank, out.max_len = self.cache.kv_lora_rank, self.cache.max_len
        out.kv_BSX = [buf[: self.rows].clone() for buf in self.cache.kv_BSX]
        out.positions_BT = out.key_mask_BT1S = None
        return out
