"""Batched generation: prefill once per prompt, fork the cache for n samples, decode with sampling.

Shared by RL rollouts, distillation, evaluation, chat and the server. The model side of the
contract (docs/CONTRACTS.md):
    cache = model.new_cache(batch_size, max_len, dtype, device)
    logits_BTV = model.forward_cached(input_ids_BT, cache, cache_seqlens_B)
    cache = cache.select(rows_R)          # keep/repeat batch rows (fork and compaction)
`forward_cached` writes the T new tokens of row b at positions cache_seqlens[b] ... and attends to
everything before them; the engine owns cache_seqlens. For MLA the cache holds only the compressed
latent and the RoPE key (absorbed attention at decode). Models that also have
    weights = model.decode_weights();  logits_BV = model.decode_one(tok_B, cache, cache_seqlens_B, …, weights=weights)
(ours) decode one token per row through that step instead, with `weights` fetched once per wave;
with `model.decode_step_fn(compiled, static_shapes)` as well, the engine runs the step through
decode_graphs.DecodeGraphs: CUDA graphs on a GPU, the static-shape compiled step (sampling inside) on
CPU when compile is on.

Shape legend: B rows being decoded, P prompts, T time, V vocab.
"""
from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int]  # includes the stop token when one ended the sequence
    logprobs: list[float]  # log p(token) under softmax(logits / temperature), unfiltered
    text: str = ""
    finish_reason: str = "length"  # "stop" | "length"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    decode_steps: int = 0
    forward_rows: int = 0  # sum over decode steps of rows computed (compaction shrinks it)
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)


