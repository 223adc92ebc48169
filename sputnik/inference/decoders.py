"""How the engine runs a model's decode steps: one decoder per mode, chosen once when the engine is built.

Two small contracts, both written here.

A cached model (one per architecture) runs a model over a preallocated cache:
    cache = cm.new_cache(batch, max_len, dtype, device)       cache.select(rows) forks/compacts rows,
    logits = cm.forward_cached(ids_BT, cache, seqlens_B,       type(cache).concat(caches) stacks them
                               logits_at_B=None)              row b writes positions seqlens_B[b] + t
    weights = cm.step_weights()                               derived copies, fetched once per wave
    logits_BV = cm.step(tok_B, cache, seqlens_B, weights)     one token per row
Ours: deepseek.DeepSeekCachedModel (latent cache, absorbed MLA, fused decode weights),
llama.LlamaCachedModel (GQA KV cache); any other Hugging Face causal LM: hf_cache.HFCachedModel.

A decoder (one per mode) owns the cache of the wave in flight:
    logits_BV = d.start(ids_PT, lens_P, rows_B, max_len)   prefill each prompt once, fork its rows
    logits_BV = d.step(tok_B, seqlens_B)                   the next token's logits for the live rows
    d.keep(rows_R)                                         compaction: finished rows leave
    d.can_sample(params); d.sample_step(...)               a step that also samples (compiled CPU step)
    d.failed -> str | None; d.fallback() -> Decoder        after a failed capture or check: the engine
                                                           swaps in the fallback, with a warning
Modes: EagerDecoder (any cached model; optionally a compiled dynamic-shape step) and
graphs.GraphDecoder (our own models: CUDA graphs on a GPU, the static-shape compiled step on CPU).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_compiled: dict[str, object] = {}


def compile_static_shapes(fn):
    """torch.compile for one graph per input shape, with inductor's C++ wrapper (graphs.py's buckets keep
    the shapes few). Every bucket x length is a recompile of the same code object, so the process's
    recompile limit is raised from torch's default 8 to 64: a process-wide setting, made here, where
    the compiling is decided, never by the model."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})


def compiled_step(kind: str, arch: str = "deepseek_v3"):
    """The one-token step of an architecture ("deepseek_v3" or "llama", a cached model's name) compiled
    once per process (dynamo guards specialise it per model): "dynamic" (one graph for every batch
    and cache length), "static" (one per shape, graphs.py on CPU), "static_sampled" (the static step
    followed by the sampling, one graph)."""
    if (kind, arch) not in _compiled:
        from sputnik.inference import deepseek, graphs, llama

        step, sampled = {"deepseek_v3": (deepseek.static_step, graphs.step_and_sample),
                         "llama": (llama.static_step, graphs.llama_step_and_sample)}[arch]
        fn = {"dynamic": step, "static": step, "static_sampled": sampled}[kind]
        _compiled[(kind, arch)] = (torch.compile(fn, dynamic=True, fullgraph=True) if kind == "dynamic"
                                   else compile_static_shapes(fn))
    return _compiled[(kind, arch)]


def _has_c_step(cm) -> bool:
    """Whether `cm` (one of our cached models) decodes through its one-call C step here."""
    weights = cm.step_weights()
    return (weights.get("c_step") if isinstance(weights, dict) else weights) is not None


def cached_model(model):
    """The cached-model contract for `model` (module docstring): ours by type, any transformers model
    through its own KV cache, or the model itself when it implements the contract (tests' mocks)."""
    from sputnik.inference.deepseek import DeepSeekCachedModel
    from sputnik.inference.hf_cache import HFCachedModel
    from sputnik.inference.llama import LlamaCachedModel
    from sputnik.model.hf_wrapper import HFCausalLM
    from sputnik.model.llama import LlamaModel
    from sputnik.model.transformer import Transformer

    if isinstance(model, Transformer):
        return DeepSeekCachedModel(model)
    if isinstance(model, LlamaModel):
        return LlamaCachedModel(model)
    if isinstance(model, HFCausalLM):
        return HFCachedModel(model.hf)
    if hasattr(model, "forward_cached") and hasattr(model, "step"):
        return model
    if hasattr(model, "config") and hasattr(model, "get_output_embeddings"):  # a transformers PreTrainedModel
        return HFCachedModel(model)
    raise ValueError(f"{type(model).__name__} cannot decode with a cache: expected a sputnik model or a "
                     "transformers causal LM")


