"""Auxiliary-loss-free load balancing, applied from outside the model (DeepSeek-V3 §2.1.2; Wang et al.
2024, arXiv 2408.15664): after each optimizer step every MoE router bias moves by
    b_i ← b_i + γ · sign(mean_j c_j − c_i),
c_i the tokens routed to expert i over the whole step: every micro-batch's forward (ModelOutput.
expert_load, padding excluded) and every rank (one all-reduce here; V3 balances the global batch).
The one place where the update happens, for pretraining, SFT, RL and distillation alike. A step that
was skipped (non-finite loss or gradient, decided the same on every rank) discards its counts.
"""
from __future__ import annotations

import torch

from sputnik import distributed as dist_lib


class ExpertLoad:
    """The expert load of one optimizer step: `add` each micro-batch's expert_load, then `apply`."""

    def __init__(self):
        self.load: dict[str, torch.Tensor] = {}

    def add(self, expert_load: dict[str, torch.Tensor]) -> None:
        for name, load_E in expert_load.items():
            load_E = load_E.detach().float()
            self.load[name] = self.load[name] + load_E if name in self.load else load_E

    def max_over_mean(self) -> float | None:
        """max/mean of this rank's counts in the worst MoE layer (1.0 = balanced), None without MoE."""
        ratios = []
        for load_E in self.load.values():
            counts = load_E.tolist()
            mean = sum(counts) / len(counts)
            ratios.append(max(counts) / mean if mean > 0 else 0.0)
        return max(ratios) if ratios else None

    def apply(self, model, info: dist_lib.DistInfo, stepped: bool) -> None:
        """After optimizer.step() (or its skip, decided alike on every rank): sum over ranks and move
        the biases; reset either way. `model` is the single-device module (its update_expert_bias is
        pure). Every MoE layer takes part in the sum, with zeros where this rank routed nothing (no rows
        kept in an RL step, an MTP block the update does not run): the collective needs every rank."""
        load, self.load = self.load, {}
        layers = model.moe_layers() if hasattr(model, "moe_layers") else {}
        if not stepped or not layers:
            return
        flat = torch.stack([load[n].to(m.gate.weight.device) if n in load
                            else torch.zeros(m.num_experts, device=m.gate.weight.device)
                            for n, m in layers.items()])
        dist_lib.all_reduce_tensor(flat, info)
        model.update_expert_bias(dict(zip(layers, flat.unbind(0))))