# ---------------------------------------------------------------------------------------------
# Sampling
def filter_logits(logits_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k set and outside the smallest prefix of the
    sorted distribution whose mass reaches top_p (the most likely token is always kept)."""
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits_BV, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def sample_next(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """-> (tokens_B, logprobs_B). Log-probs are of the policy at this temperature without
    top-k/top-p (what RL's importance ratios compare against, as TRL does)."""
    if params.temperature == 0 or (params.top_k == 0 and params.top_p == 1.0):
        u_B1 = None if params.temperature == 0 else draw_uniforms(logits_BV.shape[0], generator, logits_BV.device)
        return sample_plain(logits_BV, u_B1, params.temperature)
    logits_BV = logits_BV.float()
    scaled_BV = logits_BV if params.temperature == 1.0 else logits_BV / params.temperature  # x / 1 == x: skip a [B, V] pass
    logp_BV = F.log_softmax(scaled_BV, -1)
    probs_BV = filter_logits(scaled_BV, params.top_k, params.top_p).softmax(-1)
    tokens_B = sample_from_probs(probs_BV, generator)
    return tokens_B, logp_BV.gather(-1, tokens_B[:, None])[:, 0]


def sample_plain(logits_BV: torch.Tensor, u_B1: torch.Tensor | None, temperature: float):
    """sample_next without top-k/top-p, given each row's uniform u_B1 (None when greedy): pure
    tensor ops, so a compiled decode step can end with it (decode_graphs.DecodeGraphs.step_sampled)."""
    logits_BV = logits_BV.float()
    if temperature == 0:
        tokens_B = logits_BV.argmax(-1)
        return tokens_B, F.log_softmax(logits_BV, -1).gather(-1, tokens_B[:, None])[:, 0]
    scaled_BV = logits_BV if temperature == 1.0 else logits_BV / temperature  # x / 1 == x: skip a [B, V] pass
    logp_BV = F.log_softmax(scaled_BV, -1)
    tokens_B = pick_from_probs(logp_BV.exp(), u_B1)  # reuse the softmax we need for the log-probs anyway
    return tokens_B, logp_BV.gather(-1, tokens_B[:, None])[:, 0]


def mask_vocab(logits_BV: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """Head rows at or past the tokenizer's vocabulary (a head rounded up, or merges that ran out)
    set to −inf: no text maps to them, so they are never sampled. Pure tensor ops (compiled steps use it)."""
    if vocab_limit is None or vocab_limit >= logits_BV.shape[-1]:
        return logits_BV
    col_V = torch.arange(logits_BV.shape[-1], device=logits_BV.device)
    return logits_BV.masked_fill(col_V >= vocab_limit, float("-inf"))


def draw_uniforms(rows: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """The one uniform per row that inverse-CDF sampling consumes (u_B1)."""
    return torch.rand(rows, 1, generator=generator, device=device)


def sample_from_probs(probs_BV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from (unnormalised) probabilities by inverse-CDF sampling: one uniform per
    row (multinomial draws one per vocabulary entry, ~2x slower at batch 32 on CPU)."""
    return pick_from_probs(probs_BV, draw_uniforms(probs_BV.shape[0], generator, probs_BV.device))


def pick_from_probs(probs_BV: torch.Tensor, u_B1: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval holds u·(row's total mass): scaling u by the total means rounding
    can never step past the last token with non-zero probability."""
    cdf_BV = probs_BV.cumsum(-1)
    return torch.searchsorted(cdf_BV, u_B1 * cdf_BV[:, -1:], right=True)[:, 0].clamp(max=probs_BV.shape[-1] - 1)


def wave_weights(model):
    """The derived decode weights for a run of decode steps (our models' decode_weights()), or None
    for models without decode_one. Fetch once per wave/batch: nothing updates a model inside one."""
    return model.decode_weights() if hasattr(model, "decode_one") else None


def decode_logits(model, tok_B: torch.Tensor, cache, cache_seqlens_B: torch.Tensor, weights, compiled: bool = False):
    """logits_BV of one new token per row: our models through decode_one with the wave's `weights`
    (fetching them each step was ~15% of a batch-1 step), others through forward_cached."""
    if weights is not None:
        return model.decode_one(tok_B, cache, cache_seqlens_B, compiled=compiled, weights=weights)
    return model.forward_cached(tok_B[:, None], cache, cache_seqlens_B)[:, -1]


# ---------------------------------------------------------------------------------------------
# The engine
class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch_size: int = 256, dtype: torch.dtype | None = None,
                 compile: bool | None = None, cuda_graphs: bool | None = None):
        """compile: run each decode step through torch.compile (models with `decode_one`, i.e. ours).
        None = the environment variable SPUTNIK_COMPILE_DECODE=1 turns it on; off by default because
        each compile costs 10-60 s on 2 CPU cores, which only pays back over many generate() calls
        (bench_generate.py measures both). On CPU the compiled step runs through decode_graphs'
        bucketed static cache without capture: one static-shape graph per batch bucket (1, 2, 4, 8,
        16, 24, 32, ...) and cache length (rounded up to 32), so a run compiles a few times, not per shape.
        cuda_graphs: replay the decode step from CUDA graphs (decode_graphs.py; our models on a CUDA
        device). None = on there unless SPUTNIK_CUDA_GRAPHS=0; False turns it off."""
        if compile is None:
            compile = os.environ.get("SPUTNIK_COMPILE_DECODE", "0") == "1"
        self.compile = bool(compile) and hasattr(model, "decode_one")
        p = next(model.parameters())
        if cuda_graphs is None:
            cuda_graphs = p.device.type == "cuda" and os.environ.get("SPUTNIK_CUDA_GRAPHS", "1") != "0"
        self.cuda_graphs = bool(cuda_graphs) and hasattr(model, "decode_step_fn")
        # A compiled step off CUDA: static shapes over the runner's bucketed cache (no capture)
        self.static_compiled = self.compile and not self.cuda_graphs and p.device.type == "cpu" \
            and hasattr(model, "decode_step_fn")
        self.graphs = None  # the DecodeGraphs runner, made on first use and kept (its static cache too)
        self.model = model
        # Models that can return only each prompt's last-position logits from a prefill (ours do).
        self.prefill_last = "logits_at_B" in inspect.signature(model.forward_cached).parameters
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        # Positions the model can take (None: unknown, no limit applied here)
        self.context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.device = p.device
        self.dtype = dtype or p.dtype
        self.last_stats = GenerationStats()
        # A head wider than the tokenizer (vocab rounded up, or merges ran out) has rows no text
        # maps to: never sample them.
        self.vocab_limit = getattr(tokenizer, "vocab_size", None)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, num_samples: int = 1) -> list[list[Completion]]:
        """Sample `num_samples` completions for each prompt (token id lists). Returns one list per
        prompt. Prompts are processed in waves of at most max_batch_size rows."""
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: must be >= 1")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        was_training = self.model.training
        self.model.eval()
        stats = GenerationStats()
        t0 = time.perf_counter()
        gen = torch.Generator(device=self.device).manual_seed(params.seed)
        out: list[list[Completion]] = [[] for _ in prompts]
        per_wave = max(1, self.max_batch_size // num_samples)
        try:
            for start in range(0, len(prompts), per_wave):
                idx = list(range(start, min(start + per_wave, len(prompts))))
                for c in self._generate_wave([prompts[i] for i in idx], idx, params, num_samples, gen, stats):
                    out[c.prompt_index].append(c)
        finally:
            self.model.train(was_training)
        for row in out:
            row.sort(key=lambda c: c.sample_index)
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return out

    def _logits(self, logits_BV: torch.Tensor) -> torch.Tensor:
        return mask_vocab(logits_BV, self.vocab_limit)

    def _generate_wave(self, prompts, prompt_ids, params, n, gen, stats) -> list[Completion]:
        P, dev = len(prompts), self.device
        lens_P = torch.tensor([len(p) for p in prompts], device=dev)
        T = int(lens_P.max())
        # Each prompt may generate up to max_new_tokens, and never past the model's context (it then
        # ends with finish_reason "length"): per prompt, so batching never changes a completion.
        budget_P = [self._budget(len(p), params.max_new_tokens) for p in prompts]
        max_len = max(len(p) + b for p, b in zip(prompts, budget_P))
        stats.prompt_tokens += int(lens_P.sum())

        # --- prefill each prompt once (right-padded; pad positions are overwritten later)
        ids_PT = torch.zeros(P, T, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            ids_PT[i, : len(p)] = torch.tensor(p, device=dev)
        cache = self.model.new_cache(P, max_len, self.dtype, dev)
        zeros_P = torch.zeros(P, dtype=torch.long, device=dev)
        if self.prefill_last:
            last_PV = self.model.forward_cached(ids_PT, cache, zeros_P, logits_at_B=lens_P - 1)
        else:
            last_PV = self.model.forward_cached(ids_PT, cache, zeros_P)[torch.arange(P, device=dev), lens_P - 1]

        # --- fork: n rows per prompt share the prefilled prefix
        rows = torch.arange(P, device=dev).repeat_interleave(n)
        cache = cache.select(rows) if n > 1 else cache
        logits_BV, seqlens_B = last_PV[rows], lens_P[rows].clone()
        owner = [(prompt_ids[r // n], r % n) for r in range(P * n)]  # row -> (prompt, sample)
        budget = [budget_P[r // n] for r in range(P * n)]
        tokens: list[list[int]] = [[] for _ in owner]
        logps: list[list[float]] = [[] for _ in owner]
        done: list[Completion] = []
        live = list(range(len(owner)))  # row slot -> index into owner/tokens
        stop_ids = torch.tensor(params.stop_token_ids or [-1], device=dev)
        graphs = self._decode_graphs()
        # A runner turned off (a failed check, capture or compile) means eager decoding from then on,
        # not the other compiled path: a compile that failed once would likely fail again.
        compiled = self.compile and not (self.graphs is not None and self.graphs.disabled)
        if graphs is not None:
            graphs.adopt(cache)
        weights = wave_weights(self.model) if graphs is None else None
        # The compiled CPU step can also sample (one call a step): it then hands back the next tokens
        fused = graphs is not None and graphs.can_sample(params)
        picked = None

        for step in range(max(budget_P)):
            tok_B, logp_B = sample_next(self._logits(logits_BV), params, gen) if picked is None else picked
            tok_list, logp_list = tok_B.tolist(), logp_B.tolist()
            finished = torch.isin(tok_B, stop_ids).tolist() if params.stop_token_ids else [False] * len(tok_list)
            for b, k in enumerate(live):
                tokens[k].append(tok_list[b])
                logps[k].append(logp_list[b])
                if not finished[b] and params.stop_strings and self._hit_stop_string(tokens[k], params.stop_strings):
                    finished[b] = True
            stats.generated_tokens += len(live)
            out_of_budget = [len(tokens[k]) >= budget[k] for k in live]
            keep = [b for b in range(len(live)) if not (finished[b] or out_of_budget[b])]
            for b in range(len(live)):
                if finished[b] or out_of_budget[b]:
                    k = live[b]
                    done.append(self._completion(owner[k], tokens[k], logps[k], "stop" if finished[b] else "length"))
            if not keep:
                break
            # --- compaction: finished rows leave the batch and stop costing compute
            if len(keep) < len(live):
                keep_t = torch.tensor(keep, device=dev)
                if graphs is not None:
                    graphs.compact(keep_t)
                else:
                    cache = cache.select(keep_t)
                seqlens_B, tok_B = seqlens_B[keep_t], tok_B[keep_t]
                live = [live[b] for b in keep]
            logits_BV, picked, u_B1 = None, None, None
            if graphs is not None:
                try:
                    if fused:  # the uniforms sample_next would draw at the top of the next step, drawn now
                        u_B1 = draw_uniforms(len(live), gen, dev) if params.temperature > 0 else None
                        picked = graphs.step_sampled(tok_B, seqlens_B, u_B1, params.temperature, self.vocab_limit)
                    else:
                        logits_BV = graphs.step(tok_B, seqlens_B)
                except Exception as e:  # a capture that fails: decode on eagerly (logged once)
                    graphs.disable(f"{type(e).__name__}: {e}")
                if graphs.disabled:
                    cache, graphs, fused, compiled = graphs.export(), None, False, False
                    weights = wave_weights(self.model)
            if logits_BV is None and picked is None:
                logits_BV = decode_logits(self.model, tok_B, cache, seqlens_B, weights, compiled=compiled)
                if u_B1 is not None:  # this step's uniforms are drawn already: use them, draw no more
                    picked = sample_plain(self._logits(logits_BV), u_B1, params.temperature)
            seqlens_B = seqlens_B + 1
            stats.decode_steps += 1
            stats.forward_rows += len(live)
        return done

    def _budget(self, prompt_len: int, max_new_tokens: int) -> int:
        """Tokens this prompt may generate: max_new_tokens, cut to what the model's context leaves."""
        context = self.context
        if context is None:
            return max_new_tokens
        if prompt_len >= context:
            raise ValueError(f"a prompt has {prompt_len} tokens; the model's context is {context} "
                             "(max_position_embeddings): shorten it or use a model with a longer context")
        return min(max_new_tokens, context - prompt_len)

    def _decode_graphs(self):
        """The decode-graph runner for this wave (CUDA graphs, or the static-shape compiled step on
        CPU), or None (off, not our model, or turned off after a failure)."""
        if not (self.cuda_graphs or self.static_compiled):
            return None
        if self.graphs is None:
            from sputnik.inference.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.model, compiled=self.compile,
                                       capture=self.device.type == "cuda")
        return None if self.graphs.disabled else self.graphs

    def _hit_stop_string(self, toks: list[int], stops: tuple[str, ...]) -> bool:
        # Only the tail can newly contain a stop string: decode a bounded window, not the whole text.
        window = self.tokenizer.decode(toks[-16:])
        return any(s in window for s in stops)

    def _completion(self, owner, toks, logps, reason) -> Completion:
        text = ""
        if self.tokenizer is not None:
            eot = getattr(self.tokenizer, "eot_id", None)
            body = toks[:-1] if reason == "stop" and toks and toks[-1] == eot else toks
            text = self.tokenizer.decode(body)
        return Completion(owner[0], owner[1], list(toks), list(logps), text, reason)
