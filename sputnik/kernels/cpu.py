"""Hand-written CPU kernels, built on first use with the machine's C compiler and loaded with ctypes.

Five kernels, one C file (and one library) each, plain C with OpenMP and no torch headers, so each
builds in about a second with `cc -O3 -march=native` and needs only what torch.compile on CPU needs
already (a C compiler):
  - routed_ffn.c: the routed experts of a MoE layer for a few tokens (decode steps), which inductor
    and the grouped GEMM both do poorly at a few tokens an expert (see the C file);
  - softmax_rows.c: the row-wise softmax statistics and gradient of the policy's token log-probs
    (losses.token_logprobs, the GRPO update's LM head), one pass per row instead of 5-7 ATen passes;
  - linear_rows.c: linear layers over a few rows (decode steps, short prefills: up to 64), which
    read each weight once at close to the memory bandwidth (one row) or run 1.2-2x MKL's small-M
    GEMM (16-64 rows) on the Intel VM of stop 25 (0.5-0.8x on the AMD VM of stop 32); and
    linear_packed, any number of rows against a weight packed once into strips (llama_step.c's
    product), which our DeepSeek-V3's decode LM head uses;
  - llama_step.c: a whole decode step of the dense Llama family in one call (inference/llama_decode.py
    builds its weight table), the same loops as linear_rows.c (rows_gemm.h) without ~200 ATen ops;
  - deepseek_step.c: the same for our DeepSeek-V3 (absorbed MLA over the latent cache, the router, the
    shared and routed experts: routed_experts.h, the loops of routed_ffn.c; inference/deepseek_decode.py).
A library is cached under
$SPUTNIK_KERNEL_CACHE (default ~/.cache/sputnik/kernels), keyed by the source and the headers it
includes, the compiler, the flags and the CPU's feature flags (it is built for this CPU), and written to a temporary file, then
renamed, so concurrent builds never load a half-written library.

No compiler, a failed build or a non-Linux host: `routed_ffn_available()` / `softmax_rows_available()`
is False (logged once) and callers keep their torch path; `use_cpu_kernels(False)` (a run's
cpu_kernels=false) turns both off for the process.
`routed_ffn_rows` is a torch custom op, so a compiled decode step calls it as one opaque node.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("routed_ffn.c")
SOFTMAX_SOURCE = Path(__file__).with_name("softmax_rows.c")
LINEAR_SOURCE = Path(__file__).with_name("linear_rows.c")
LLAMA_STEP_SOURCE = Path(__file__).with_name("llama_step.c")
DEEPSEEK_STEP_SOURCE = Path(__file__).with_name("deepseek_step.c")
_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# each library's functions: (argument types, return type), set once on load
_SIGNATURES = {
    SOURCE: {"routed_ffn": ([_P] * 6 + [_I64] * 5 + [_I32], _I32), "routed_ffn_cols": ([], _I32)},
    SOFTMAX_SOURCE: {"softmax_rows_forward": ([_P, _P, _I64, _I64, _P, _P, _P, _I32], _I32),
                     "sample_rows": ([_P, _P, _I64, _I64, ctypes.c_float, _P, _P, _I32], _I32),
                     "softmax_rows_backward": ([_P] * 7 + [_I64, _I64, _I32], _I32)},
    LINEAR_SOURCE: {"linear_rows": ([_P] * 4 + [_I64] * 3 + [_I32], _I32), "linear_rows_max": ([], _I32),
                    "linear_packed": ([_P] * 5 + [_I64] * 3 + [_I32], _I32), "linear_packed_cols": ([], _I32)},
    LLAMA_STEP_SOURCE: {"llama_forward": ([_P] * 4 + [_I64] + [_P] * 2 + [_I64, _I64, _P, _I64, _P, _I32], _I32),
                        "llama_step_pack_cols": ([], _I32)},
    DEEPSEEK_STEP_SOURCE: {"deepseek_forward": ([_P] * 4 + [_I64] + [_P] + [_I64, _I64, _P, _I64, _P, _I32, _P], _I32),
                           "deepseek_step_pack_cols": ([], _I32), "deepseek_step_expert_cols": ([], _I32)},
}
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.append("-mprefer-vector-width=512")  # gcc's -march=native picks 256-bit vectors; 512 is ~15% faster here


def cache_dir() -> Path:
    return Path(os.environ.get("SPUTNIK_KERNEL_CACHE") or Path.home() / ".cache" / "sputnik" / "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(source: Path = SOURCE, out_dir: Path | None = None) -> Path:
    """Compile `source` into a shared library (cached) and return its path; raises RuntimeError with
    the compiler's message when it cannot."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    text = source.read_bytes()
    for header in re.findall(rb'#include "([^"]+)"', text):  # a local header's change rebuilds its includers
        text += (source.parent / header.decode()).read_bytes()
    key = hashlib.sha256(b"\0".join([text, version.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode()]))
    out_dir = cache_dir() if out_dir is None else out_dir
    lib = out_dir / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, str(source), "-o", tmp, "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed on {source.name}: {r.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


