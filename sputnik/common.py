"""Device and dtype choice, threads, seeding, atomic writes, rank-0 printing.

This is the only file that names a device. Everything else asks `pick_device()` and
`compute_dtype()`, so the CPU path stays first-class (STYLE.md §9).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# torch is imported inside the functions that use it: the tokenizer and the corpus workers import
# this module and need no torch (its import costs ~265 MB of RSS in every worker process).

# ---------------------------------------------------------------------------------------------
# Device and dtype
@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    dtype: torch.dtype  # compute dtype for autocast/matmuls; master weights stay fp32
    reason: str


def pick_device(requested: str = "auto") -> DeviceChoice:
    """cuda > mps > cpu, unless `requested` names one. bf16 autocast on CUDA; fp32 on CPU: CPUs without
    bf16 instructions run bf16 matmuls 9-130x slower than fp32, and even this project's Zen 4 CPU
    (avx512_bf16: bf16 GEMMs ~2.5x faster at training shapes) gained little on a whole autocast
    training step and lost 2x on batch-1 decode GEMVs (LOG.md, 2026-12-02), so CPU stays fp32: the
    same numbers on every CPU."""
    import torch

    if requested not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(f"device={requested!r}: allowed auto, cpu, cuda, mps")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.cuda.is_bf16_supported():
            return DeviceChoice(dev, torch.bfloat16, "CUDA with bf16 support: bf16 autocast, fp32 master weights")
        return DeviceChoice(dev, torch.float32, "CUDA without bf16 support: fp32")
    if requested == "cuda":
        raise ValueError("device='cuda' requested but torch.cuda.is_available() is False")
    if requested in ("auto", "mps") and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return DeviceChoice(torch.device("mps"), torch.float32, "Apple MPS: fp32")
    if requested == "mps":
        raise ValueError("device='mps' requested but MPS is not available")
    return DeviceChoice(torch.device("cpu"), torch.float32, "CPU: fp32 (bf16 autocast gains little on CPUs, see pick_device)")


def autocast(choice: DeviceChoice):
    """bf16 autocast on GPU, a no-op context on fp32 devices."""
    import torch

    if choice.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=choice.device.type, dtype=choice.dtype)


def set_threads(num_threads: int = 0) -> int:
    """Pin intra-op threads. 0 = all physical cores we were given (os.sched_getaffinity).
    Two OpenMP threads on two shared vCPUs collapse when oversubscribed, so never exceed that."""
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = avail if num_threads <= 0 else min(num_threads, avail)
    import torch

    torch.set_num_threads(n)
    return n


def fixed_hash_seed() -> None:
    """Run this command under PYTHONHASHSEED=0, re-executing the interpreter once when it is unset.

    Python salts str hashes per process, so the iteration order of a set of strings changes from run
    to run, and several reasoning-gym generators iterate sets: the same seed then gave other problems
    in every run (a generated corpus, an RL prompt set, SFT data), and a study could not reproduce its
    figures (LOG.md stop 28). Called once by the CLI; a PYTHONHASHSEED the user set is kept."""
    if os.environ.get("PYTHONHASHSEED") is None:
        os.environ["PYTHONHASHSEED"] = "0"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves blocks above a (moving) threshold with fresh mmaps and trims the heap
    top, so the [rows, vocab] temporaries of every training and RL micro-batch come back as new
    pages, each paid with a first-touch page fault: ~3 ms per 16 MB here, ~55k faults and ~8% of a
    tiny GRPO update (LOG.md, stop 18). With these limits the heap keeps its peak and reuses it.
    The cost is memory: RSS stays at its high-water mark instead of shrinking between steps, and
    the mark can rise while the heap settles (ours ~0.77 GB either way in that benchmark; TRL's GRPO
    step under the same setting 1.78 -> 2.21 GB, and 1.8x faster). Called once by the CLI (a
    process-wide setting: library users decide for their own process). Returns False where there
    is no glibc (macOS, musl): nothing changes there."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is a dependency, but seeding must never be the thing that fails
        pass


# ---------------------------------------------------------------------------------------------
# Files: every checkpoint, ledger line, config and report goes through these
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: a reader (or a killed
    writer) sees either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line with a single write() on an O_APPEND fd. Metrics files use this;
    the cost ledger has its own stricter protocol (ledger.py)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Ranks and printing (torchrun sets RANK/WORLD_SIZE; plain python is rank 0 of 1)
def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_rank0() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    file = kwargs.pop("file", sys.stderr)
    if is_rank0():
        print(*args, **kwargs, file=file, flush=True)


class Timer:
    """`with Timer() as t: ...; t.seconds` — wall clock, synchronising CUDA if it is in use."""

    def __enter__(self):
        _sync_cuda()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync_cuda()
        self.seconds = time.perf_counter() - self.start
        return False


def _sync_cuda() -> None:
    torch = sys.modules.get("torch")  # no torch imported: nothing can be running on a GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
