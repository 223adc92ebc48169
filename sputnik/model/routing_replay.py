"""Routing replay for mixture-of-experts RL (Rollout Routing Replay, R3: arXiv 2510.11370).

Even with identical weights, the sampler's forward (decode kernels, another order of summation,
bf16 on a GPU) and the trainer's forward can route a token to different experts whenever two
experts' scores are close. The trainer then scores the sampled token under a different network
than the one that sampled it, and the importance ratio π_train / π_sampler carries that error;
on large MoE models it is a known cause of collapsing GRPO runs (Megatron-LM issue #4168:
Qwen3-30B-A3B, 3 of 3 baseline runs collapsed, none with replay). R3 records the experts each
rollout token was routed to and makes the update's forward use exactly those experts, with the
gate weights computed from the trainer's own router scores (so the router still gets gradients).

A `RoutingTape` is active inside `recording(model)` or `replaying(model, idx)`; every router of the
model (DeepSeekMoE's `Router.route`, Qwen3-MoE's `SoftmaxMoE`) passes its own top-k choice through
`choose`, which records it or returns the replayed choice instead. Outside those contexts `choose`
is one global read. Recording needs an eager decoder (a compiled or captured step cannot append to
a Python list); the engine swaps one in while it records. Our DeepSeek model's one-call C step
routes outside Python and hands the tape every layer's choices at once (`record_rows`).

Shape legend: N token rows of one router call, K experts per token, L routed layers.
"""
from __future__ import annotations

import contextlib

import torch

_TAPE: "RoutingTape | None" = None


def routed_layers(model) -> list[torch.nn.Module]:
    """The routers of the model's main MoE layers in layer order (MTP modules excluded: the RL
    forward does not run them)."""
    from sputnik.model.llama import LlamaModel, SoftmaxMoE
    from sputnik.model.moe import MoE

    layers = getattr(getattr(model, "model", None), "layers", None) or []
    if isinstance(model, LlamaModel):
        return [layer.mlp for layer in layers if isinstance(layer.mlp, SoftmaxMoE)]
    return [layer.mlp.gate for layer in layers if isinstance(getattr(layer, "mlp", None), MoE)]


class RoutingTape:
    """Record mode: each routed layer's choices, call after call (`take` pops them). Replay mode:
    `replay` [N, L, K] gives each layer's experts for the N token rows of the next forward (rows with
    −1 keep their own choice); `apply=False` only measures. Either way it counts, per layer, the
    compared rows and those where the layer's own set of experts differs from the replayed one."""

    def __init__(self, model, replay: torch.Tensor | None = None, apply: bool = True):
        self.index = {id(m): i for i, m in enumerate(routed_layers(model))}
        if not self.index:
            raise ValueError(f"{type(model).__name__} has no routed MoE layers: routing replay applies to MoE models")
        self.replay, self.apply = replay, apply
        if replay is not None and replay.shape[1] != len(self.index):
            raise ValueError(f"replayed routing has {replay.shape[1]} layers, the model routes in {len(self.index)}")
        self.calls: list[list[torch.Tensor]] = [[] for _ in self.index]
        self.compared = self.differed = 0

    @property
    def num_layers(self) -> int:
        return len(self.index)

    def on_route(self, router, own_NK: torch.Tensor) -> torch.Tensor:
        layer = self.index.get(id(router))
        if layer is None:  # a router outside the main layers (an MTP module drafting)
            return own_NK
        if self.replay is None:
            self.calls[layer].append(own_NK.detach().to(torch.int16))
            return own_NK
        replay_NK = self.replay[:, layer].to(device=own_NK.device, dtype=own_NK.dtype)
        if replay_NK.shape != own_NK.shape:
            raise ValueError(f"replayed routing covers {replay_NK.shape[0]} token rows, layer {layer} routes "
                             f"{own_NK.shape[0]} (the replay must follow this forward's token layout)")
        known_N = (replay_NK >= 0).all(-1)
        same_N = (own_NK.sort(-1).values == replay_NK.sort(-1).values).all(-1)
        self.compared += int(known_N.sum())
        self.differed += int((known_N & ~same_N).sum())
        if not self.apply:
            return own_NK
        return torch.where(known_N[:, None], replay_NK, own_NK)

    def record_rows(self, routes_NLK: torch.Tensor) -> None:
        """Record mode: the choices of a forward that routed outside the routers' Python calls (the C
        decode step), every routed layer at once, [N, L, K]."""
        if self.replay is not None or routes_NLK.shape[1] != len(self.index):
            raise ValueError(f"record_rows: a recording tape over {len(self.index)} layers, got "
                             f"{tuple(routes_NLK.shape)}{' while replaying' if self.replay is not None else ''}")
        for layer, calls in enumerate(self.calls):
            calls.append(routes_NLK[:, layer].to(torch.int16))

    def take(self) -> torch.Tensor | None:
        """The choices recorded since the last take, [N, L, K] int16 (None if nothing routed), where
        each layer was called once over the same N rows."""
        if not self.calls[0]:
            return None
        per_layer = [torch.cat(c) for c in self.calls]
        self.calls = [[] for _ in self.index]
        return torch.stack(per_layer, dim=1)

    @property
    def mismatch(self) -> float:
        """Share of compared (token, layer) pairs whose own experts differ from the replayed ones."""
        return self.differed / max(self.compared, 1)


def tape_active() -> bool:
    return _TAPE is not None


def active_tape() -> "RoutingTape | None":
    return _TAPE


def choose(router, own_NK: torch.Tensor) -> torch.Tensor:
    """A router's top-k choice, as the active tape records or replays it (unchanged without one)."""
    if _TAPE is None:
        return own_NK
    return _on_route(router, own_NK)


@torch.compiler.disable  # inside a compiled block: a graph break, run eagerly (Python lists, counters)
def _on_route(router, own_NK: torch.Tensor) -> torch.Tensor:
    return _TAPE.on_route(router, own_NK)


@contextlib.contextmanager
def _active(tape: RoutingTape):
    global _TAPE
    if _TAPE is not None:
        raise RuntimeError("a routing tape is already active (recording and replaying do not nest)")
    _TAPE = tape
    try:
        yield tape
    finally:
        _TAPE = None


def recording(model):
    """with recording(model) as tape: ... tape.take() -> the experts chosen since the last take."""
    return _active(RoutingTape(model))


def replaying(model, replay_NLK: torch.Tensor, apply: bool = True):
    """with replaying(model, idx) as tape: the next forward's routers use idx [N, L, K] (−1: own choice);
    tape.mismatch afterwards. apply=False: measure the disagreement, route as usual."""
    return _active(RoutingTape(model, replay_NLK, apply))
