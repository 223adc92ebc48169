"""The hand-written CPU kernels (sputnik/kernels/routed_ffn.c and softmax_rows.c via kernels/cpu.py): values
against the torch paths, edge shapes, thread-count independence, bad input, the build's failure path and
cache directory, and the process-wide switch (use_cpu_kernels, a run's cpu_kernels field)."""
import logging

import pytest
import torch

from sputnik.kernels import cpu as cpu_kernels
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
    monkeypatch.setattr(cpu_kernels, "_enabled", True)  # switched on: unavailable only for want of a compiler
    monkeypatch.setattr(cpu_kernels, "_library", cpu_kernels._library.__wrapped__)
    monkeypatch.setenv("SPUTNIK_KERNEL_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="sputnik.kernels.cpu"):
        assert cpu_kernels._library() is None
        assert not cpu_kernels.routed_ffn_available() and not cpu_kernels.softmax_rows_available()
    assert "no C compiler" in caplog.text
    assert not list((tmp_path / "cache").glob("*.so*"))
    _assert_decode_moe_takes_the_torch_path()


def _assert_decode_moe_takes_the_torch_path():
    """A fresh model's few-token MoE builds no packed kernel weights and equals the training path."""
    from sputnik.inference.moe_decode import moe_decode_weights, moe_few_tokens
    from test_engine import _v3

    moe = next(m for m in _v3().modules() if isinstance(m, moe_lib.MoE))
    w = moe_decode_weights(moe)
    assert "gate_up_packed" not in w and "gate_up_ED2I" in w
    with torch.no_grad():
        x_ND = torch.randn(2, moe.gate.weight.shape[1])
        torch.testing.assert_close(moe_few_tokens(moe, x_ND), moe(x_ND[None])[0][0], atol=1e-5, rtol=1e-5)


def test_use_cpu_kernels_switches_both_kernels_off(monkeypatch):
    """use_cpu_kernels(False) (what a run's cpu_kernels=false applies, session.process / serve) turns
    both kernels off for the process, even where they build: the decode MoE and the log-prob head take
    their torch paths, with the same values; use_cpu_kernels(True) turns them back on."""
    from sputnik.config import DeviceConfig
    from sputnik.train import losses
    from sputnik.train.session import process

    monkeypatch.setattr(cpu_kernels, "_enabled", True)  # restored after the test: the switch is process-wide
    builds = cpu_kernels._library() is not None
    assert cpu_kernels.routed_ffn_available() == builds
    cpu_kernels.use_cpu_kernels(False)
    assert not cpu_kernels.routed_ffn_available() and not cpu_kernels.softmax_rows_available()
    assert not losses._softmax_kernel(torch.zeros(2, 4), torch.float32)
    _assert_decode_moe_takes_the_torch_path()
    cpu_kernels.use_cpu_kernels(True)
    assert cpu_kernels.routed_ffn_available() == builds
    assert losses._softmax_kernel(torch.zeros(2, 4), torch.float32) == (cpu_kernels._library(cpu_kernels.SOFTMAX_SOURCE) is not None)
    threads = torch.get_num_threads()
    with process(DeviceConfig(device="cpu", num_threads=1, cpu_kernels=False)):
        assert not cpu_kernels.routed_ffn_available() and not cpu_kernels.softmax_rows_available()
    assert torch.get_num_threads() == threads


def test_unwritable_cache_falls_back_to_a_temporary_directory(tmp_path, monkeypatch):
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("SPUTNIK_KERNEL_CACHE", str(blocked / "kernels"))  # mkdir fails: a file is in the way
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert cpu_kernels._library.__wrapped__() is not None
    assert list((tmp_path / "tmp").glob("sputnik-kernels-*/routed_ffn-*.so"))


# ---------------------------------------------------------------------------------------------
# softmax_rows.c: the row statistics and gradient of losses.token_logprobs
needs_softmax_kernel = pytest.mark.skipif(not cpu_kernels.softmax_rows_available(), reason="no C compiler for the CPU kernel")


def _softmax_reference(z_NV, t_N):
    """log p of the target, log Σ exp z and −Σ p log p from ATen, in fp64."""
    logp_NV = torch.log_softmax(z_NV.double(), -1)
    return (logp_NV.gather(1, t_N[:, None]).squeeze(1), torch.logsumexp(z_NV.double(), -1),
            -(logp_NV.exp() * logp_NV).sum(-1))


@needs_softmax_kernel
@pytest.mark.parametrize("V", [1, 7, 16, 1000, 4099])
def test_softmax_rows_forward_matches_log_softmax(V):
    g = torch.Generator().manual_seed(V)
    z_NV = torch.randn(37, V, generator=g) * 4
    z_NV[0] = 30.0  # a flat row: H = log V
    t_N = torch.randint(0, V, (37,), generator=g)
    for got, ref in zip(cpu_kernels.softmax_rows_forward(z_NV, t_N), _softmax_reference(z_NV, t_N)):
        torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=2e-6)
    assert cpu_kernels.softmax_rows_forward(z_NV, t_N)[2][0].item() == pytest.approx(torch.log(torch.tensor(V * 1.0)).item(), abs=1e-5)


