"""sputnik.train.losses: chunked LM head losses, MTP loss, KD divergences vs plain re-computations."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from sputnik.train import losses as _losses
from sputnik.train.losses import (
    chunked_kd_loss, forward_kl, forward_kl_per_token, generalized_jsd, generalized_jsd_per_token,
    linear_cross_entropy, mtp_loss, mtp_targets, reverse_kl, reverse_kl_per_token, token_logprobs,
)


def _head(n=10, v=13, d=5, dtype=torch.float32):
    h = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, dtype=dtype, requires_grad=True)
    return h, w


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.fixture(params=["kernel", "aten"])
def softmax_path(request, monkeypatch):
    """Both implementations of the fp32 CPU row statistics: softmax_rows.c and the ATen passes."""
    if request.param == "kernel" and not _losses._kernels().softmax_rows_available():
        pytest.skip("no C compiler for the CPU kernel")
    monkeypatch.setattr(_losses, "_softmax_kernel", lambda h, dtype: request.param == "kernel" and dtype == torch.float32)
    return request.param


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy
def test_linear_cross_entropy_hand_value(softmax_path):
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    w = torch.eye(2)
    loss, count = linear_cross_entropy(h, w, torch.tensor([0, -100]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)  # logits [1, 0], target 0
    assert count.item() == 1


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 64])
def test_linear_cross_entropy_matches_full_logits(chunk_size, softmax_path):
    h, w = _head()
    t = torch.randint(0, 13, (10,))
    t[[0, 4, 5]] = -100
    loss, count = linear_cross_entropy(h, w, t, chunk_size=chunk_size)
    ref = F.cross_entropy(h @ w.T, t, reduction="sum", ignore_index=-100)
    assert count.item() == 7 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # a non-trivial upstream gradient (mean with a scale), grads w.r.t. both h and W
    for a, b in zip(_grads(3.0 * loss / count, h, w), _grads(3.0 * ref / count, h, w)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_linear_cross_entropy_all_ignored_rows_give_zero(softmax_path):
    h, w = _head(n=7)
    t = torch.full((7,), -100)
    loss, count = linear_cross_entropy(h, w, t, chunk_size=3)
    assert loss.item() == 0.0 and count.item() == 0
    gh, gw = _grads(loss, h, w)
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    # a chunk that is wholly ignored inside an otherwise valid batch
    t[:3] = torch.tensor([1, 2, 3])
    loss, _ = linear_cross_entropy(h, w, t, chunk_size=3)
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(_grads(loss, h, w)[1], _grads(ref, h, w)[1])


def test_linear_cross_entropy_frozen_head_and_gradcheck():
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 1, 2])
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, t, chunk_size=2)[0], (h, w))
    loss, _ = linear_cross_entropy(h, w.detach(), t)  # W frozen: only h gets a gradient
    (gh,) = _grads(loss, h)
    torch.testing.assert_close(gh, _grads(F.cross_entropy(h @ w.detach().T, t, reduction="sum"), h)[0])


def test_linear_cross_entropy_bf16_inputs_accumulate_in_fp32():
    h32, w32 = _head(n=16, v=50, d=8)
    t = torch.randint(0, 50, (16,))
    h, w = h32.detach().bfloat16().requires_grad_(), w32.detach().bfloat16().requires_grad_()
    loss, _ = linear_cross_entropy(h, w, t, chunk_size=5)
    ref = F.cross_entropy(h.float() @ w.float().T, t, reduction="sum")  # same bf16 values, fp32 math
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0.0)
    gh, gw = _grads(loss, h, w)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    rh, rw = _grads(ref, h, w)
    torch.testing.assert_close(gh.float(), rh.float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=5e-2, atol=5e-2)


def test_linear_cross_entropy_under_autocast_uses_autocast_dtype():
    h, w = _head(n=6, v=9, d=4)
    t = torch.randint(0, 9, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, t, chunk_size=4)
    ref = F.cross_entropy(h.bfloat16().float() @ w.bfloat16().float().T, t, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0.0)  # bf16 matmul, fp32 logsumexp
    gh, gw = _grads(loss, h, w)  # backward outside autocast recomputes in bf16, returns fp32 grads
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(gw, _grads(ref, h, w)[1], rtol=5e-2, atol=5e-2)


def test_head_losses_reject_bad_arguments():
    h, w = _head()
    with pytest.raises(ValueError, match="chunk_size=0"):
        linear_cross_entropy(h, w, torch.zeros(10, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature=0"):
        token_logprobs(h, w, torch.zeros(10, dtype=torch.long), temperature=0)


# ---------------------------------------------------------------------------------------------
# token_logprobs
@pytest.mark.parametrize("chunk_size,temperature", [(1, 1.0), (3, 0.7), (64, 2.0)])
def test_token_logprobs_match_log_softmax_and_entropy(chunk_size, temperature, softmax_path):
    h, w = _head()
    t = torch.randint(0, 13, (10,))
    t[2] = -100
    logp, ent = token_logprobs(h, w, t, temperature=temperature, chunk_size=chunk_size)
    logp_all = F.log_softmax(h @ w.T / temperature, dim=-1)
    ref_logp = torch.where(t >= 0, logp_all.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    assert logp[2].item() == 0.0
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    # gradients of an arbitrary combination of both outputs
    a, b = torch.randn(10), torch.randn(10)
    ours = _grads((a * logp).sum() + (b * ent).sum(), h, w)
    refs = _grads((a * ref_logp).sum() + (b * ref_ent).sum(), h, w)
    for x, y in zip(ours, refs):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # only one output used (the other's grad arrives as zeros)
    logp, _ = token_logprobs(h, w, t, temperature=temperature, chunk_size=chunk_size)
    ref_logp = F.log_softmax(h @ w.T / temperature, dim=-1).gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    ref_logp = torch.where(t >= 0, ref_logp, 0.0)
    torch.testing.assert_close(_grads(logp.sum(), h)[0], _grads(ref_logp.sum(), h)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [2, 8])  # 8 >= N: forward's log-probs kept for backward
def test_token_logprobs_gradcheck(chunk_size):
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 1, 2])
    fn = lambda h, w: token_logprobs(h, w, t, temperature=0.8, chunk_size=chunk_size)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w))
    # only the log-probs used (the entropy's gradient arrives as None), as in the GRPO update
    assert torch.autograd.gradcheck(lambda h, w: fn(h, w)[0], (h, w))


@pytest.mark.parametrize("chunk_size", [4, 64])
def test_token_logprobs_under_bf16_autocast_match_bf16_logits(chunk_size):
    """Under autocast the head matmul runs in bf16 but the softmax statistics stay fp32: the
    gradients equal autograd through fp32 log_softmax of the same bf16 logits (an lse rounded to
    bf16 in backward would be off by ~1%)."""
    torch.manual_seed(0)
    h, w = torch.randn(10, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    t, a = torch.randint(0, 40, (10,)), torch.randn(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = token_logprobs(h, w, t, temperature=0.7, chunk_size=chunk_size)
    logits = ((h / 0.7).bfloat16() @ w.bfloat16().T).float()
    ref = F.log_softmax(logits, -1).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    for x, y in zip(_grads((a * logp).sum(), h, w), _grads((a * ref).sum(), h, w)):
        torch.testing.assert_close(x, y, atol=2e-2, rtol=2e-2)  # bf16 gradient matmuls on our side


def test_token_logprobs_backward_twice_with_kept_logprobs(softmax_path):
    """retain_graph: the kept [N, V] log-probs (logits on the kernel path, which writes the gradient
    over them) must not be read as such by a second backward."""
    h, w = _head()
    t = torch.randint(0, 13, (10,))
    logp, ent = token_logprobs(h, w, t, chunk_size=64)
    loss = logp.sum() + ent.sum()
    g1 = torch.autograd.grad(loss, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(loss, (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# MTP
def test_mtp_targets_shift_and_mask_sequence_ends():
    t = torch.tensor([[1, 2, 3, 4], [5, -100, 7, 8]])
    assert mtp_targets(t, 1).tolist() == [[2, 3, 4, -100], [-100, 7, 8, -100]]
    assert mtp_targets(t, 2).tolist() == [[3, 4, -100, -100], [7, 8, -100, -100]]
    assert mtp_targets(t, 9).tolist() == [[-100] * 4] * 2


def test_mtp_loss_hand_value_divides_by_main_tokens():
    depth_ce = [(torch.tensor(6.0), torch.tensor(3)), (torch.tensor(4.0), torch.tensor(2))]
    # (λ/D) Σ_k sum_k / T = 0.3/2 * (6 + 4) / 4, not 0.3/2 * (6/3 + 4/2)
    assert mtp_loss(depth_ce, torch.tensor(4), 0.3).item() == pytest.approx(0.375)
    assert mtp_loss(depth_ce, 0, 1.0).item() == pytest.approx(5.0)  # empty batch: divisor clamped to 1


def test_mtp_loss_matches_paper_formula_and_ignores_sequence_ends():
    b, t_len, v, d, depth = 2, 5, 11, 4, 2
    w = torch.randn(v, d, requires_grad=True)
    hs = [torch.randn(b, t_len, d, requires_grad=True) for _ in range(depth)]
    targets = torch.randint(0, v, (b, t_len))
    pairs = [linear_cross_entropy(hs[k].reshape(-1, d), w, mtp_targets(targets, k + 1).reshape(-1), chunk_size=3)
             for k in range(depth)]
    loss = mtp_loss(pairs, targets.numel(), 0.3)
    # V3 eq. 24 per sequence: L^k = -(1/T) Σ_{i<T-k} log P^k_i[t_{i+k}], then batch mean; eq. 25
    ref = 0.0
    for k in range(1, depth + 1):
        logp = F.log_softmax(hs[k - 1] @ w.T, dim=-1)
        per_seq = torch.stack([-sum(logp[s, i, targets[s, i + k]] for i in range(t_len - k)) / t_len
                               for s in range(b)])
        ref = ref + per_seq.mean()
    ref = 0.3 / depth * ref
    torch.testing.assert_close(loss, ref)
    ours, refs = _grads(loss, w, *hs), _grads(ref, w, *hs)
    for x, y in zip(ours, refs):
        torch.testing.assert_close(x, y)
    # positions past the sequence end get no gradient at all
    assert torch.count_nonzero(ours[1][:, -1]) == 0 and torch.count_nonzero(ours[2][:, -2:]) == 0


# ---------------------------------------------------------------------------------------------
# KD divergences
def test_kd_hand_values_two_token_vocab():
    s = torch.tensor([[0.0, 0.0]])  # p_S = [1/2, 1/2]
    t = torch.tensor([[math.log(3.0), 0.0]])  # p_T = [3/4, 1/4]
    mask = torch.tensor([True])
    fwd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)
    assert forward_kl(s, t, mask).item() == pytest.approx(fwd, abs=1e-6)  # 0.130812
    assert reverse_kl(s, t, mask).item() == pytest.approx(rev, abs=1e-6)  # 0.143841
    m = [0.5 * 0.75 + 0.5 * 0.5, 0.5 * 0.25 + 0.5 * 0.5]
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) \
        + 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert generalized_jsd(s, t, mask, beta=0.5).item() == pytest.approx(jsd, abs=1e-6)


def _kd_data(n=9, v=7):
    s = torch.randn(n, v, requires_grad=True)
    t = torch.randn(n, v)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    return s, t, mask


def _explicit_kl(p_logits, q_logits, tau):
    p, q = F.softmax(p_logits / tau, -1), F.softmax(q_logits / tau, -1)
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_forward_and_reverse_kl_match_formula(tau):
    s, t, mask = _kd_data()
    ref_f = tau ** 2 * _explicit_kl(t, s, tau)[mask].mean()
    ref_r = tau ** 2 * _explicit_kl(s, t, tau)[mask].mean()
    for ours, ref in [(forward_kl(s, t, mask, tau), ref_f), (reverse_kl(s, t, mask, tau), ref_r)]:
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(_grads(ours, s)[0], _grads(ref, s)[0])
    # the Hinton gradient in closed form: ∂/∂z_S = τ (p_S^τ − p_T^τ) / (valid tokens), 0 on masked rows
    (g,) = _grads(forward_kl(s, t, mask, tau), s)
    closed = tau * (F.softmax(s / tau, -1) - F.softmax(t / tau, -1)) * mask[:, None] / mask.sum()
    torch.testing.assert_close(g, closed)


def test_forward_kl_tau_squared_keeps_gradient_scale():
    s, t, mask = _kd_data()
    mask = torch.ones_like(mask)
    g50, g100 = (_grads(forward_kl(s, t, mask, tau), s)[0] for tau in (50.0, 100.0))
    # as τ → ∞ the τ²-scaled gradient tends to (centred z_S − centred z_T) / (V N), independent of τ
    limit = ((s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))).detach() / (7 * 9)
    # (the error is O(1/τ): about 1% of the entries' size at τ = 100)
    torch.testing.assert_close(g100, limit, atol=1e-3, rtol=0)
    torch.testing.assert_close(g50, g100, atol=1e-3, rtol=0)
    assert (g50 - limit).abs().max() > 1.5 * (g100 - limit).abs().max()  # and it shrinks as τ grows
    # while the unscaled KL's gradient shrinks like 1/τ²
    gu = _grads(generalized_jsd(s, t, mask, beta=0.0, temperature=100.0), s)[0]
    torch.testing.assert_close(gu * 100.0 ** 2, g100, atol=1e-6, rtol=1e-4)


def test_generalized_jsd_formula_endpoints_and_symmetry():
    s, t, mask = _kd_data()
    beta = 0.3
    p_t, p_s = F.softmax(t, -1), F.softmax(s, -1)
    m = beta * p_t + (1 - beta) * p_s  # the mixture built from probabilities, not logsumexp
    ref = (beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1))[mask].mean()
    ours = generalized_jsd(s, t, mask, beta=beta)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grads(ours, s)[0], _grads(ref, s)[0])
    # TRL endpoints: β = 0 forward KL(p_T‖p_S), β = 1 reverse KL(p_S‖p_T); unscaled by τ²
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=0.0), forward_kl(s, t, mask))
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=1.0), reverse_kl(s, t, mask))
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=0.0, temperature=2.0),
                               forward_kl(s, t, mask, 2.0) / 4.0)
    # JSD(β)(P‖Q) = JSD(1−β)(Q‖P): swapping roles mirrors β
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=beta), generalized_jsd(t, s, mask, beta=1 - beta))
    with pytest.raises(ValueError, match="beta=1.5"):
        generalized_jsd(s, t, mask, beta=1.5)


@pytest.mark.parametrize("divergence", [forward_kl_per_token, reverse_kl_per_token,
                                        functools.partial(generalized_jsd_per_token, beta=0.4)])
def test_chunked_kd_matches_full_logits(divergence):
    n, v, d_s, d_t = 11, 17, 4, 6  # teacher has its own hidden size
    h_s, w_s = torch.randn(n, d_s, requires_grad=True), torch.randn(v, d_s, requires_grad=True)
    h_t, w_t = torch.randn(n, d_t, requires_grad=True), torch.randn(v, d_t, requires_grad=True)
    mask = torch.rand(n) > 0.3
    ours = chunked_kd_loss(h_s, w_s, h_t, w_t, mask, divergence=divergence, temperature=1.7, chunk_size=4)
    s, t = h_s @ w_s.T, (h_t @ w_t.T).detach()
    ref = divergence(s, t, 1.7)[mask].mean()
    torch.testing.assert_close(ours, ref)
    for x, y in zip(_grads(ours, h_s, w_s), _grads(ref, h_s, w_s)):
        torch.testing.assert_close(x, y)
    # the teacher is outside the graph
    ours = chunked_kd_loss(h_s, w_s, h_t, w_t, mask, divergence=divergence, chunk_size=4)
    assert torch.autograd.grad(ours, (h_t, w_t), allow_unused=True) == (None, None)


def test_chunked_kd_rejects_vocab_mismatch():
    with pytest.raises(ValueError, match="vocab"):
        chunked_kd_loss(torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 3), torch.randn(6, 3),
                        torch.ones(2, dtype=torch.bool))
