"""The hand-written CPU MoE kernel (sputnik/model/routed_ffn.c via cpu_kernels.py): values against
the grouped training path, edge shapes, thread-count independence, bad input, and the build's
failure path."""
import logging

import pytest
import torch

from sputnik.model import cpu_kernels
from sputnik.model import moe as moe_lib

needs_kernel = pytest.mark.skipif(not cpu_kernels.routed_ffn_available(), reason="no C compiler for the CPU kernel")


def _experts(E=6, D=40, I=24, seed=0):
    """Widths that are not multiples of the strip width (40 and 48 columns): the zero-padded tails."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, D, generator=g) * 0.2, torch.randn(E, D, I, generator=g) * 0.2  # parameter layouts


def _reference(x_ND, idx_NK, weight_NK, gate_up_E2ID, down_EDI):
    counts_E = torch.bincount(idx_NK.flatten(), minlength=gate_up_E2ID.shape[0])
    return moe_lib.routed_experts_grouped(x_ND, idx_NK, weight_NK, gate_up_E2ID, down_EDI, counts_E)


def _kernel(x_ND, idx_NK, weight_NK, gate_up_E2ID, down_EDI):
    return cpu_kernels._routed_ffn_rows(x_ND, idx_NK, weight_NK, cpu_kernels.pack_strips(gate_up_E2ID.transpose(1, 2)),
                                        cpu_kernels.pack_strips(down_EDI.transpose(1, 2)))


@needs_kernel
@pytest.mark.parametrize("n,K,routing", [(1, 2, "random"), (3, 2, "random"), (5, 1, "random"), (64, 2, "random"),
                                         (7, 3, "random"), (40, 2, "skewed")])
def test_kernel_equals_the_grouped_path(n, K, routing):
    """Σ_k w FFN_e(x) == the training path's grouped sum: 1-3 rows per expert (the unrolled partial
    register blocks), many (full blocks), and one expert taking 40 rows (several 16-row tiles)."""
    gate_up, down = _experts()
    E = gate_up.shape[0]
    x_ND = torch.randn(n, gate_up.shape[2])
    idx_NK = (torch.stack([torch.randperm(E)[:K] for _ in range(n)]) if routing == "random"
              else torch.tensor([[0, 1][:K]] * n))
    weight_NK = torch.rand(n, K)
    got = _kernel(x_ND, idx_NK, weight_NK, gate_up, down)
    torch.testing.assert_close(got, _reference(x_ND, idx_NK, weight_NK, gate_up, down), atol=1e-5, rtol=1e-5)
    assert got.abs().max() > 0.1  # not trivially zero


@needs_kernel
def test_kernel_does_not_depend_on_the_thread_count():
    """One thread owns each output and sums in a fixed order: 1 and 2 threads agree bitwise."""
    gate_up, down = _experts(E=16, D=64, I=32)
    x_ND, weight_NK = torch.randn(32, 64), torch.rand(32, 2)
    idx_NK = torch.stack([torch.randperm(16)[:2] for _ in range(32)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel(x_ND, idx_NK, weight_NK, gate_up, down)
        torch.set_num_threads(2)
        two = _kernel(x_ND, idx_NK, weight_NK, gate_up, down)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_kernel_rejects_bad_input():
    gate_up, down = _experts()
    gu, dn = cpu_kernels.pack_strips(gate_up.transpose(1, 2)), cpu_kernels.pack_strips(down.transpose(1, 2))
    x_ND, w_NK = torch.randn(2, 40), torch.rand(2, 2)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels._routed_ffn_rows(x_ND, torch.tensor([[0, 6], [1, 2]]), w_NK, gu, dn)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels._routed_ffn_rows(x_ND, torch.tensor([[0, -1], [1, 2]]), w_NK, gu, dn)
    with pytest.raises(ValueError, match="fp32"):
        cpu_kernels._routed_ffn_rows(x_ND.double(), torch.tensor([[0, 1], [1, 2]]), w_NK, gu, dn)
    with pytest.raises(ValueError, match="shapes"):
        cpu_kernels._routed_ffn_rows(torch.randn(2, 32), torch.tensor([[0, 1], [1, 2]]), w_NK, gu, dn)


@needs_kernel
def test_compiled_graph_calls_the_kernel_as_one_op():
    """Inside torch.compile the kernel is an opaque custom op (fake shapes, no graph break)."""
    gate_up, down = _experts()
    gu, dn = cpu_kernels.pack_strips(gate_up.transpose(1, 2)), cpu_kernels.pack_strips(down.transpose(1, 2))
    x_ND, w_NK, idx_NK = torch.randn(4, 40), torch.rand(4, 2), torch.tensor([[0, 1], [2, 3], [0, 5], [4, 1]])
    fn = torch.compile(lambda *a: cpu_kernels.routed_ffn_rows(*a) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x_ND, idx_NK, w_NK, gu, dn), 2 * _reference(x_ND, idx_NK, w_NK, gate_up, down),
                               atol=1e-5, rtol=1e-5)


def test_failed_build_is_a_clear_error_and_a_logged_fallback(tmp_path, monkeypatch, caplog):
    """A source the compiler rejects raises with the compiler's message and leaves no library behind;
    with no compiler at all the kernel is unavailable (a warning) and the decode MoE keeps its torch
    path with the same values."""
    bad = tmp_path / "bad.c"
    bad.write_text("int f(void) { return undeclared_name; }\n")
    if cpu_kernels._compiler() is not None:
        with pytest.raises(RuntimeError, match="undeclared_name"):
            cpu_kernels.build(bad, tmp_path / "out")
        assert not list((tmp_path / "out").glob("*.so*"))
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run
    monkeypatch.delenv("SPUTNIK_NO_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu_kernels, "_library", cpu_kernels._library.__wrapped__)
    monkeypatch.setenv("SPUTNIK_KERNEL_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="sputnik.model.cpu_kernels"):
        assert cpu_kernels._library() is None
    assert "no C compiler" in caplog.text


def test_unwritable_cache_falls_back_to_a_temporary_directory(tmp_path, monkeypatch):
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("SPUTNIK_KERNEL_CACHE", str(blocked / "kernels"))  # mkdir fails: a file is in the way
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.delenv("SPUTNIK_NO_CPU_KERNELS", raising=False)
    assert cpu_kernels._library.__wrapped__() is not None
    assert list((tmp_path / "tmp").glob("sputnik-kernels-*/routed_ffn-*.so"))
