"""Abacus positions (McLeish et al., 2024, "Transformers Can Do Arithmetic with the Right Embeddings"):
a learned embedding of each digit's place within its number, added to the token embedding.

Shape legend: B batch, T time, D hidden_size, A = abacus_max_index + 1 table rows.

RoPE tells a token how far back another token is; to add two numbers a model must instead find the
digit of the same place in each operand, whose distance changes with every operand length. The
abacus index gives every digit its place directly: index i (1, 2, …) is the i-th digit of its run
of consecutive digit tokens, 0 is any other token (nothing is added). With numbers written least
significant digit first, index i is the 10^(i−1) place in every operand and in the answer, so the
lookup "same place" is the same at every length. Trained with a random offset k ∈ [0, K] added to
every index of a sequence (one k per sequence), the places 1..n of short training numbers also
train rows k+1..k+n: a model trained on 4 digits has seen rows up to K+4 and meets no untrained row
at 6 digits.

The index is causal (a digit's place counts from the start of its run, which precedes it), so the
decode cache stores the index of every cached position (MLACache.abacus_BS) and a new token's
index is the previous position's plus one. A caller that packs several sequences into one row
(rl/shared_prompts.py) computes each sequence's places itself and passes them in.
"""
from __future__ import annotations

import torch
from torch import nn


def digit_runs(ids_BT: torch.Tensor, digit_ids: torch.Tensor, previous_B: torch.Tensor | None = None) -> torch.Tensor:
    """Abacus index of every token [B, T] (int64): i for the i-th digit of a run of digit tokens, 0
    elsewhere. previous_B: the index of the token before column 0 (a cached decode, or a completion
    after its prompt, continues that run).

    With c_t = Σ_{s≤t} digit_s, a run's i-th digit at t has i = c_t − c_r, r its run's last non-digit
    before t (c_r = 0 and the carried-in index added when there is none): two scans, no loop.
    """
    is_digit_BT = torch.isin(ids_BT, digit_ids)
    count_BT = is_digit_BT.long().cumsum(1)
    start_BT = torch.where(is_digit_BT, 0, count_BT).cummax(1).values
    index_BT = count_BT - start_BT
    if previous_B is not None:
        before_any_break_BT = (~is_digit_BT).long().cumsum(1) == 0
        index_BT = index_BT + torch.where(before_any_break_BT, previous_B[:, None], 0)
    return torch.where(is_digit_BT, index_BT, 0)


class AbacusEmbedding(nn.Module):
    """Table [A, D] of place embeddings; row 0 (non-digits) is never added. `forward` returns the term
    to add to the token embedding (zeros where the index is 0). Indices past the table share its last
    row (runs longer than abacus_max_index digits are beyond what the option was sized for)."""

    def __init__(self, max_index: int, hidden_size: int, digit_ids: list[int]):
        super().__init__()
        self.max_index = max_index
        self.weight = nn.Parameter(torch.zeros(max_index + 1, hidden_size))
        self.register_buffer("digit_ids", torch.tensor(digit_ids, dtype=torch.long), persistent=False)

    def indices(self, ids_BT: torch.Tensor, previous_B: torch.Tensor | None = None) -> torch.Tensor:
        return digit_runs(ids_BT, self.digit_ids.to(ids_BT.device), previous_B)

    def forward(self, index_BT: torch.Tensor, dtype: torch.dtype, offset_B: torch.Tensor | None = None) -> torch.Tensor:
        """offset_B: the training offset k of each sequence, added to its digits' indices."""
        if offset_B is not None:
            index_BT = torch.where(index_BT > 0, index_BT + offset_B[:, None], 0)
        rows_BTD = self.weight[index_BT.clamp(max=self.max_index)].to(dtype)
        return rows_BTD * (index_BT > 0).unsqueeze(-1).to(dtype)
