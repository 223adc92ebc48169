"""Derived decode weights: fused, transposed or pre-multiplied copies of a model's parameters that the
decode steps read (one torch.mm against an [in, out] copy instead of a Linear; W_UK folded into W_UQ).

They are derived, never trained: kept here, outside the model, in a table keyed by the module that
owns the parameters (weakly, so a model that goes away takes its copies with it), and rebuilt when a
source parameter was replaced (data_ptr) or modified in place (version counter: optimizer steps,
load_state_dict, .to()). Writes through `p.data` bypass the version counter (train/optim.py bumps
the counters after its fused steps for that reason).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

_TABLE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def cached_weights(owner: nn.Module, name: str, sources: list[torch.Tensor], build, cast: bool = True):
    """build() -> the derived tensors (any nest of dicts/lists/tuples), cached per (owner, name) until a
    source changes. Under autocast (RL rollouts on a GPU: fp32 master weights, bf16 compute) the fp32
    copies are kept a second time, already in the autocast dtype (`cast`; RoPE tables opt out): every
    consumer is a matmul that autocast would cast anyway, so the values are the same, but the step no
    longer re-reads and re-casts every weight."""
    dtype = _autocast_dtype(sources[0]) if cast and sources else None
    if dtype is not None:
        name, base = f"{name}@{dtype}", build
        build = lambda: _cast_floats(base(), dtype)  # noqa: E731
    key = tuple((t.data_ptr(), t._version) for t in sources)
    entries = _TABLE.setdefault(owner, {})
    hit = entries.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            value = build()
            # Refresh in place when the layout is unchanged (an optimizer step): the derived tensors keep
            # their addresses, which a captured CUDA graph of the decode step reads (graphs.py).
            if hit is not None and _copy_into(hit[1], value):
                value = hit[1]
        hit = (key, value)
        entries[name] = hit
    return hit[1]


def tensors(tree) -> list[torch.Tensor]:
    """The tensors of a nest of dicts/lists/tuples, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors(v)]
    return []


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The lower-precision dtype autocast is running in for t's device, if t is fp32 and it is on."""
    dev = t.device.type
    if t.dtype != torch.float32 or dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _cast_floats(tree, dtype: torch.dtype):
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.dtype == torch.float32 else tree
    if isinstance(tree, dict):
        return {k: _cast_floats(v, dtype) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cast_floats(v, dtype) for v in tree)
    return tree


def _same_layout(old, new) -> bool:
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):  # never write into a parameter
        return (old.shape == new.shape and old.dtype == new.dtype and old.device == new.device
                and old.stride() == new.stride() and not isinstance(old, nn.Parameter))
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same_layout(old[k], new[k]) for k in old)
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same_layout(a, b) for a, b in zip(old, new))
    return type(old) is type(new) and not isinstance(old, torch.Tensor) and old == new


def _copy_into(old, new) -> bool:
    """Copy the tensors of `new` into those of `old` (same nested layout, shapes, dtypes, devices and
    strides, equal non-tensor leaves); False, touching nothing, otherwise."""
    if not _same_layout(old, new):
        return False

    def walk(a, b):
        if isinstance(a, torch.Tensor):
            if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():  # not already the same memory
                a.copy_(b)
        elif isinstance(a, dict):
            for k in a:
                walk(a[k], b[k])
        elif isinstance(a, (list, tuple)):
            for x, y in zip(a, b):
                walk(x, y)

    walk(old, new)
    return True
