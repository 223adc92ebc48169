"""Position gaps: SFT options that make RoPE distances unreliable, so that lookups go by content (a
length-generalisation aid; decoding is unchanged).

Shape legend: B batch, T time.

A model trained on 1-4 digit additions learns to find each operand digit "k tokens back": at five
digits every such distance is new. With `position_gaps G`, each training sequence's positions skip a
random 0..G after every line end (a token containing a newline, the end of the prompt, `</think>`):

    tokens     <|user|> What ... ? <|assistant|> a: 1+7=8 … \n b: 2+9=11 … \n …
    positions  0        1    ...   P             P+1+g1 …      …+g2 …

Within a line the positions stay consecutive (a line's own structure reads as before), while the
distance from a line to the prompt or to an earlier line changes from sequence to sequence: only a
lookup by content (index hints' place letters, a line's label) fits every draw.

Line gaps leave the prompt itself rigid: a model can still find "the 4th place" as 8 tokens after the
bracket or "the next place" as the one 2 tokens on, lookups that fit every trained length and fail
past it (an index-hinted model trained on 4 digits writes the places of 6 as four from the start and
two from the end). `prompt_gaps G` also opens a gap of 0..G after every token ending in a digit inside
the prompt, between one place and the next: a place's distance from the bracket, the end or the
previous place then changes from draw to draw, and only its letter finds it.

Gaps of 0 everywhere are what decoding sees, one draw among the trained ones, and a rare one once a
sequence has many openings: at 8 lines of gaps up to 8, the all-zero draw has odds (1/9)^8, and a model
that reads every gapped sequence right may still misread the consecutive one (0.17 of 4-digit gold
traces vs 1.00, benchmarks/probe_position_gaps.py). `gapped_rows P` gaps only a share P of the rows, so
that consecutive positions stay a trained case. Each gap is drawn from torch's RNG (a checkpointed
state: a resumed run draws the same), and the accumulated gap is capped so that no position passes the
model's table. What they buy on index-hinted additions is measured in docs/benchmarks.md
(beyond_the_data with index hints; prompt gaps: no 6-digit sum).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Gaps:
    """What SFT's position gaps open: up to `lines` after each line end, up to `prompt` after each digit of
    a prompt, in a share `rows` of the batch's rows (the others keep decoding's consecutive positions)."""
    lines: int = 0
    prompt: int = 0
    rows: float = 1.0

    def __bool__(self) -> bool:
        return bool(self.lines or self.prompt)


@functools.lru_cache(maxsize=4)  # once per tokenizer: a large vocabulary takes a while to scan
def line_end_ids(tokenizer) -> tuple[int, ...]:
    """The tokens after which a gap may open: every vocabulary entry whose text holds a newline, the
    last token of a rendered prompt (the assistant marker) and `</think>` when it is one token."""
    ids = {i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])}
    ids.add(tokenizer.render_prompt("")[-1])
    think_end = tokenizer.token_to_id("</think>")
    if think_end is not None:
        ids.add(think_end)
    return tuple(sorted(ids))


@functools.lru_cache(maxsize=4)
def digit_end_ids(tokenizer) -> tuple[int, ...]:
    """The tokens after which a prompt gap may open: every vocabulary entry whose text ends in a digit."""
    return tuple(i for i in range(tokenizer.vocab_size) if tokenizer.decode([i])[-1:].isdigit())


def line_gaps(ids_BT: torch.Tensor, line_ends: torch.Tensor, max_gap: int) -> torch.Tensor:
    """gap_BT (int64): a gap g ~ U{0..max_gap} after each line end, 0 elsewhere."""
    return torch.randint(0, max_gap + 1, ids_BT.shape, device=ids_BT.device) * torch.isin(ids_BT, line_ends)


def prompt_digit_gaps(ids_BT: torch.Tensor, digit_ends: torch.Tensor, user_id: int, assistant_id: int,
                      max_gap: int) -> torch.Tensor:
    """gap_BT (int64): a gap g ~ U{0..max_gap} after each token ending in a digit inside a prompt (after a
    user marker, before its assistant marker), 0 elsewhere: a number's k-th digit then sits at no fixed
    distance from its bracket, nor from the numbers' end."""
    in_prompt_BT = torch.cumsum((ids_BT == user_id).long() - (ids_BT == assistant_id).long(), 1) > 0
    opens_BT = torch.isin(ids_BT, digit_ends) & in_prompt_BT
    return torch.randint(0, max_gap + 1, ids_BT.shape, device=ids_BT.device) * opens_BT


def gapped_rows(gap_BT: torch.Tensor, share: float) -> torch.Tensor:
    """gap_BT with each row's gaps kept with probability `share`, zeroed otherwise (no draw at share 1)."""
    if share >= 1.0:
        return gap_BT
    return gap_BT * (torch.rand(gap_BT.shape[0], 1, device=gap_BT.device) < share)


def gapped_positions(gap_BT: torch.Tensor, num_positions: int) -> torch.Tensor:
    """positions [B, T] (int64): t plus the gaps opened before t (a gap moves the tokens after its
    opening token, not the token itself); the running total is capped at num_positions − T (the
    table's last row)."""
    T = gap_BT.shape[1]
    if T > num_positions:
        raise ValueError(f"sequence length {T} > max_position_embeddings={num_positions}")
    shift_BT = torch.cumsum(gap_BT, 1) - gap_BT
    return torch.arange(T, device=gap_BT.device) + shift_BT.clamp(max=num_positions - T)


def draw_positions(ids_BT: torch.Tensor, tokenizer, gaps: Gaps, num_positions: int) -> torch.Tensor:
    """positions [B, T] for a batch under `gaps`: line gaps drawn first (a run without prompt gaps draws
    what it always drew), then prompt gaps, then the rows that keep them."""
    gap_BT = torch.zeros_like(ids_BT)
    if gaps.lines:
        gap_BT += line_gaps(ids_BT, torch.tensor(line_end_ids(tokenizer), device=ids_BT.device), gaps.lines)
    if gaps.prompt:
        digits = torch.tensor(digit_end_ids(tokenizer), device=ids_BT.device)
        gap_BT += prompt_digit_gaps(ids_BT, digits, tokenizer.user_id, tokenizer.assistant_id, gaps.prompt)
    return gapped_positions(gapped_rows(gap_BT, gaps.rows), num_positions)
