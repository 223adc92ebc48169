"""Held-out measurements inside the training loops: the token-mean loss, and greedy completions for
accuracy (the inference engine, or the full forward when FSDP shards the weights).

Shape legend: B batch, T time, V vocab.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from sputnik import distributed as dist_lib


@torch.no_grad()
def eval_loss(s, batches: list[tuple[torch.Tensor, torch.Tensor]], document_mask: bool = False) -> float:
    """Token-weighted mean next-token CE (no MTP, no aux) over held-out batches and ranks; with
    document_mask, as the training forward attends (within each document of a window)."""
    from sputnik.train.step import documents

    s.model.eval()
    total, count = 0.0, 0.0
    for x_BT, y_BT in batches:
        x_BT = x_BT.to(s.device)
        with s.amp():
            out = s.model(x_BT, y_BT.to(s.device), **documents(s, x_BT, document_mask))
        total += float(out.ce_loss) * float(out.num_tokens)
        count += float(out.num_tokens)
    s.model.train()
    total, count = dist_lib.all_reduce_sum([total, count], s.dist, s.device)
    return total / max(count, 1.0)


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: set[int],
                    pad_id: int, device: torch.device, amp=contextlib.nullcontext, batch_size: int = 32,
                    dist: dist_lib.DistInfo = dist_lib.DistInfo(), max_len: int | None = None) -> list[list[int]]:
    """Greedy completions (stop token included when hit). Plain weights: the inference engine, each
    rank decoding its own prompts. FSDP2-sharded weights need the wrapper's forward hooks, so there
    the full forward runs with no cache (_greedy_full_forward)."""
    raw = dist_lib.unwrap(model)
    if any(hasattr(p, "full_tensor") for p in raw.parameters()):
        return _greedy_full_forward(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                                    device=device, amp=amp, batch_size=batch_size, dist=dist, max_len=max_len)
    from sputnik.inference.engine import Engine
    from sputnik.inference.sampling import SamplingParams

    budget = max_new_tokens if max_len is None else max(1, min(max_new_tokens, max_len - max(map(len, prompts))))
    with amp():
        outs = Engine(raw, max_batch_size=batch_size).generate(
            prompts, SamplingParams(max_new_tokens=budget, temperature=0, stop_token_ids=tuple(stop_ids)))
    return [o[0].token_ids for o in outs]


def _greedy_full_forward(model, prompts, *, max_new_tokens, stop_ids, pad_id, device, amp, batch_size, dist,
                         max_len) -> list[list[int]]:
    """Rows right-padded in one buffer; causal attention means row b's next token depends only on its
    own first len_b positions, so ragged rows need no attention mask. Every rank must run the same
    number of forwards (FSDP gathers weights in each): the batch count and the early exit are agreed
    over ranks."""
    was_training = model.training
    model.eval()
    results: list[list[int]] = []
    num_batches = math.ceil(len(prompts) / batch_size)
    if dist.enabled:
        num_batches = int(max(dist_lib.all_gather_object(num_batches, dist)))
    for b in range(num_batches):
        chunk = prompts[b * batch_size:(b + 1) * batch_size] or [[pad_id]]  # a dummy row keeps ranks in step
        lens_B = torch.tensor([len(p) for p in chunk], device=device)
        budget = max_new_tokens if max_len is None else max(0, min(max_new_tokens, max_len - int(lens_B.max())))
        if dist.enabled:  # the same number of forwards everywhere
            budget = int(min(dist_lib.all_gather_object(budget, dist)))
        buf_BT = torch.full((len(chunk), int(lens_B.max()) + budget), pad_id, dtype=torch.long, device=device)
        for row, p in enumerate(chunk):
            buf_BT[row, :len(p)] = torch.tensor(p, dtype=torch.long)
        outs, done = [[] for _ in chunk], torch.zeros(len(chunk), dtype=torch.bool, device=device)
        rows = torch.arange(len(chunk), device=device)
        for _ in range(budget):
            with amp():
                logits_BTV = model(buf_BT[:, :int(lens_B.max())]).logits
            next_B = logits_BTV[rows, lens_B - 1].argmax(-1)
            for row in torch.nonzero(~done).flatten().tolist():
                tok = int(next_B[row])
                outs[row].append(tok)
                done[row] = tok in stop_ids
            live = ~done
            buf_BT[rows, lens_B] = torch.where(live, next_B, buf_BT[rows, lens_B])
            lens_B = lens_B + live.long()
            all_done = bool(done.all())
            if dist.enabled:
                all_done = all(dist_lib.all_gather_object(all_done, dist))
            if all_done:
                break
        results.extend(outs if b * batch_size < len(prompts) else [])
    model.train(was_training)
    return results[:len(prompts)]
