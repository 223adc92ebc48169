"""The training step of the token-level loops (pretraining, SFT): the accumulated forward/backward of
the token-mean loss over a global batch, clipping, the guarded optimizer step, expert balancing.

Shape legend: B batch, T time.
"""
from __future__ import annotations

import torch

from sputnik import distributed as dist_lib
from sputnik.data import right_padding_mask
from sputnik.model.documents import document_ids
from sputnik.train.balance import ExpertLoad
from sputnik.train.loading import flops_per_token
from sputnik.train.optim import clip_grad_norm, guarded_step, lr_multiplier, set_lr
from sputnik.train.position_gaps import Gaps, draw_positions


def forward_backward(s, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], load: ExpertLoad,
                     poison: bool = False, document_mask: bool = False, gaps: Gaps = Gaps()) -> dict[str, float]:
    """Backward of the token-mean loss over the global batch (all micro-batches, all ranks).
    Micro-batch i is weighted n_i / N (n_i its non-ignored targets, N their global sum), times
    world_size because DDP/FSDP average gradients over ranks. Right padding (after each row's last
    real token, data.right_padding_mask) is not expert load, nor computed on a CPU. Returns global
    token-weighted means of loss, ce, mtp, aux, the global scored-token count (loss_tokens) and
    real-token count (real_tokens); `load` gets each micro-batch's expert load. document_mask:
    attention stays within each document of a packed window (model/documents.py). gaps: RoPE positions
    skip random gaps after line ends and a prompt's digits (train/position_gaps.py)."""
    n_local = [int((y != -100).sum()) for _, y in micro_batches]
    (n_global,) = dist_lib.all_reduce_sum([sum(n_local)], s.dist, s.device)
    sums = torch.zeros(5, dtype=torch.float64)
    pad_id = getattr(s.tokenizer, "pad_id", None)  # SFT rows are right-padded with it
    for i, (x_BT, y_BT) in enumerate(micro_batches):
        x_BT, y_BT = x_BT.to(s.device), y_BT.to(s.device)
        weight = n_local[i] / max(n_global, 1.0)
        valid_BT = right_padding_mask(x_BT, pad_id, y_BT) if pad_id is not None else None
        real = x_BT.numel() if valid_BT is None else valid_BT.sum()
        with dist_lib.maybe_no_sync(s.model, i == len(micro_batches) - 1), s.amp():
            out = s.model(x_BT, y_BT, valid_BT, **documents(s, x_BT, document_mask), **gapped(s, x_BT, gaps))
        load.add(out.expert_load)
        loss = out.loss * (weight * s.dist.world_size)
        if poison:
            loss = loss * float("nan")
        loss.backward()
        parts = [loss.detach() / s.dist.world_size, out.ce_loss * weight, out.mtp_loss * weight, out.aux_loss * weight,
                 torch.as_tensor(real)]
        sums += torch.stack([p.detach().double().cpu() for p in parts])
    loss, ce, mtp, aux, real_tokens = dist_lib.all_reduce_sum(sums.tolist(), s.dist, s.device)
    return dict(loss=loss, ce=ce, mtp=mtp, aux=aux, loss_tokens=n_global, real_tokens=int(real_tokens))


def documents(s, x_BT: torch.Tensor, document_mask: bool) -> dict:
    """The model's documents_BT keyword for a document-masked window (empty otherwise)."""
    return {"documents_BT": document_ids(x_BT, s.tokenizer.eot_id)} if document_mask else {}


def gapped(s, x_BT: torch.Tensor, gaps: Gaps) -> dict:
    """The model's positions_BT keyword with line and prompt gaps (empty without either)."""
    if not gaps:
        return {}
    return {"positions_BT": draw_positions(x_BT, s.tokenizer, gaps, s.raw.config.max_position_embeddings)}


def train_step(s, cfg, step: int, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """One optimizer step at 0-based `step`: LR from the schedule, forward/backward, clip, the step
    unless the loss or gradient is non-finite, the expert-bias update. -> the step's metrics, its
    global tokens and FLOPs, and `stepped`."""
    lr = set_lr(s.optimizer, lr_multiplier(step, cfg.steps, cfg.optim))
    load = ExpertLoad()
    m = forward_backward(s, micro_batches, load, poison=step in cfg.poison_steps,
                         document_mask=getattr(cfg, "document_mask", False),
                         gaps=Gaps(getattr(cfg, "position_gaps", 0), getattr(cfg, "prompt_gaps", 0),
                                   getattr(cfg, "gapped_rows", 1.0)))
    grad_norm = clip_grad_norm(s.model, cfg.optim.grad_clip)
    balance = load.max_over_mean()  # this rank's counts, before apply() sums and consumes them
    stepped = guarded_step(s.optimizer, m["loss"], grad_norm)
    load.apply(s.raw, s.dist, stepped)
    seq_len = micro_batches[0][0].shape[1]  # padded length (equal on every rank)
    tokens = sum(x.numel() for x, _ in micro_batches) * s.dist.world_size
    fpt = flops_per_token(s.model, seq_len)
    # step_flops (the ledger's) counts every position a batch holds, padding too: a device-independent
    # budget (a GPU computes the padding). Throughput and MFU count the real tokens' FLOPs only.
    return dict(m, lr=lr, grad_norm=grad_norm, moe_max_over_mean=balance, stepped=stepped, step_tokens=tokens,
                step_flops=fpt * tokens, step_real_tokens=m["real_tokens"], step_real_flops=fpt * m["real_tokens"])