@needs_softmax_kernel
@pytest.mark.parametrize("with_entropy", [True, False])
def test_softmax_rows_backward_is_the_gradient_of_logp_and_entropy(with_entropy):
    g = torch.Generator().manual_seed(1)
    z_NV = (torch.randn(23, 301, generator=g) * 3).requires_grad_()
    t_N = torch.randint(0, 301, (23,), generator=g)
    gl_N, ge_N = torch.randn(23, generator=g), torch.randn(23, generator=g)
    logp_NV = torch.log_softmax(z_NV.double(), -1)
    objective = (gl_N.double() * logp_NV.gather(1, t_N[:, None]).squeeze(1)).sum()
    if with_entropy:
        objective = objective + (ge_N.double() * -(logp_NV.exp() * logp_NV).sum(-1)).sum()
    ref_NV, = torch.autograd.grad(objective, z_NV)
    z = z_NV.detach()
    logp_N, lse_N, ent_N = cpu_kernels.softmax_rows_forward(z, t_N)
    ge = ge_N if with_entropy else None
    got_NV = cpu_kernels.softmax_rows_backward(z, lse_N, t_N, ent_N, gl_N, ge)
    torch.testing.assert_close(got_NV, ref_NV.float(), atol=2e-6, rtol=1e-5)
    # from log-probs (sub = 0) and in place: the same numbers
    logp_z = torch.log_softmax(z, -1)
    in_place = cpu_kernels.softmax_rows_backward(logp_z, torch.zeros(23), t_N, ent_N, gl_N, ge, out_NV=logp_z)
    assert in_place.data_ptr() == logp_z.data_ptr()
    torch.testing.assert_close(in_place, ref_NV.float(), atol=2e-6, rtol=1e-5)


