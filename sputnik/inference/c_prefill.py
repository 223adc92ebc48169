"""A prefill through a one-call C forward (llama_decode.py, deepseek_decode.py), in bounded chunks.

Both C forwards take N tokens, each with its cache row and position, and return the logits of the
tokens asked for; their scratch grows with N. A prefill of B rows × T tokens goes through them in
chunks of whole time steps of at most `max_tokens` tokens: exact, since a chunk's tokens attend to the
slots the chunks before it wrote.
"""
from __future__ import annotations

from typing import Callable

import torch


def chunked_prefill(forward: Callable, ids_BT: torch.Tensor, seqlens_B: torch.Tensor,
                    logits_at_B: torch.Tensor | None, vocab: int, max_tokens: int) -> torch.Tensor:
    """T new tokens per row at positions seqlens_B[b] + t through forward(tok_N, row_N, pos_N, out_M) ->
    logits of tokens out_M: logits [B, T, V], or with logits_at_B [B, V] of token logits_at_B[b] of each row."""
    B, T = ids_BT.shape
    step = max(1, max_tokens // B)
    rows_B, parts = torch.arange(B), []
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        tok_N = ids_BT[:, t0:t1].reshape(-1)
        row_N = rows_B.repeat_interleave(t1 - t0)
        pos_N = (seqlens_B.to(torch.int64)[:, None] + torch.arange(t0, t1)).reshape(-1)
        if logits_at_B is None:
            out_M = torch.arange(tok_N.shape[0])
        else:  # the rows whose wanted token falls in this chunk
            want_B = (logits_at_B >= t0) & (logits_at_B < t1)
            out_M = (rows_B * (t1 - t0) + logits_at_B - t0)[want_B]
        logits_MV = forward(tok_N, row_N, pos_N, out_M)
        parts.append(logits_MV.view(B, t1 - t0, -1) if logits_at_B is None else (want_B, logits_MV))
    if logits_at_B is None:
        return torch.cat(parts, dim=1)
    out_BV = torch.empty(B, vocab)
    for want_B, logits_MV in parts:
        out_BV[want_B] = logits_MV
    return out_BV
