"""Self-speculative decoding with the model's own MTP module as the draft head (V3 §5.4.3), batch 1.

One step, with n tokens cached and x_n the last sampled token (not yet cached):
    draft   MTP depth 1 at position n−1:  (h_{n−1}, Emb(x_n)) -> q(x_{n+1}),  d ~ q
    verify  one main-model forward over [x_n, d] at positions n, n+1 -> p_0 (for x_{n+1}), p_1 (x_{n+2})
    accept  d with probability min(1, p_0(d) / q(d)); on reject emit x ~ norm(max(0, p_0 − q)),
            on accept also emit the bonus x ~ p_1.
The accept/resample rule (Leviathan et al. 2023, Chen et al. 2023) makes every emitted token
distributed exactly as plain sampling from the main model; with temperature 0, p and q are one-hot
at their argmax, the rule reduces to "accept iff d == argmax p_0", and the output equals plain
greedy decoding. p and q are the engine's sampling distributions (temperature, then top-k/top-p).

Cache rollback is free: the engine-style cache_seqlens only advance over accepted tokens, so a
rejected draft's slot is overwritten by the next step (the MLA key mask hides it meanwhile).
The MTP block keeps its own cache layer (index num_hidden_layers): position i holds
(h_i, t_{i+1}); positions the main model accepted since the last draft are fed to it in the
next draft call together, so its cache never holds a rejected token.

Only depth 1 drafts (one draft token per step, at most 2 tokens per main forward); deeper MTP
modules, if any, are unused. Shape legend: V vocab, K drafts per step, J = K + 1, N independent trials.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sputnik.inference.decoders import cached_model
from sputnik.inference.engine import Completion
from sputnik.inference.sampling import SamplingParams, filter_logits, sample_from_probs


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0  # main-model forwards after the prefill (one per step)
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / max(self.target_forwards + 1, 1)


def sampling_probs(logits_NV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the engine samples from: softmax(filter(logits / T)); one-hot argmax at T = 0."""
    logits_NV = logits_NV.float()
    if params.temperature == 0:
        return F.one_hot(logits_NV.argmax(-1), logits_NV.shape[-1]).float()
    return filter_logits(logits_NV / params.temperature, params.top_k, params.top_p).softmax(-1)


def policy_logprobs(logits_NV: torch.Tensor, tokens_N: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log p(token) at the temperature without top-k/top-p, as engine.sample_next reports it."""
    scaled_NV = logits_NV.float() / (params.temperature or 1.0)
    return F.log_softmax(scaled_NV, -1).gather(-1, tokens_N[:, None])[:, 0]


def accept_drafts(p_NJV: torch.Tensor, q_NKV: torch.Tensor, drafts_NK: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling over N independent trials. p_NJV: target distributions at the K draft
    positions plus one (the bonus); q_NKV: the draft distributions the drafts were sampled from.
    Draft j is kept iff all before it were and u_j < p_j(d_j) / q_j(d_j), u_j ~ U[0, 1).
    Returns (a_N accepted drafts, next_N): next ~ norm(max(0, p_a − q_a)) if a < K, else ~ p_K."""
    N, K = drafts_NK.shape
    u_NK = torch.rand(N, K, generator=generator, device=p_NJV.device)
    p_at_NK = p_NJV[:, :K].gather(-1, drafts_NK[..., None])[..., 0]
    q_at_NK = q_NKV.gather(-1, drafts_NK[..., None])[..., 0]
    ok_NK = u_NK * q_at_NK < p_at_NK  # u < p/q without dividing (q(d) > 0: d was drawn from q)
    a_N = ok_NK.long().cumprod(-1).sum(-1)
    rows_N = torch.arange(N, device=p_NJV.device)
    p_a_NV = p_NJV[rows_N, a_N]
    q_pad_NJV = torch.cat([q_NKV, torch.zeros_like(q_NKV[:, :1])], dim=1)  # q ≡ 0 at the bonus slot
    resid_NV = (p_a_NV - q_pad_NJV[rows_N, a_N]).clamp(min=0)
    # p == q at the rejected slot has rejection probability 0; fall back to p only to stay finite.
    mass_N1 = resid_NV.sum(-1, keepdim=True)
    resid_NV = torch.where(mass_N1 > 0, resid_NV, p_a_NV)
    next_N = sample_from_probs(resid_NV, generator)
    return a_N, next_N


@torch.no_grad()
def speculative_generate(model, prompt: list[int], params: SamplingParams) -> tuple[Completion, SpecStats]:
    """Batch-1 decoding of `prompt` with MTP depth-1 drafts, verified by the main model. Same
    output distribution as Engine.generate (exactly the same tokens at temperature 0)."""
    if not getattr(model, "mtp", None):
        raise ValueError("speculative_generate needs a model with MTP modules (num_nextn_predict_layers >= 1)")
    if not prompt:
        raise ValueError("empty prompt: speculative decoding needs at least one token")
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompt, params)
    finally:
        model.train(was_training)