_enabled = True


def use_cpu_kernels(enabled: bool) -> None:
    """Process-wide switch (a run's cpu_kernels setting, applied with its thread count): off, every
    caller takes its torch path. Set it before the first decode or update: derived decode weights
    built for the kernel are not rebuilt when it changes."""
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def kernels_off():
    """use_cpu_kernels(False) for the duration of a block (A/B benchmarks, tests of the torch paths)."""
    before = _enabled
    use_cpu_kernels(False)
    try:
        yield
    finally:
        use_cpu_kernels(before)


def cpu_kernels_enabled() -> bool:
    """The process-wide switch (use_cpu_kernels), not whether the kernels could be built."""
    return _enabled


@functools.cache
def _library(source: Path = SOURCE):
    if not sys.platform.startswith("linux"):
        return None
    try:
        try:
            path = build(source)
        except OSError:  # an unwritable cache directory: build into a private temporary one
            path = build(source, out_dir=Path(tempfile.gettempdir()) / f"sputnik-kernels-{os.getuid()}")
        lib = ctypes.CDLL(str(path))
    except (RuntimeError, OSError) as e:
        log.warning("CPU kernel %s unavailable (%s); the torch path is used instead", source.stem, e)
        return None
    for name, (argtypes, restype) in _SIGNATURES.get(source, {}).items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def routed_ffn_available() -> bool:
    return _enabled and _library() is not None


# A constant to torch.compile (traced once, not re-checked): the build check stats files, which dynamo
# cannot trace and would break the graph at every call site. So set use_cpu_kernels before compiling.
@torch.compiler.assume_constant_result
def softmax_rows_available() -> bool:
    return _enabled and _library(SOFTMAX_SOURCE) is not None


@torch.compiler.assume_constant_result
def linear_rows_available() -> bool:
    return _enabled and _library(LINEAR_SOURCE) is not None


def llama_step_library():
    """The loaded llama_step.c library, or None when the kernels are off or it cannot be built."""
    return _library(LLAMA_STEP_SOURCE) if _enabled else None


def deepseek_step_library():
    """The loaded deepseek_step.c library, or None when the kernels are off or it cannot be built."""
    return _library(DEEPSEEK_STEP_SOURCE) if _enabled else None


def _checked_library():
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU MoE kernel is not available on this machine (see the warning above)")
    return lib


@functools.cache
def strip_width() -> int:
    """Columns per packed strip (32 with AVX-512, else 16): what the built kernel was compiled for."""
    return _checked_library().routed_ffn_cols()


