"""Decoding our own models (DeepSeek-V3, the dense families) from one compiled or captured graph per batch
bucket: CUDA graphs on a GPU, the static-shape compiled step on a CPU.

A decode step of a small model on a GPU launches a few hundred short kernels; at batch 1 the host
spends longer launching them than the GPU spends running them. Captured once into a CUDA graph, the
whole step is one launch. Capture needs fixed addresses and shapes, so the decoder owns:
  - a static cache [rows, max_len] (MLA latents or GQA keys/values: the cache's zeros_like,
    write_front, keep_front, first_rows) that waves are copied into (after the prefill and the fork),
    compacted in place as rows finish;
  - static inputs (token and cached length per row) and, per bucket b, the logits [b, V] the graph
    writes. A live batch of B rows replays the smallest captured bucket b >= B; rows B..b-1 are
    padding (length 0, token 0) and write only their own unused cache rows;
  - the weights the step reads: DeepSeekCachedModel.step_weights() refreshes its derived copies in
    place (weights.cached_weights), and parameters are updated in place by the optimizers, so an RL
    update between rollouts is seen by the graphs. A parameter or derived tensor that moved (`.to()`,
    `load_state_dict` with a new layout) drops every graph and they are captured again.

The step is the cached model's static_step (deepseek.static_step: whole-buffer attention under a −inf
bias, MoE through the grouped GEMM with offsets on the device; llama.static_step: whole-buffer SDPA
under a mask): no host sync, so it can be captured. The first replay of each new
graph is checked against the eager step on the same inputs; a mismatch or any capture error sets
`failed`, and the engine swaps in an eager decoder on this one's cache (a logged, bounded fallback:
eager decoding is correct, only slower).

Without capture (CPU) the same buffers, bucketing, padding and compaction run a plain call of the step
compiled for static shapes (one graph per bucket), which `sample_step` ends with the sampling
(sampling.sample_plain with the rows' uniforms drawn by the engine): its ~10 small ops over [B, V]
cost ~8% of a batch-1 step as separate eager calls. The CPU tests exercise everything but the
capture call itself that way.
"""
from __future__ import annotations

import logging
import math

import torch

from sputnik.inference.decoders import EagerDecoder, compiled_step, prefill
from sputnik.inference.deepseek import static_step
from sputnik.inference.llama import static_step as llama_static_step
from sputnik.inference.sampling import mask_vocab, sample_plain
from sputnik.inference.weights import tensors

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


def then_sample(step):
    """`step` (a static_step), then sampling.sample_plain on its logits (sampling.mask_vocab first, as the
    engine's eager path) -> (logits_BV, tokens_B, logprobs_B); one function, so one compiled graph."""
    def step_and_sample(model, tok_B, cache, cache_seqlens_B, weights, u_B1, temperature: float,
                        vocab_limit: int | None):
        logits_BV = step(model, tok_B, cache, cache_seqlens_B, weights)
        tokens_B, logprobs_B = sample_plain(mask_vocab(logits_BV, vocab_limit), u_B1, temperature)
        return logits_BV, tokens_B, logprobs_B
    return step_and_sample


step_and_sample = then_sample(static_step)  # our DeepSeek-V3
llama_step_and_sample = then_sample(llama_static_step)  # the dense families


