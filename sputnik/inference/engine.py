"""Batched generation: prefill once per prompt, fork the cache for n samples, decode with sampling.

Shared by RL rollouts, distillation, evaluation and chat. The engine picks its decoder once, when it
is built (decoders.py: eager, compiled, CUDA graphs; our models or any transformers model), and its
wave loop only samples, appends and compacts. A decoder that fails (a capture error, a compiled step
that disagrees with the eager one) is swapped for its eager fallback, with a warning.

Shape legend: B rows being decoded, P prompts, T time, V vocab.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from sputnik.inference.decoders import choose_decoder
from sputnik.inference.sampling import SamplingParams, draw_uniforms, mask_vocab, sample_next

log = logging.getLogger(__name__)


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int]  # includes the stop token when one ended the sequence
    logprobs: list[float]  # log p(token) under softmax(logits / temperature), unfiltered
    text: str = ""
    finish_reason: str = "length"  # "stop" | "length"
    # with record_routing: the experts of every token the model read, prompt and completion up to
    # its last token ([len(prompt) + len(token_ids) - 1, routed layers, K] int16; routing_replay.py)
    routing: torch.Tensor | None = None


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


@dataclass
class _Wave:
    """The rows of one wave: row slot -> (prompt, sample), its budget, its tokens so far."""
    owner: list[tuple[int, int]]
    budget: list[int]
    tokens: list[list[int]]
    logps: list[list[float]]
    live: list[int]  # row slot -> index into the lists above
    # with record_routing: the prompts' experts [P, T, L, K] and, per decode step, (live row slots, [B, L, K])
    prompt_routing: torch.Tensor | None = None
    step_routing: list = field(default_factory=list)


class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch_size: int = 256, dtype: torch.dtype | None = None,
                 compile: bool = False, cuda_graphs: bool = True):
        """compile: run decode steps through torch.compile (our DeepSeek-V3; on CPU one static-shape graph
        per batch bucket with the sampling inside): 10-60 s of compiling per bucket on 2 CPU cores, so
        it pays over many generate() calls (benchmarks/bench_generate.py). cuda_graphs: on a CUDA
        device, replay our DeepSeek-V3's decode step from CUDA graphs (graphs.py)."""
        p = next(model.parameters())
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.device, self.dtype = p.device, dtype or p.dtype
        self.decoder = choose_decoder(model, dtype=self.dtype, device=self.device, compile=compile,
                                      cuda_graphs=cuda_graphs)
        # Positions the model can take (None: unknown, no limit applied here)
        self.context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.last_stats = GenerationStats()
        # A head wider than the tokenizer (vocab rounded up, or merges ran out) has rows no text
        # maps to: never sample them.
        self.vocab_limit = getattr(tokenizer, "vocab_size", None)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, num_samples: int = 1,
                 record_routing: bool = False) -> list[list[Completion]]:
        """Sample `num_samples` completions for each prompt (token id lists). Returns one list per
        prompt. Prompts are processed in waves of at most max_batch_size rows. record_routing (MoE
        models): each Completion carries the experts its tokens were routed to (for routing replay
        in RL); decoding is then eager, since a compiled or captured step cannot record."""
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
        own_decoder, tape = None, contextlib.nullcontext()
        if record_routing:
            from sputnik.inference.decoders import EagerDecoder, cached_model
            from sputnik.model.routing_replay import recording

            if not (isinstance(self.decoder, EagerDecoder) and self.decoder.step_fn is None):
                own_decoder, self.decoder = self.decoder, EagerDecoder(cached_model(self.model), self.dtype, self.device)
            tape = recording(self.model)
        try:
            with tape as recorder:
                for start in range(0, len(prompts), per_wave):
                    idx = list(range(start, min(start + per_wave, len(prompts))))
                    for c in self._generate_wave([prompts[i] for i in idx], idx, params, num_samples, gen, stats,
                                                 recorder):
                        out[c.prompt_index].append(c)
        finally:
            self.model.train(was_training)
            if own_decoder is not None:  # the engine's own decoder again (a fallback it took stays)
                self.decoder = own_decoder
        for row in out:
            row.sort(key=lambda c: c.sample_index)
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return out

    def _generate_wave(self, prompts, prompt_ids, params, n, gen, stats, recorder=None) -> list[Completion]:
        P, dev = len(prompts), self.device
        lens_P = torch.tensor([len(p) for p in prompts], device=dev)
        # Each prompt may generate up to max_new_tokens, and never past the model's context (it then
        # ends with finish_reason "length"): per prompt, so batching never changes a completion.
        budget_P = [self._budget(len(p), params.max_new_tokens) for p in prompts]
        stats.prompt_tokens += int(lens_P.sum())
        ids_PT = torch.zeros(P, int(lens_P.max()), dtype=torch.long, device=dev)  # right-padded
        for i, p in enumerate(prompts):
            ids_PT[i, : len(p)] = torch.tensor(p, device=dev)
        # --- prefill each prompt once, fork n rows per prompt
        rows_B = torch.arange(P, device=dev).repeat_interleave(n)
        max_len = max(len(p) + b for p, b in zip(prompts, budget_P))
        logits_BV = self.decoder.start(ids_PT, lens_P, rows_B, max_len)
        seqlens_B = lens_P[rows_B].clone()
        wave = _Wave(owner=[(prompt_ids[r // n], r % n) for r in range(P * n)],
                     budget=[budget_P[r // n] for r in range(P * n)], tokens=[[] for _ in range(P * n)],
                     logps=[[] for _ in range(P * n)], live=list(range(P * n)))
        if recorder is not None:  # the prefill routed the P prompts' tokens, [P·T, L, K] in row-major order
            wave.prompt_routing = recorder.take().view(P, ids_PT.shape[1], recorder.num_layers, -1)
        stop_ids = torch.tensor(params.stop_token_ids or [-1], device=dev)
        picked, done = None, []
        for _ in range(max(budget_P)):
            # --- sample (or take the tokens a sampling decoder picked), append, retire finished rows
            tok_B, logp_B = sample_next(mask_vocab(logits_BV, self.vocab_limit), params, gen) if picked is None else picked
            keep = self._append(wave, tok_B, logp_B, stop_ids, params, done)
            stats.generated_tokens += len(tok_B)
            if not keep:
                break
            if len(keep) < len(wave.live):  # compaction: finished rows leave and stop costing compute
                keep_t = torch.tensor(keep, device=dev)
                self.decoder.keep(keep_t)
                seqlens_B, tok_B = seqlens_B[keep_t], tok_B[keep_t]
                wave.live = [wave.live[b] for b in keep]
            # --- the next step
            logits_BV, picked = None, None
            if self.decoder.can_sample(params):  # the uniforms sample_next would draw next, drawn now
                u_B1 = draw_uniforms(len(wave.live), gen, dev) if params.temperature > 0 else None
                picked = self.decoder.sample_step(tok_B, seqlens_B, u_B1, params.temperature, self.vocab_limit)
            else:
                logits_BV = self.decoder.step(tok_B, seqlens_B)
            if recorder is not None:  # this step routed the token each live row was fed
                wave.step_routing.append((list(wave.live), recorder.take()))
            if self.decoder.failed:
                self._fall_back()
            seqlens_B = seqlens_B + 1
            stats.decode_steps += 1
            stats.forward_rows += len(wave.live)
        if recorder is not None:
            self._attach_routing(wave, done, n, [len(p) for p in prompts])
        return done

    @staticmethod
    def _attach_routing(wave: _Wave, done: list[Completion], n: int, prompt_lens: list[int]) -> None:
        """Each completion's routing: its prompt's (prefill) then, in order, the decode steps that fed
        it a token (all but its last token, which no step reads)."""
        fed: dict[int, list[torch.Tensor]] = {}
        for live, routing_BLK in wave.step_routing:
            for b, k in enumerate(live):
                fed.setdefault(k, []).append(routing_BLK[b])
        slot = {owner: k for k, owner in enumerate(wave.owner)}
        for c in done:
            k = slot[(c.prompt_index, c.sample_index)]
            p = k // n
            parts = [wave.prompt_routing[p, :prompt_lens[p]]] + ([torch.stack(fed[k])] if k in fed else [])
            c.routing = torch.cat(parts)
            assert c.routing.shape[0] == prompt_lens[p] + len(c.token_ids) - 1, "routing does not cover the sequence"

    def _append(self, wave: _Wave, tok_B, logp_B, stop_ids, params, done: list) -> list[int]:
        """Append each live row's token; finished rows become Completions in `done`. -> the row slots
        that go on."""
        tok_list, logp_list = tok_B.tolist(), logp_B.tolist()
        finished = torch.isin(tok_B, stop_ids).tolist() if params.stop_token_ids else [False] * len(tok_list)
        keep = []
        for b, k in enumerate(wave.live):
            wave.tokens[k].append(tok_list[b])
            wave.logps[k].append(logp_list[b])
            if not finished[b] and params.stop_strings and self._hit_stop_string(wave.tokens[k], params.stop_strings):
                finished[b] = True
            if finished[b] or len(wave.tokens[k]) >= wave.budget[k]:
                done.append(self._completion(wave.owner[k], wave.tokens[k], wave.logps[k],
                                             "stop" if finished[b] else "length"))
            else:
                keep.append(b)
        return keep

    def _fall_back(self) -> None:
        fallback = self.decoder.fallback()
        log.warning("decode: %s off (%s); continuing with %s", self.decoder.name, self.decoder.failed, fallback.name)
        self.decoder = fallback

    def _budget(self, prompt_len: int, max_new_tokens: int) -> int:
        """Tokens this prompt may generate: max_new_tokens, cut to what the model's context leaves."""
        context = self.context
        if context is None:
            return max_new_tokens
        if prompt_len >= context:
            raise ValueError(f"a prompt has {prompt_len} tokens; the model's context is {context} "
                             "(max_position_embeddings): shorten it or use a model with a longer context")
        return min(max_new_tokens, context - prompt_len)

    def _hit_stop_string(self, toks: list[int], stops: tuple[str, ...]) -> bool:
        # Only the tail can newly contain a stop string: decode a bounded window, not the whole text.
        window = self.tokenizer.decode(toks[-16:])
        return any(s in window for s in stops)

    def _completion(self, owner, toks, logps, reason) -> Completion:
        text = ""
        if self.tokenizer is not None:
            stops = getattr(self.tokenizer, "stop_ids", (getattr(self.tokenizer, "eot_id", None),))
            body = toks[:-1] if reason == "stop" and toks and toks[-1] in stops else toks
            text = self.tokenizer.decode(body)
        return Completion(owner[0], owner[1], list(toks), list(logps), text, reason)