@needs_softmax_kernel
def test_softmax_rows_infinite_logits_bad_targets_and_threads():
    z_NV = torch.full((3, 50), float("-inf"))
    z_NV[:, 4] = 2.0
    z_NV[1, 9] = 2.0
    t_N = torch.tensor([4, 9, 4])
    logp_N, lse_N, ent_N = cpu_kernels.softmax_rows_forward(z_NV, t_N)
    assert torch.isfinite(logp_N).all() and torch.isfinite(ent_N).all()  # masked logits: no mass, no NaN
    torch.testing.assert_close(logp_N, torch.tensor([0.0, -0.6931472, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_N, torch.tensor([0.0, 0.6931472, 0.0]), atol=1e-5, rtol=0)
    grad = cpu_kernels.softmax_rows_backward(z_NV, lse_N, t_N, ent_N, torch.ones(3), torch.ones(3))
    assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="outside"):
        cpu_kernels.softmax_rows_forward(z_NV, torch.tensor([4, 50, 0]))
    with pytest.raises(ValueError, match="outside"):
        cpu_kernels.softmax_rows_backward(z_NV, lse_N, torch.tensor([4, -1, 0]), ent_N, torch.ones(3), None)
    with pytest.raises(ValueError, match="fp32"):
        cpu_kernels.softmax_rows_forward(z_NV.double(), t_N)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_kernels.softmax_rows_forward(z_NV.T.contiguous().T, t_N)
    # every row is summed by one thread in a fixed order: the same bits at any thread count
    z = torch.randn(64, 777, generator=torch.Generator().manual_seed(3))
    t = torch.randint(0, 777, (64,))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.softmax_rows_forward(z, t)
        torch.set_num_threads(max(2, threads))
        many = cpu_kernels.softmax_rows_forward(z, t)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


# ---------------------------------------------------------------------------------------------
# linear_rows.c: the decode step's linear layers
needs_linear = pytest.mark.skipif(not cpu_kernels.linear_rows_available(), reason="no C compiler for the CPU kernel")


@needs_linear
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 33, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_rows_equals_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 77, generator=g)  # odd width: the vector loop's tail
    w, b = torch.randn(130, 77, generator=g), torch.randn(130, generator=g) if bias else None  # 130 = 4·32 + 2
    y = cpu_kernels.linear_rows(x, w, b)
    assert y.shape == (rows, 1, 130)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.set_num_threads(1)
    try:
        assert torch.equal(cpu_kernels.linear_rows(x, w, b), y)  # one thread sums each output alike
    finally:
        torch.set_num_threads(2)


@needs_linear
def test_linear_rows_rejects_bad_input():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match="65 rows"):
        cpu_kernels.linear_rows(torch.randn(65, 6), w, None)
    with pytest.raises(ValueError, match="fp32 CPU"):
        cpu_kernels.linear_rows(torch.randn(2, 6, dtype=torch.float64), w.double(), None)
    with pytest.raises(ValueError, match="bias"):
        cpu_kernels.linear_rows(torch.randn(2, 6), w, torch.randn(5))


@needs_linear
def test_layers_linear_takes_the_kernel_only_for_decode_sized_no_grad_calls(monkeypatch):
    from sputnik.model import layers

    calls = []
    monkeypatch.setattr(layers, "linear_rows", lambda x, w, b: calls.append(x.shape) or torch.nn.functional.linear(x, w, b))
    lin = layers.Linear(6, 4)
    with torch.no_grad():
        lin(torch.randn(2, 1, 6))  # decode step: 2 rows
        lin(torch.randn(5, 13, 6))  # 65 rows: a longer prefill, ATen's GEMM
    lin(torch.randn(1, 6))  # autograd on: training keeps F.linear (and its backward)
    assert calls == [(2, 1, 6)]
    cpu_kernels.use_cpu_kernels(False)
    try:
        with torch.no_grad():
            lin(torch.randn(1, 6))
    finally:
        cpu_kernels.use_cpu_kernels(True)
    assert calls == [(2, 1, 6)]