def pack_strips(w_EKN: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """[E, K, N] (input-major) -> [E, ceil(N / C), K, C], C = cols or strip_width(): each strip of C
    output columns contiguous, zero past N (the kernels stream one strip at a time)."""
    C = cols or strip_width()
    E, K, N = w_EKN.shape
    S = -(-N // C)
    padded = torch.nn.functional.pad(w_EKN, (0, S * C - N))
    return padded.view(E, K, S, C).permute(0, 2, 1, 3).contiguous()


def pack_experts(experts) -> dict:
    """A MoE's experts (moe.Experts: gate_up [E, 2I, D], down [E, D, I]) in routed_ffn.c's packed
    strips: {"gate_up_packed", "down_packed"} (the decode steps' expert kernels read these)."""
    return {"gate_up_packed": pack_strips(experts.gate_up_proj.transpose(1, 2)),
            "down_packed": pack_strips(experts.down_proj.transpose(1, 2))}


def _routed_ffn_rows(x_ND: torch.Tensor, topk_idx_NK: torch.Tensor, weight_NK: torch.Tensor,
                     gate_up_packed: torch.Tensor, down_packed: torch.Tensor) -> torch.Tensor:
    """Σ_k w_{n,k} FFN_{idx_{n,k}}(x_n) through routed_ffn.c, fp32 CPU tensors; the weights are
    pack_strips(gate_up [E, D, 2I]) and pack_strips(down [E, I, D]) (moe_decode.moe_decode_weights builds them).
    Same values as moe.routed_experts_grouped up to the order of summation. The checks guard the raw
    pointers the C code reads; they are written for speed (this runs per MoE layer per decode step)."""
    fn = _checked_library().routed_ffn
    if not (x_ND.is_cpu and topk_idx_NK.is_cpu and weight_NK.is_cpu and gate_up_packed.is_cpu and down_packed.is_cpu
            and x_ND.dtype == weight_NK.dtype == gate_up_packed.dtype == down_packed.dtype == torch.float32):
        raise ValueError("routed_ffn_rows: fp32 CPU tensors only")
    x_ND, weight_NK = x_ND.contiguous(), weight_NK.contiguous()
    gate_up_packed, down_packed = gate_up_packed.contiguous(), down_packed.contiguous()
    idx_NK = topk_idx_NK.contiguous() if topk_idx_NK.dtype == torch.int64 else topk_idx_NK.long().contiguous()
    (N, D), (E, S2, I, C) = x_ND.shape, down_packed.shape
    K = idx_NK.shape[1]
    if (gate_up_packed.shape != (E, -(-2 * I // C), D, C) or S2 != -(-D // C) or C != strip_width()
            or weight_NK.shape != idx_NK.shape or idx_NK.shape[0] != N):
        raise ValueError(f"routed_ffn_rows: shapes x {tuple(x_ND.shape)}, idx {tuple(idx_NK.shape)}, weight "
                         f"{tuple(weight_NK.shape)}, gate_up {tuple(gate_up_packed.shape)}, down "
                         f"{tuple(down_packed.shape)} (strip width {strip_width()})")
    out_ND = torch.empty_like(x_ND)
    rc = fn(x_ND.data_ptr(), idx_NK.data_ptr(), weight_NK.data_ptr(), gate_up_packed.data_ptr(),
            down_packed.data_ptr(), out_ND.data_ptr(), N, K, E, D, I, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError("routed_ffn_rows: expert index out of range" if rc == -1 else "routed_ffn_rows: out of memory")
    return out_ND


# The same function as an op opaque to torch.compile (one node of a compiled decode step). Defined
# with torch.library.Library rather than custom_op: ~5 us a call from a compiled graph instead of ~14
# (no-op ops, cpp_wrapper, LOG.md stop 20), and this op never needs autograd (decode runs no_grad).
_LIB = torch.library.Library("sputnik", "FRAGMENT")
_LIB.define("routed_ffn_rows(Tensor x, Tensor topk_idx, Tensor weight, Tensor gate_up_packed, "
            "Tensor down_packed) -> Tensor")
_LIB.impl("routed_ffn_rows", _routed_ffn_rows, "CPU")
torch.library.register_fake("sputnik::routed_ffn_rows", lambda x, topk_idx, weight, gate_up_packed, down_packed:
                            torch.empty_like(x), lib=_LIB)
routed_ffn_rows = torch.ops.sputnik.routed_ffn_rows


# ---------------------------------------------------------------------------------------------
# Row-wise softmax statistics (softmax_rows.c), for losses.token_logprobs. Plain functions: they run
# inside an autograd.Function on fp32 CPU tensors, never under torch.compile.
def _softmax_rows_checked(z_NV: torch.Tensor, targets_N: torch.Tensor, *rows: torch.Tensor):
    lib = _library(SOFTMAX_SOURCE)
    if lib is None:
        raise RuntimeError("the CPU softmax kernel is not available on this machine (see the warning above)")
    N = z_NV.shape[0]
    if not (z_NV.is_cpu and z_NV.dtype == torch.float32 and z_NV.dim() == 2 and z_NV.is_contiguous()
            and targets_N.dtype == torch.int64 and targets_N.is_contiguous() and targets_N.shape == (N,)
            and all(r.dtype == torch.float32 and r.is_contiguous() and r.shape == (N,) for r in rows)):
        raise ValueError("softmax_rows: contiguous fp32 CPU logits [N, V], int64 targets [N], fp32 rows [N]")
    return lib


def softmax_rows_forward(z_NV: torch.Tensor, targets_N: torch.Tensor):
    """-> (logp_N, lse_N, entropy_N) of softmax(z) per row: log p of the target, log Σ exp z, and
    −Σ p log p. Targets must lie in [0, V) (a masked row carries any valid index)."""
    lib = _softmax_rows_checked(z_NV, targets_N)
    N, V = z_NV.shape
    logp_N, lse_N, ent_N = (torch.empty(N, dtype=torch.float32) for _ in range(3))
    if lib.softmax_rows_forward(z_NV.data_ptr(), targets_N.data_ptr(), N, V, logp_N.data_ptr(), lse_N.data_ptr(),
                                ent_N.data_ptr(), torch.get_num_threads()) != 0:
        raise ValueError(f"softmax_rows: a target is outside [0, {V})")
    return logp_N, lse_N, ent_N


def softmax_rows_backward(z_NV: torch.Tensor, sub_N: torch.Tensor, targets_N: torch.Tensor, entropy_N: torch.Tensor,
                          grad_logp_N: torch.Tensor, grad_entropy_N: torch.Tensor | None,
                          out_NV: torch.Tensor | None = None) -> torch.Tensor:
    """∂(Σ gl·logp + Σ ge·H)/∂z from the logits z (log p = z − sub per row), i.e.
    g = −p (gl + ge (log p + H)) + onehot(t) gl, into `out_NV` (a new tensor by default; z itself
    for in place); returns it."""
    rows = (sub_N, entropy_N, grad_logp_N) + ((grad_entropy_N,) if grad_entropy_N is not None else ())
    lib = _softmax_rows_checked(z_NV, targets_N, *rows)
    N, V = z_NV.shape
    out_NV = torch.empty_like(z_NV) if out_NV is None else out_NV
    if out_NV.shape != z_NV.shape or out_NV.dtype != torch.float32 or not out_NV.is_contiguous() or not out_NV.is_cpu:
        raise ValueError("softmax_rows: out must be a contiguous fp32 CPU tensor shaped like the logits")
    if lib.softmax_rows_backward(z_NV.data_ptr(), out_NV.data_ptr(), sub_N.data_ptr(), targets_N.data_ptr(), entropy_N.data_ptr(),
                                 grad_logp_N.data_ptr(), grad_entropy_N.data_ptr() if grad_entropy_N is not None else None,
                                 N, V, torch.get_num_threads()) != 0:
        raise ValueError(f"softmax_rows: a target is outside [0, {V})")
    return out_NV


def sample_rows(logits_BV: torch.Tensor, u_B1: torch.Tensor | None, temperature: float):
    """sampling.sample_plain through softmax_rows.c: (tokens_B, logprobs_B), or None when a row's
    logits have no finite mass (NaN, all -inf), which the caller's torch path then handles."""
    lib = _library(SOFTMAX_SOURCE)
    B, V = logits_BV.shape
    if lib is None or not (logits_BV.is_cpu and logits_BV.dtype == torch.float32):
        raise ValueError("sample_rows: fp32 CPU logits [B, V] and the built kernel")
    z_BV = logits_BV.contiguous()
    u_B = torch.zeros(B) if u_B1 is None else u_B1.reshape(B).float().contiguous()
    tok_B, logp_B = torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.float32)
    if lib.sample_rows(z_BV.data_ptr(), u_B.data_ptr(), B, V, float(temperature), tok_B.data_ptr(), logp_B.data_ptr(),
                       torch.get_num_threads()) != 0:
        return None
    return tok_B, logp_B


# ---------------------------------------------------------------------------------------------
# Few-row linear layers (linear_rows.c), for decode steps and short prefills: model/layers.linear calls it.
LINEAR_MAX_ROWS = 64


def _linear_library():
    lib = _library(LINEAR_SOURCE)
    if lib is None:
        raise RuntimeError("the CPU linear kernel is not available on this machine (see the warning above)")
    return lib


def _linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., I] (at most LINEAR_MAX_ROWS rows) times weight [O, I]ᵀ plus bias [O]: F.linear's values
    up to rounding, fp32 CPU tensors."""
    lib = _linear_library()
    O, I = weight.shape
    x2 = x.reshape(-1, I).contiguous()
    N = x2.shape[0]
    if not (x2.is_cpu and weight.is_cpu and x2.dtype == weight.dtype == torch.float32 and x.shape[-1] == I
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == (O,) and bias.is_cpu))):
        raise ValueError(f"linear_rows: fp32 CPU x [..., {I}], weight [{O}, {I}], bias [{O}]")
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(N, O, dtype=torch.float32)
    if lib.linear_rows(x2.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                       N, O, I, torch.get_num_threads()) != 0:
        raise ValueError(f"linear_rows: {N} rows (1 to {LINEAR_MAX_ROWS})")
    return y.view(*x.shape[:-1], O)


_LIB.define("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIB.impl("linear_rows", _linear_rows, "CPU")
torch.library.register_fake("sputnik::linear_rows", lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]),
                            lib=_LIB)
linear_rows = torch.ops.sputnik.linear_rows


# ---------------------------------------------------------------------------------------------
# Packed linear (linear_rows.c's linear_packed): llama_step.c's register-blocked product for one layer.
# Our DeepSeek-V3's decode LM head goes through it: [N, 256] x [256, 4096] ran 1.4-2.8x MKL's GEMM at
# 1-128 rows and no slower at 1,024 (2 threads, AMD EPYC; LOG.md stop 32).


def pack_linear(w_OI: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """A linear layer's weight [O, I] -> [ceil(O / C), I, C] strips (zero past O), C = cols or the
    packed kernels' column count."""
    C = cols or _packed_cols()
    return pack_strips(w_OI.detach().float().t()[None], cols=C)[0]


@functools.cache
def _packed_cols() -> int:
    """Columns per strip of linear_packed (what the built kernel was compiled for)."""
    return _linear_library().linear_packed_cols()


def _linear_packed(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [..., I] times the weight that pack_linear packed ([O, I], O = out_features), transposed:
    F.linear's values up to rounding, fp32 CPU tensors."""
    lib = _linear_library()
    S, I, C = packed.shape
    if not (x.is_cpu and packed.is_cpu and x.dtype == packed.dtype == torch.float32 and x.shape[-1] == I
            and packed.is_contiguous() and C == _packed_cols() and (S - 1) * C < out_features <= S * C):
        raise ValueError(f"linear_packed: fp32 CPU x [..., {I}] and a weight packed by pack_linear, "
                         f"{out_features} outputs in {S} strips of {C}")
    x2 = x.reshape(-1, I).contiguous()
    N = x2.shape[0]
    y = torch.empty(N, out_features, dtype=torch.float32)
    if N:
        scratch = torch.empty(N, I)  # x regrouped for the product (held here: the C call writes it)
        lib.linear_packed(x2.data_ptr(), packed.data_ptr(), None, y.data_ptr(), scratch.data_ptr(),
                          N, out_features, I, torch.get_num_threads())
    return y.view(*x.shape[:-1], out_features)


_LIB.define("linear_packed(Tensor x, Tensor packed, int out_features) -> Tensor")
_LIB.impl("linear_packed", _linear_packed, "CPU")
torch.library.register_fake("sputnik::linear_packed",
                            lambda x, packed, out_features: x.new_empty(*x.shape[:-1], out_features), lib=_LIB)
linear_packed = torch.ops.sputnik.linear_packed
