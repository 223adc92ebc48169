"""Distribution applied from outside the model (STYLE.md §3): torchrun env -> process group, DDP or
FSDP2 wrapping, rank-0 guards, reductions and full (unsharded) state dicts for checkpoints.

The same stage runs under `python -m sputnik ...` (one process, nothing initialised) and
`torchrun --nproc_per_node N -m sputnik ...` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR set): gloo on
CPU, nccl on CUDA. This is the only file that imports torch.distributed.fsdp.

Gradient averaging: DDP and FSDP2 average gradients over ranks. The training loop scales each
micro-batch loss by (its tokens x world_size / global tokens of the step), so the averaged gradient
is the gradient of the token-mean loss over the whole global batch, whatever its split into ranks
and micro-batches.

RL (stages/rl.py, rl/update.py) keeps a full copy of the weights on every rank, unwrapped, and sums gradients
with `all_reduce_grads` after the rank's micro-batches: dynamic sampling leaves ranks with different
numbers of sequences (sometimes none), which DDP's one-backward-per-rank contract does not fit, and
the update reaches the model through hidden_states rather than forward, which DDP does not see.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

Parallel = Literal["none", "ddp", "fsdp"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "" = not distributed

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------------
# Process group
def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group if WORLD_SIZE > 1; gloo for CPU, nccl for CUDA."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo()
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun --nproc_per_node N")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def teardown() -> None:
    """Leave the process group if this process joined one (safe to call in any case).

    The pause first: gloo's worker thread may still be destroying the last collective's work, whose
    tensors have Python objects, so it needs the GIL. The process group's destructor joins that thread
    while holding the GIL (it runs when its last holder, DDP's Reducer, is freed after this), and a
    worker still waiting for the GIL then waits forever (torch issue 56297; seen once in the tests, a
    rank hung in ~ProcessGroupGloo after writing its model). Sleeping releases the GIL: the worker
    finishes and the join later finds it idle."""
    if dist.is_available() and dist.is_initialized():
        time.sleep(0.05)
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Wrapping
def wrap_model(model: nn.Module, parallel: Parallel, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP or FSDP2 around a model already on `device` with identical weights on every rank (seeded
    init, or loaded from the same file). "none" or a single process returns the model itself."""
    if parallel not in ("none", "ddp", "fsdp"):
        raise ValueError(f"parallel={parallel!r}: allowed none, ddp, fsdp")
    if not info.enabled or parallel == "none":
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # broadcast_buffers=False: the router bias is updated identically on every rank from
        # all-reduced expert counts, so there is nothing to broadcast each forward.
        return DDP(model, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    # One FSDP unit per transformer block, then the root (embeddings, norm, head), as torchtitan does.
    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The largest nn.ModuleList of the model (the decoder layers, whatever the architecture)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def unwrap(model: nn.Module) -> nn.Module:
    """The single-device module inside DDP (FSDP2 modifies the module in place)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@contextlib.contextmanager
def maybe_no_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ---------------------------------------------------------------------------------------------
# Reductions
def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few Python numbers over ranks (float64, so token counts stay exact)."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op in one process); returns it."""
    if info.enabled:
        dist.all_reduce(t)
    return t


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# Replicated weights without a wrapper (RL): each rank keeps a full copy, ranks sum gradients
def all_reduce_grads(model: nn.Module, info: DistInfo, bucket_numel: int = 1 << 24) -> None:
    """Sum every parameter's gradient over ranks, in flat buckets (one all-reduce per bucket). A
    parameter with a gradient on some rank but not this one (no rows kept here, an expert no local
    token reached) contributes zeros; one with a gradient on no rank keeps None, as in one process
    (AdamW then leaves it alone). The caller scales each rank's loss by the global counts, so the sum
    is the gradient of the whole step's loss."""
    if not info.enabled:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(has_grad)
    params = [p for p, n in zip(params, has_grad.tolist()) if n > 0]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for i, p in enumerate(params):
        bucket.append(p.grad)
        size += p.grad.numel()
        if size >= bucket_numel or i == len(params) - 1:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
            bucket, size = [], 0


def check_replicas(model: nn.Module, info: DistInfo, when: str) -> None:
    """Raise if the ranks' copies of the weights differ: per tensor, its float64 sum and sum of
    squares are compared with rank 0's. Identical gradients and optimizer steps keep replicas bitwise
    equal; this catches what would break that (a rank that loaded other weights, a missed step)."""
    if not info.enabled:
        return
    with torch.no_grad():
        sig = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                           for p in model.state_dict().values() if p.is_floating_point()]).cpu()
    sigs = all_gather_object(sig, info)
    bad = [r for r, s in enumerate(sigs) if not torch.equal(s, sigs[0])]
    if bad:
        raise RuntimeError(f"{when}: the weights of rank(s) {bad} differ from rank 0's (replicas diverged); "
                           "all ranks must start from the same model and step together")


# ---------------------------------------------------------------------------------------------
# Full state dicts (what checkpoints store, independent of the wrapping)
def is_fsdp(model: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights and persistent buffers on CPU, keyed like the plain model's state_dict."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state, strict=True)


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """Full optimizer state (rank-0 meaningful). Under FSDP2 keyed by parameter name."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)
