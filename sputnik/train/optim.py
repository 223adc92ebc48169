"""Optimizer construction, learning-rate schedules and the guarded optimizer step.

- Parameter groups (AdamW, Loshchilov & Hutter 2019): weight decay only on matrices. Norm gains,
  biases and embedding tables are excluded (decaying an embedding row of a rare token pulls it to
  zero between its rare updates). The MoE router bias `e_score_correction_bias` is a buffer moved by
  the aux-loss-free rule (DeepSeek-V3 §2.1.2), never by gradients, so it is not in any group.
- Muon (Jordan et al. 2024, `torch.optim.Muon`) is optional: orthogonalised momentum for the 2-D
  hidden matrices, AdamW for everything else (embeddings, head, norms, 3-D expert tensors).
- Schedules are pure functions of the step (`lr_multiplier`), so resuming needs only the step:
  linear warmup, then cosine to `min_lr_ratio`, or WSD (warmup-stable-decay, Hu et al. 2024,
  MiniCPM; the schedule DeepSeek-V3 §4.2 uses) or constant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sputnik.config import knob

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, getattr(nn, "RMSNorm", nn.LayerNorm))


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "muon"] = knob("adamw", "adamw, or muon for 2-D hidden matrices (+ AdamW for the rest)")
    lr: float = knob(3e-3, "peak learning rate (AdamW groups)", min=0.0)
    muon_lr: float = knob(0.02, "peak learning rate of the Muon group (optimizer=muon)", min=0.0)
    schedule: Literal["cosine", "wsd", "constant"] = knob("cosine", "LR shape after warmup")
    warmup_steps: int = knob(10, "linear warmup steps", min=0)
    min_lr_ratio: float = knob(0.1, "final LR as a fraction of the peak (cosine and wsd)", min=0.0, max=1.0)
    decay_fraction: float = knob(0.2, "wsd: fraction of the steps spent in the final linear decay", min=0.0, max=1.0)
    weight_decay: float = knob(0.1, "decoupled weight decay on matrices", min=0.0)
    beta1: float = knob(0.9, "Adam beta1", min=0.0, max=1.0)
    beta2: float = knob(0.95, "Adam beta2", min=0.0, max=1.0)
    eps: float = knob(1e-8, "Adam epsilon", min=0.0)
    grad_clip: float = knob(1.0, "clip the global gradient norm to this (0 = no clipping, norm still measured)", min=0.0)


# ---------------------------------------------------------------------------------------------
# Parameter groups
def _no_decay(module: nn.Module, name: str, p: nn.Parameter) -> bool:
    return (p.ndim < 2 or name.endswith("bias") or isinstance(module, (nn.Embedding, *_NORM_TYPES))
            or "norm" in type(module).__name__.lower())


def param_groups(model: nn.Module, weight_decay: float, split_matrices: bool = False) -> list[dict]:
    """[{decay params}, {no-decay params}] (plus, with split_matrices, a third group "matrix": the
    2-D hidden weights for Muon). Tied parameters appear once (the first owner decides, normally
    the embedding), frozen parameters not at all."""
    seen: set[int] = set()
    decay, no_decay, matrix = [], [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    if isinstance(out_emb, nn.Module) and getattr(out_emb, "weight", None) is not None:
        embeddings.add(id(out_emb.weight))
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if _no_decay(module, p_name, p):
                no_decay.append(p)
            elif split_matrices and p.ndim == 2 and id(p) not in embeddings:
                matrix.append(p)
            else:
                decay.append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, name="decay"),
              dict(params=no_decay, weight_decay=0.0, name="no_decay")]
    if split_matrices:
        groups.append(dict(params=matrix, weight_decay=weight_decay, name="matrix"))
    return [g for g in groups if g["params"]]


class OptimizerList:
    """Several optimizers stepped as one (Muon for matrices + AdamW for the rest). Exposes the
    parts the training loop and checkpoints use: step, zero_grad, param_groups, state_dict."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("optimizers", [])) != len(self.optimizers):
            raise ValueError(f"optimizer state holds {len(state.get('optimizers', []))} optimizers, "
                             f"expected {len(self.optimizers)}")
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def adamw(groups: list[dict], **kw) -> torch.optim.AdamW:
    """torch AdamW with the fused kernel (one C++/CUDA kernel for all tensors; CPU too since torch
    2.4): tiny on 1 CPU thread steps in 11 ms vs 46 ms for foreach. It rounds differently from
    foreach (~1 ulp), so runs are reproducible against themselves, not against the foreach path.
    Falls back to foreach where a parameter's device has no fused kernel (constructor raises)."""
    try:  # copies: the constructor writes its defaults (fused=True) into the group dicts it is given
        opt = torch.optim.AdamW([dict(g) for g in groups], fused=True, **kw)
    except RuntimeError:
        return torch.optim.AdamW(groups, foreach=True, **kw)
    opt.register_step_post_hook(_bump_versions)
    return opt