def _generate(model, prompt, params):
    t0, stats, cm = time.perf_counter(), SpecStats(), cached_model(model)
    dev = model.lm_head.weight.device
    gen = torch.Generator(device=dev).manual_seed(params.seed)
    stops = set(params.stop_token_ids)
    one = lambda v: torch.tensor([v], device=dev)  # noqa: E731  (a [1] position / seqlen tensor)
    greedy = params.temperature == 0
    # verify writes one slot past the last emitted token: +2 of slack
    cache = cm.new_cache(1, len(prompt) + params.max_new_tokens + 2, None, dev)

    # --- prefill: h_0 … h_{n−1} and x_n
    logits_1TV, h_1TD = cm.forward_cached(torch.tensor([prompt], device=dev), cache, one(0), return_hidden=True)
    tok = sample_from_probs(sampling_probs(logits_1TV[:, -1], params), gen)
    seq, out, logps = list(prompt), [int(tok)], policy_logprobs(logits_1TV[:, -1], tok, params).tolist()
    seq.append(out[0])
    n, mtp_len, h_pend_1PD = len(prompt), 0, h_1TD  # h_pend: main hidden at positions mtp_len … n−1

    while len(out) < params.max_new_tokens and out[-1] not in stops:
        # --- draft: the MTP block catches up over positions mtp_len … n−1; the last one drafts x_{n+1}
        next_ids_1P = torch.tensor([seq[mtp_len + 1: n + 1]], device=dev)
        draft_logits_1PV, _ = cm.draft(h_pend_1PD, next_ids_1P, cache, one(mtp_len))
        if greedy:  # one-hot p and q: the rule is "accept iff d == argmax p_0" with no random draws
            draft_11 = draft_logits_1PV[:, -1].argmax(-1, keepdim=True)
        else:
            q_1V = sampling_probs(draft_logits_1PV[:, -1], params)
            draft_11 = sample_from_probs(q_1V, gen)[:, None]
        mtp_len = n
        # --- verify [x_n, d] at positions n, n+1
        ids_12 = torch.cat([one(seq[n])[:, None], draft_11], dim=1)
        logits_12V, h_12D = cm.forward_cached(ids_12, cache, one(n), return_hidden=True)
        if greedy:
            d, (top0, top1) = int(draft_11), logits_12V[0].argmax(-1).tolist()
            a, new_1A = int(d == top0), torch.tensor([d, top1] if d == top0 else [top0], device=dev)
        else:
            p_12V = sampling_probs(logits_12V[0], params)
            a_1, next_1 = accept_drafts(p_12V[None], q_1V[None], draft_11, gen)
            a = int(a_1)
            new_1A = torch.cat([draft_11[0, :a], next_1])  # accepted drafts, then the resampled/bonus token
        new_logps = policy_logprobs(logits_12V[0, : a + 1], new_1A, params).tolist()
        stats.drafted, stats.accepted, stats.target_forwards = (stats.drafted + 1, stats.accepted + a,
                                                                stats.target_forwards + 1)
        # --- advance: x_n and the accepted drafts are now cached; rejected slots get overwritten
        for t, lp in zip(new_1A.tolist(), new_logps):
            if len(out) < params.max_new_tokens and out[-1] not in stops:
                out.append(t)
                logps.append(lp)
        seq += new_1A.tolist()
        n, h_pend_1PD = n + a + 1, h_12D[:, : a + 1]

    stats.generated_tokens, stats.seconds = len(out), time.perf_counter() - t0
    reason = "stop" if out[-1] in stops else "length"
    return Completion(0, 0, out, logps, "", reason), stats