class GraphDecoder:
    def __init__(self, cm, dtype: torch.dtype, compiled: bool = False, capture: bool | None = None):
        """cm: one of our cached models (deepseek.DeepSeekCachedModel, llama.LlamaCachedModel). compiled:
        capture (or, without capture, run) the torch.compile'd step. capture: None = on CUDA."""
        self.cm, self.model, self.dtype = cm, cm.model, dtype
        dev = self.model.lm_head.weight.device
        self.device = dev
        self.capture = (dev.type == "cuda") if capture is None else capture
        if self.capture and dev.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        # What is captured (or called), and what each new graph is checked against.
        self.eager_fn, arch = type(cm).static_step, cm.name
        self.fn = compiled_step("static" if not self.capture else "dynamic", arch) if compiled else self.eager_fn
        self.len_align = LEN_ALIGN if self.capture else LEN_ALIGN_NO_CAPTURE
        # Sampling inside the step: compiled steps without capture (CPU). Buckets checked so far.
        self.sampled_fn = compiled_step("static_sampled", arch) if compiled and not self.capture else None
        self.name = ("CUDA graphs" if self.capture else "compiled static-shape step") + f" ({cm.name})"
        self.failed: str | None = None
        self.cache = None
        self.rows = 0  # live rows at the front of the static cache
        self.graphs: dict[int, object] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.sampled_checked: set[int] = set()
        self.pool = None
        self._weights = None
        self._param_key = None
        self.stats = {"captures": 0, "replays": 0}

    # --- the static cache -------------------------------------------------------------------
    def start(self, ids_PT: torch.Tensor, lens_P: torch.Tensor, rows_B: torch.Tensor, max_len: int) -> torch.Tensor:
        cache, logits_BV = prefill(self.cm, ids_PT, lens_P, rows_B, max_len, self.dtype, self.device)
        self.adopt(cache)
        return logits_BV

    def adopt(self, cache) -> None:
        """Copy a wave's cache (after prefill and fork) into the static cache's first rows."""
        B, L = cache.rows_and_length
        have_rows, have_len = self.cache.rows_and_length if self.cache is not None else (0, 0)
        max_pos = self.model.config.max_position_embeddings
        length = max(L, min(int(math.ceil(L / self.len_align) * self.len_align), max_pos))  # aligned, within the RoPE tables
        if self.cache is None or not self.cache.compatible(cache) or have_rows < bucket_for(B) or have_len < L:
            rows = max(bucket_for(B), have_rows)
            length = max(length, have_len)
            self.graphs, self.logits, self.pool, self.sampled_checked = {}, {}, None, set()
            self.cache = cache.zeros_like(rows, length)
            self.tok = torch.zeros(rows, dtype=torch.long, device=self.device)
            self.seqlens = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.cache.write_front(cache)
        self.rows = B
        # Weights cannot change inside a wave (generation runs under no_grad): check them once per wave.
        self._current_weights()

    def keep(self, rows_R: torch.Tensor) -> None:
        """Rows rows_R (indices into the live rows) move to the front, in order."""
        self.cache.keep_front(rows_R)
        self.rows = rows_R.shape[0]

    # --- one step --------------------------------------------------------------------------
    def step(self, tok_B: torch.Tensor, seqlens_B: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the next token for the B live rows (their tokens and cached lengths)."""
        B, b = self._stage(tok_B, seqlens_B)
        try:
            if b not in self.graphs:
                return self._capture(b)[:B]
            self.stats["replays"] += 1
            if not self.capture:  # a plain call: its output is already a fresh tensor
                return self._call(b)[:B]
            self.graphs[b]()
            return self.logits[b][:B]
        except Exception as e:  # a capture or compile that fails: this step eagerly, then the fallback
            self._fail(f"{type(e).__name__}: {e}")
            return self._eager(b)[:B]

    def can_sample(self, params) -> bool:
        """Whether sample_step serves these sampling settings (no top-k/top-p; a compiled CPU step)."""
        return self.sampled_fn is not None and not self.failed and params.top_k == 0 and params.top_p == 1.0

    def sample_step(self, tok_B: torch.Tensor, seqlens_B: torch.Tensor, u_B1: torch.Tensor | None,
                    temperature: float, vocab_limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens_B, logprobs_B) of the next token for the B live rows: the step and the sampling
        (sampling.sample_plain with the rows' uniforms u_B1, None when greedy) in one compiled call. The
        first call of each bucket is checked against the eager step's logits, as step() checks graphs."""
        B, b = self._stage(tok_B, seqlens_B)
        u_b1 = None
        if u_B1 is not None:  # padding rows sample too (and are dropped): any uniform will do
            u_b1 = torch.cat([u_B1, u_B1.new_full((b - B, 1), 0.5)]) if b > B else u_B1
        try:
            logits_bV, tok_b, logp_b = self.sampled_fn(self.model, self.tok[:b], self.cache.first_rows(b),
                                                       self.seqlens[:b], self._weights, u_b1, temperature, vocab_limit)
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}")
            tok_b, logp_b = sample_plain(mask_vocab(self._eager(b), vocab_limit), u_b1, temperature)
            return tok_b[:B], logp_b[:B]
        if b in self.sampled_checked:
            self.stats["replays"] += 1
            return tok_b[:B], logp_b[:B]
        self.sampled_checked.add(b)
        self.stats["captures"] += 1
        want = self._check(logits_bV, b, "compiled step")
        if self.failed:
            tok_b, logp_b = sample_plain(mask_vocab(want, vocab_limit), u_b1, temperature)
        return tok_b[:B], logp_b[:B]

    def fallback(self) -> EagerDecoder:
        """An eager decoder holding a copy of the live rows, to go on after this one failed."""
        eager = EagerDecoder(self.cm, self.dtype, self.device)
        eager.adopt(self.cache.first_rows(self.rows, copy=True), self.cm.step_weights())
        return eager

    def _stage(self, tok_B: torch.Tensor, seqlens_B: torch.Tensor) -> tuple[int, int]:
        """Copy the live rows' tokens and lengths into the static inputs, zero the padding rows of
        their bucket -> (B live rows, bucket b)."""
        B = tok_B.shape[0]
        if B != self.rows:
            raise ValueError(f"GraphDecoder: {B} tokens for {self.rows} live rows")
        b = bucket_for(B)
        if b > self.cache.rows_and_length[0]:
            raise ValueError(f"GraphDecoder: bucket {b} > static rows {self.cache.rows_and_length[0]}")
        self.tok[:B].copy_(tok_B)
        self.tok[B:b].zero_()
        self.seqlens[:B].copy_(seqlens_B)
        self.seqlens[B:b].zero_()
        return B, b

    def _eager(self, b: int) -> torch.Tensor:
        """The eager step on the staged inputs of bucket b (it writes the same cache positions)."""
        return self.eager_fn(self.model, self.tok[:b], self.cache.first_rows(b), self.seqlens[:b], self._weights)

    def _check(self, got_bV: torch.Tensor, b: int, what: str) -> torch.Tensor:
        """The eager step on the same inputs (run last, so the cache ends up holding its writes either
        way) -> its logits; marks this decoder failed if `got_bV` differs from them."""
        want = self._eager(b)
        err = float((got_bV.float() - want.float()).abs().max())
        if not err <= 1e-3 * (1.0 + float(want.float().abs().max())):  # also catches NaN
            self._fail(f"{what} differs from the eager step by {err:.3g} (bucket {b})")
        return want

    def _call(self, b: int) -> torch.Tensor:
        return self.fn(self.model, self.tok[:b], self.cache.first_rows(b), self.seqlens[:b], self._weights)

    def _capture(self, b: int) -> torch.Tensor:
        """Capture bucket b, replay it once and check it against the eager step on the same inputs."""
        self.stats["captures"] += 1
        if self.capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: library handles, lazy probes, autotuning
                for _ in range(2):
                    self._call(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[b] = self._call(b)
            self.pool = graph.pool()
            self.graphs[b] = graph.replay
            graph.replay()
        else:  # the same buffers, a plain call in place of the replay
            self.logits[b] = self._call(b)
            self.graphs[b] = True
        return self._check(self.logits[b], b, "graph replay")

    # --- weights -------------------------------------------------------------------------
    def _current_weights(self):
        """step_weights() of now; drops the graphs if any tensor they read has moved."""
        weights = self.cm.step_weights()
        params = tuple(p.data_ptr() for p in self.model.parameters())
        ptrs = tuple(t.data_ptr() for t in tensors(weights))
        if self._weights is None or (params, ptrs) != self._param_key:
            if self.graphs:
                log.info("decode graphs: weights moved, capturing again")
            self.graphs, self.logits, self.pool, self.sampled_checked = {}, {}, None, set()
            self._param_key = (params, ptrs)
        self._weights = weights
        return weights

    def _fail(self, why: str) -> None:
        """Stop using graphs: the engine swaps in fallback() after this step."""
        self.failed = why
        self.graphs, self.logits, self.pool = {}, {}, None