@needs_linear
@pytest.mark.parametrize("rows", [1, 5, 13, 64, 300])
def test_linear_packed_equals_f_linear(rows):
    """Every row-block size (12, 8, 4, 2, 1 with AVX-512) and a last strip narrower than the rest."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 77, generator=g)
    w = torch.randn(130, 77, generator=g)  # 130 = 4·32 + 2
    packed = cpu_kernels.pack_linear(w)
    y = cpu_kernels.linear_packed(x, packed, 130)
    assert y.shape == (rows, 1, 130)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    assert cpu_kernels.linear_packed(x[:0], packed, 130).shape == (0, 1, 130)


@needs_linear
def test_linear_packed_rejects_bad_input():
    packed = cpu_kernels.pack_linear(torch.randn(40, 6))
    with pytest.raises(ValueError, match="40 outputs"):
        cpu_kernels.linear_packed(torch.randn(2, 7), packed, 40)  # another input width
    with pytest.raises(ValueError, match="70 outputs"):
        cpu_kernels.linear_packed(torch.randn(2, 6), packed, 70)  # more outputs than the strips hold
    with pytest.raises(ValueError, match="fp32 CPU"):
        cpu_kernels.linear_packed(torch.randn(2, 6, dtype=torch.float64), packed, 40)


@needs_linear
def test_the_deepseek_decode_head_is_packed_on_a_cpu_and_equals_the_model():
    """The decode LM head of our DeepSeek-V3 runs through linear_packed in fp32 on a CPU (and a
    [D, V] copy with the kernels off), with the model's own logits either way."""
    from sputnik.inference.deepseek import DeepSeekCachedModel
    from sputnik.model import Transformer
    from sputnik.model.config import ModelConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                    moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                                    num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                    qk_rope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=0)).eval()
    ids = torch.randint(0, 100, (3, 9))
    with torch.no_grad():
        ref = model(ids).logits
    for enabled, dims in ((True, 3), (False, 2)):
        cpu_kernels.use_cpu_kernels(enabled)
        try:
            cm = DeepSeekCachedModel(model)
            assert cm.lm_head().dim() == dims
            logits = cm.forward_cached(ids, cm.new_cache(3, 16), torch.zeros(3, dtype=torch.long))
        finally:
            cpu_kernels.use_cpu_kernels(True)
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# sample_rows (softmax_rows.c): the engine's plain sampling on a CPU
needs_softmax = pytest.mark.skipif(not cpu_kernels.softmax_rows_available(), reason="no C compiler for the CPU kernel")


@needs_softmax
@pytest.mark.parametrize("V", [7, 300, 20000])
def test_sample_rows_is_the_inverse_cdf_draw(V):
    """The token whose fp64 CDF interval holds u·total (what sampling.pick_from_probs computes in fp32),
    its log-prob under softmax(z / T); -inf logits are never drawn; greedy is the first argmax."""
    g = torch.Generator().manual_seed(V)
    z = torch.randn(16, V, generator=g) * 3
    z[:, :2] = float("-inf")  # masked vocabulary (sampling.mask_vocab)
    z[3, 5] = z[3].max() + 2  # a peaked row
    for T in (0.7, 1.0):
        u = torch.rand(16, 1, generator=g)
        p = torch.softmax(z.double() / T, -1)
        cdf = p.cumsum(-1)
        want = torch.searchsorted(cdf, u.double() * cdf[:, -1:], right=True)[:, 0]
        tok, logp = cpu_kernels.sample_rows(z, u, T)
        assert torch.equal(tok, want) and (tok >= 2).all()
        torch.testing.assert_close(logp, torch.log_softmax(z / T, -1).gather(1, tok[:, None])[:, 0], atol=2e-5, rtol=0)
    z[7, V - 1] = z[7].max()  # a tie: the first index wins, as torch.argmax
    tok, logp = cpu_kernels.sample_rows(z, None, 0.0)
    assert torch.equal(tok, z.argmax(-1))
    torch.testing.assert_close(logp, torch.log_softmax(z, -1).gather(1, tok[:, None])[:, 0], atol=2e-5, rtol=0)


@needs_softmax
def test_sample_rows_leaves_rows_without_mass_to_the_torch_path():
    z = torch.randn(3, 50)
    z[1] = float("-inf")
    assert cpu_kernels.sample_rows(z, torch.rand(3, 1), 1.0) is None
    z[1] = float("nan")
    assert cpu_kernels.sample_rows(z, torch.rand(3, 1), 1.0) is None
    from sputnik.inference.sampling import SamplingParams, sample_next

    tok, _ = sample_next(z, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))  # no error: torch's draw
    assert tok.shape == (3,)