# ---------------------------------------------------------------------------------------------
# A separate draft model
@torch.no_grad()
def draft_speculative_generate(target, draft, prompt: list[int], params: SamplingParams,
                               num_draft: int = 4, on_tokens=None) -> tuple[Completion, SpecStats]:
    """Batch-1 speculative decoding with a smaller `draft` model of the same vocabulary (e.g. a small
    Qwen or Llama for a larger one of the same tokenizer): each step the draft proposes `num_draft`
    tokens autoregressively, the target scores them all in one forward and accept_drafts keeps a
    prefix (plus one corrected or bonus token). Same output distribution as plain sampling from the
    target; exactly plain greedy decoding at temperature 0.

    Both caches roll back for free (cache_seqlens advance over accepted tokens only). The target has
    cached every emitted token but the last; the draft may lag (after a fully accepted step it never
    saw its own last draft), so each draft call first feeds the tokens it has not cached.
    on_tokens(all_ids_so_far), if given, is called after each step's accepted tokens (streaming)."""
    from sputnik.inference.deepseek import DeepSeekCachedModel
    from sputnik.inference.llama import LlamaCachedModel

    tcm, dcm = cached_model(target), cached_model(draft)
    for cm, who in ((tcm, "target"), (dcm, "draft")):
        if not isinstance(cm, (LlamaCachedModel, DeepSeekCachedModel)):
            raise ValueError(f"draft speculative decoding: the {who} must be one of Sputnik's own models "
                             f"(its cache rolls back by length), not {type(cm).__name__}")
    tv, dv = target.lm_head.weight.shape[0], draft.lm_head.weight.shape[0]
    if tv != dv:
        raise ValueError(f"the draft's vocabulary ({dv}) differs from the target's ({tv}): a draft must share the "
                         "target's tokenizer")
    if not prompt:
        raise ValueError("empty prompt: speculative decoding needs at least one token")
    if num_draft < 1:
        raise ValueError(f"num_draft={num_draft}: at least one draft token a step")
    modes = (target.training, draft.training)
    target.eval(), draft.eval()
    try:
        return _generate_with_draft(tcm, dcm, target.lm_head.weight.device, prompt, params, num_draft, on_tokens)
    finally:
        target.train(modes[0]), draft.train(modes[1])


def _generate_with_draft(tcm, dcm, dev, prompt, params, K, on_tokens=None):
    t0, stats = time.perf_counter(), SpecStats()
    gen = torch.Generator(device=dev).manual_seed(params.seed)
    stops, greedy = set(params.stop_token_ids), params.temperature == 0
    one = lambda v: torch.tensor([v], device=dev)  # noqa: E731
    max_len = len(prompt) + params.max_new_tokens + K + 2
    t_cache, d_cache = tcm.new_cache(1, max_len, None, dev), dcm.new_cache(1, max_len, None, dev)
    logits_1TV = tcm.forward_cached(torch.tensor([prompt], device=dev), t_cache, one(0))
    tok = sample_from_probs(sampling_probs(logits_1TV[:, -1], params), gen)
    seq, out = list(prompt), [int(tok)]
    logps = policy_logprobs(logits_1TV[:, -1], tok, params).tolist()
    seq.append(out[0])
    n, d_len = len(prompt), 0  # target cached positions < n (seq[n] = x_n is not); draft cached < d_len
    if on_tokens is not None:
        on_tokens(list(out))

    while len(out) < params.max_new_tokens and out[-1] not in stops:
        # --- draft K tokens: first catch up on seq[d_len .. n], then one token at a time
        drafts, q_rows = [], []
        feed = torch.tensor([seq[d_len: n + 1]], device=dev)
        for j in range(K):
            logits_V = dcm.forward_cached(feed, d_cache, one(d_len))[0, -1]
            d_len += feed.shape[1]
            if greedy:
                d = logits_V.argmax(-1, keepdim=True)
            else:
                q_rows.append(sampling_probs(logits_V[None], params)[0])
                d = sample_from_probs(q_rows[-1][None], gen)
            drafts.append(int(d))
            feed = d[None].reshape(1, 1)
        # the last draft was never fed: the draft has cached seq[..n] and drafts[:K-1]
        # --- verify [x_n, d_1 .. d_K] at positions n .. n + K
        ids_1J = torch.tensor([[seq[n], *drafts]], device=dev)
        logits_JV = tcm.forward_cached(ids_1J, t_cache, one(n))[0]
        if greedy:
            top = logits_JV.argmax(-1).tolist()
            a = next((j for j in range(K) if drafts[j] != top[j]), K)
            new = drafts[:a] + [top[a]]
        else:
            p_JV = sampling_probs(logits_JV, params)
            a_1, next_1 = accept_drafts(p_JV[None], torch.stack(q_rows)[None], torch.tensor([drafts], device=dev), gen)
            a = int(a_1)
            new = drafts[:a] + [int(next_1)]
        new_logps = policy_logprobs(logits_JV[: a + 1], torch.tensor(new, device=dev), params).tolist()
        stats.drafted, stats.accepted, stats.target_forwards = stats.drafted + K, stats.accepted + a, stats.target_forwards + 1
        for t, lp in zip(new, new_logps):
            if len(out) < params.max_new_tokens and out[-1] not in stops:
                out.append(t)
                logps.append(lp)
        seq += new
        if on_tokens is not None:
            on_tokens(list(out))
        n += a + 1  # x_n and the accepted drafts are cached in the target now
        d_len = min(d_len, n)  # the draft's cache is valid up to the first rejected draft

    stats.generated_tokens, stats.seconds = len(out), time.perf_counter() - t0
    reason = "stop" if out[-1] in stops else "length"
    return Completion(0, 0, out, logps, "", reason), stats