class EagerDecoder:
    """Each step a plain call of the cached model's step (or of `step_fn`, a compiled one)."""

    def __init__(self, cm, dtype: torch.dtype, device: torch.device, step_fn=None, name: str = "eager"):
        self.cm, self.dtype, self.device, self.step_fn = cm, dtype, device, step_fn
        self.name = f"{name} ({getattr(cm, 'name', type(cm).__name__)})"
        self.cache = self.weights = None
        self.failed: str | None = None

    def start(self, ids_PT: torch.Tensor, lens_P: torch.Tensor, rows_B: torch.Tensor, max_len: int) -> torch.Tensor:
        self.cache, logits_BV = prefill(self.cm, ids_PT, lens_P, rows_B, max_len, self.dtype, self.device)
        self.weights = self.cm.step_weights()  # nothing updates the model inside a wave
        return logits_BV

    def adopt(self, cache, weights) -> None:
        """Continue a wave another decoder started (its fallback)."""
        self.cache, self.weights = cache, weights

    def step(self, tok_B: torch.Tensor, seqlens_B: torch.Tensor) -> torch.Tensor:
        return self.cm.step(tok_B, self.cache, seqlens_B, self.weights, step_fn=self.step_fn)

    def keep(self, rows_R: torch.Tensor) -> None:
        self.cache = self.cache.select(rows_R)

    def can_sample(self, params) -> bool:
        return False


def prefill(cm, ids_PT: torch.Tensor, lens_P: torch.Tensor, rows_B: torch.Tensor, max_len: int,
            dtype: torch.dtype, device: torch.device):
    """Each right-padded prompt once into a fresh cache (its pad slots are overwritten later), then its
    rows forked -> (cache of the B rows, logits_BV at each row's last prompt token)."""
    P = ids_PT.shape[0]
    cache = cm.new_cache(P, max_len, dtype, device)
    last_PV = cm.forward_cached(ids_PT, cache, torch.zeros(P, dtype=torch.long, device=device), logits_at_B=lens_P - 1)
    if rows_B.shape[0] != P:  # n samples a prompt share its prefilled prefix
        cache = cache.select(rows_B)
    return cache, last_PV[rows_B]


def choose_decoder(model, *, dtype: torch.dtype, device: torch.device, compile: bool = False,
                   cuda_graphs: bool = True):
    """The decoder for `model` on `device`. Our own models (DeepSeek-V3 and the dense families) replay
    CUDA graphs on a GPU (cuda_graphs) and, with compile on a CPU, run the static-shape compiled step
    with the sampling inside; compile elsewhere compiles one dynamic-shape step. transformers models
    decode eagerly. compile costs 10-60 s on 2 CPU cores per batch bucket, so it pays only over many
    generate() calls (bench_generate.py). The dense families in fp32 on a CPU decode through their
    one-call C step (llama_decode.py), our DeepSeek-V3 through its own (deepseek_decode.py), whether or
    not compile is asked: it is the faster of the two."""
    from sputnik.inference.deepseek import DeepSeekCachedModel
    from sputnik.inference.graphs import GraphDecoder
    from sputnik.inference.llama import LlamaCachedModel

    cm = cached_model(model)
    if isinstance(cm, (DeepSeekCachedModel, LlamaCachedModel)):
        if device.type == "cuda" and cuda_graphs:
            return GraphDecoder(cm, dtype, compiled=compile, capture=True)
        if compile and device.type == "cpu":
            if dtype == torch.float32 and _has_c_step(cm):
                # The one-call C steps beat the compiled steps at every batch measured: the dense family
                # (bench_families.py, SmolLM2 shape: 1.13x vs 1.86x the floor at batch 1, 1.71x vs 2.19x at
                # 32) and our DeepSeek-V3 (tiny, LOG.md stop 33: 0.32 vs ~1.0 ms a step at batch 1, 2.1 vs 3.8 at 32).
                log.info("compile: the model decodes through its C step, faster than a compiled one on a CPU")
                return EagerDecoder(cm, dtype, device, name="C step")
            return GraphDecoder(cm, dtype, compiled=True, capture=False)
        if compile:
            return EagerDecoder(cm, dtype, device, step_fn=compiled_step("dynamic", cm.name), name="compiled")
    return EagerDecoder(cm, dtype, device)