def _bump_versions(optimizer, args, kwargs) -> None:
    """The fused kernels write parameters without bumping their autograd version counters, which
    caches of derived tensors (the engine's pre-transposed decode weights, mla.cached_weights) use
    to notice an update: bump them here, or the sampler would keep decoding with stale weights."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            torch.autograd.graph.increment_version(p)


def build_optimizer(model: nn.Module, cfg: OptimConfig):
    """AdamW over param_groups(model), or Muon + AdamW. Each group remembers its peak LR in
    `base_lr`; set_lr scales it by the schedule."""
    adam_kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "adamw":
        groups = param_groups(model, cfg.weight_decay)
        for g in groups:
            g["lr"] = g["base_lr"] = cfg.lr
        return adamw(groups, lr=cfg.lr, **adam_kw)
    groups = param_groups(model, cfg.weight_decay, split_matrices=True)
    matrix = [g for g in groups if g["name"] == "matrix"]
    rest = [g for g in groups if g["name"] != "matrix"]
    for g in matrix:
        g["lr"] = g["base_lr"] = cfg.muon_lr
    for g in rest:
        g["lr"] = g["base_lr"] = cfg.lr
    optimizers = [adamw(rest, lr=cfg.lr, **adam_kw)] if rest else []
    if matrix:
        # adjust_lr_fn="match_rms_adamw" scales updates to AdamW's RMS (Moonlight, Liu et al. 2025)
        muon = torch.optim.Muon(matrix, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
        muon.register_step_post_hook(_bump_versions)  # cheap insurance: counters move whatever the kernel
        optimizers.append(muon)
    return OptimizerList(optimizers)


# ---------------------------------------------------------------------------------------------
# Schedules
def lr_multiplier(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """LR / peak LR for optimizer step `step` (0-based) of `max_steps`.
    warmup:  (step + 1) / warmup_steps                       for step < warmup_steps
    cosine:  m + (1 - m) · ½(1 + cos(π · p)),  p = (step - warmup) / (max_steps - warmup)
    wsd:     1 until the last decay_fraction of the steps, then linear from 1 to m
    constant: 1                                               (m = min_lr_ratio)"""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    m = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        p = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1.0 - m) * min(1.0, (step - decay_start + 1) / decay_steps)


def set_lr(optimizer, multiplier: float) -> float:
    """Scale every group's peak LR; returns the LR of the first group (for logging)."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * multiplier
    return optimizer.param_groups[0]["lr"]


# ---------------------------------------------------------------------------------------------
# The guarded step
def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global L2 norm of the gradients (before clipping); clips to max_norm when > 0. Under DDP the
    gradients are already all-reduced and under FSDP2 the norm is a DTensor reduced over ranks, so
    every rank returns the same number and takes the same skip decision."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def guarded_step(optimizer, loss: float, grad_norm: float) -> bool:
    """optimizer.step() only if the loss and the gradient norm are finite; grads are zeroed either
    way, so a poisoned batch leaves no trace in the weights or the Adam moments. Returns stepped."""
    ok = math.isfinite(loss) and math.isfinite(grad_norm)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ok
