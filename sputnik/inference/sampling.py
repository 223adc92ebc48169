"""Sampling settings and the token samplers shared by the engine, the server's scheduler, speculative
decoding and the compiled CPU step (which ends its graph with sample_plain).

Shape legend: B rows, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sputnik.kernels.cpu import sample_rows, softmax_rows_available


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
        if logits_BV.is_cpu and logits_BV.dtype == torch.float32 and softmax_rows_available():
            picked = sample_rows(logits_BV, u_B1, params.temperature)  # one C pass instead of ~6 ATen ones
            if picked is not None:
                return picked
        return sample_plain(logits_BV, u_B1, params.temperature)
    logits_BV = logits_BV.float()
    scaled_BV = logits_BV if params.temperature == 1.0 else logits_BV / params.temperature  # x / 1 == x: skip a [B, V] pass
    logp_BV = F.log_softmax(scaled_BV, -1)
    probs_BV = filter_logits(scaled_BV, params.top_k, params.top_p).softmax(-1)
    tokens_B = sample_from_probs(probs_BV, generator)
    return tokens_B, logp_BV.gather(-1, tokens_B[:, None])[:, 0]


def sample_plain(logits_BV: torch.Tensor, u_B1: torch.Tensor | None, temperature: float):
    """sample_next without top-k/top-p, given each row's uniform u_B1 (None when greedy): pure
    tensor ops, so a compiled decode step can end with it (graphs.GraphDecoder.sample_step)."""
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
