"""Line gaps: an SFT option that makes RoPE distances across lines unreliable, so that lookups go by
content (a length-generalisation aid; decoding is unchanged).

Shape legend: B batch, T time.

A model trained on 1-4 digit additions learns to find each operand digit "k tokens back": at five
digits every such distance is new. With `position_gaps G`, each training sequence's positions skip a
random 0..G after every line end (a token containing a newline, the end of the prompt, `</think>`):

    tokens     <|user|> What ... ? <|assistant|> a: 1+7=8 … \n b: 2+9=11 … \n …
    positions  0        1    ...   P             P+1+g1 …      …+g2 …

Within a line the positions stay consecutive (a line's own structure reads as before), while the
distance from a line to the prompt or to an earlier line changes from sequence to sequence: only a
lookup by content (index hints' place letters, a line's label) fits every draw. Gaps of 0 everywhere
are what decoding sees, one draw among the trained ones. Each gap is drawn from torch's RNG (a
checkpointed state: a resumed run draws the same), and the accumulated gap is capped so that no
position passes the model's table. What it buys on index-hinted additions is measured in
docs/benchmarks.md (beyond_the_data with index hints).
"""
from __future__ import annotations

import functools

import torch


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


def gapped_positions(ids_BT: torch.Tensor, line_ends: torch.Tensor, max_gap: int, num_positions: int) -> torch.Tensor:
    """positions [B, T] (int64): t plus the gaps opened after the line ends before t. A gap g ~ U{0..max_gap}
    follows each line end; the running total is capped at num_positions − T (the table's last row)."""
    B, T = ids_BT.shape
    if T > num_positions:
        raise ValueError(f"sequence length {T} > max_position_embeddings={num_positions}")
    gap_BT = torch.randint(0, max_gap + 1, (B, T), device=ids_BT.device) * torch.isin(ids_BT, line_ends)
    shift_BT = torch.cumsum(gap_BT, 1) - gap_BT  # a gap moves the tokens after its line end, not the end itself
    return torch.arange(T, device=ids_BT.device) + shift_BT.clamp(max=num_positions - T)
