"""sputnik.rl.objectives: GRPO / Dr. GRPO / DAPO pieces on hand-made tensors vs their formulas."""
import functools
import math

import pytest
import torch

from sputnik.rl.objectives import (
    clipped_surrogate, constant_norm, dynamic_sampling_mask, entropy_from_logits, group_advantages,
    grpo_loss, k3_kl, sequence_mean, soft_overlong_penalty, token_mean, truncated_importance_weights,
)


# ---------------------------------------------------------------------------------------------
# Advantages and reward shaping
def test_group_advantages_hand_values():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]), 2)
    # [1, 0]: mean 0.5, Bessel std sqrt(0.5); (±0.5)/(0.70711 + 1e-4)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, 0.0, 0.0, a, -a]))
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), 4)
    # mean 0.25, Bessel std = sqrt((0.75² + 3·0.25²)/3) = 0.5
    torch.testing.assert_close(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / 0.5001)
    assert adv.shape == (1, 4)
    # Dr. GRPO: centred only
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale_by_std=False),
                               torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_group_advantages_all_equal_is_exactly_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3])
    for scale in (True, False):
        adv = group_advantages(r, 3, scale_by_std=scale)
        assert torch.equal(adv, torch.zeros(12))
    # a group whose float32 mean is inexact (8 x 0.7): without the all-equal guard it gives ~6e-4
    assert torch.equal(group_advantages(torch.full((8,), 0.7), 8), torch.zeros(8))
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(r, 5)
    with pytest.raises(ValueError, match="group_size=1"):
        group_advantages(r, 1)


def test_dynamic_sampling_drops_exactly_zero_variance_groups():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [1.0, 0.0, 0.0]])
    assert dynamic_sampling_mask(r, 3).tolist() == [False, True, False, False, True]
    assert dynamic_sampling_mask(r.reshape(-1), 3).tolist() == [False, True, False, False, True]


def test_soft_overlong_penalty_dapo_eq13():
    lengths = torch.tensor([10, 16, 17, 18, 20, 21, 100])  # L_max = 20, L_cache = 4: ramp over (16, 20]
    torch.testing.assert_close(soft_overlong_penalty(lengths, 20, 4),
                               torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]))
    with pytest.raises(ValueError, match="cache_len=0"):
        soft_overlong_penalty(lengths, 20, 0)


# ---------------------------------------------------------------------------------------------
# Per-token terms
def _ratios_case():
    ratio = torch.tensor([[0.5, 1.0, 1.5, 1.1], [0.5, 1.0, 1.5, 1.1]])
    logp = ratio.log().requires_grad_()
    old = torch.zeros(2, 4)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    return logp, old, adv, mask


def test_clipped_surrogate_hand_values_grads_and_clip_fraction():
    logp, old, adv, mask = _ratios_case()
    loss, clip_frac = clipped_surrogate(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # A = +1: −min(ρ, clip(ρ, 0.8, 1.28));  A = −1: max(ρ, clip(ρ, 0.8, 1.28))
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.0, -1.28, -1.1], [0.8, 1.0, 1.5, 1.1]]))
    # clip active on (A>0, ρ=1.5) and (A<0, ρ=0.5): 2 of the 7 valid tokens
    assert clip_frac.item() == pytest.approx(2 / 7)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    # ∂ℓ/∂logp = −A ρ where the unclipped term is taken, 0 where the clip is active
    torch.testing.assert_close(g, torch.tensor([[-0.5, -1.0, 0.0, -1.1], [0.0, 1.0, 1.5, 1.1]]))


def test_k3_kl_nonnegative_zero_when_equal_and_unbiased():
    logp, ref = torch.randn(4, 6), torch.randn(4, 6)
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros(4, 6))
    x = torch.tensor(0.0, requires_grad=True)
    val = k3_kl(x, torch.tensor(math.log(2.0)))
    assert val.item() == pytest.approx(1.0 - math.log(2.0))  # 2 − log 2 − 1
    assert torch.autograd.grad(val, x)[0].item() == pytest.approx(-1.0)  # 1 − π_ref/π_θ
    # E_{x~π_θ}[k3] = KL(π_θ ‖ π_ref), computed exactly over a 5-way categorical
    lp, lr = torch.log_softmax(torch.randn(5), 0), torch.log_softmax(torch.randn(5), 0)
    torch.testing.assert_close((lp.exp() * k3_kl(lp, lr)).sum(), (lp.exp() * (lp - lr)).sum())


def test_truncated_importance_weights_capped_and_detached():
    train = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    sampler = torch.tensor([0.0, math.log(2.0), -math.log(4.0)])
    w = truncated_importance_weights(train, sampler, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.5, 2.0]))  # exp(log 4) = 4 capped to 2
    assert not w.requires_grad
    # truncated from above only: a ratio of 1/4 stays 1/4 (not raised to 1/cap)
    w = truncated_importance_weights(torch.zeros(1), torch.tensor([math.log(4.0)]), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([0.25]))


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [100.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(logits, -1)
    ref = -(p * p.clamp(min=1e-30).log()).sum(-1)
    h = entropy_from_logits(logits)
    assert h[0].item() == pytest.approx(math.log(4.0))
    torch.testing.assert_close(h, ref)
    assert h[2].item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Aggregations
def test_aggregations_hand_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])  # garbage under the mask is ignored
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert sequence_mean(loss, mask).item() == pytest.approx((1.5 + 4.0) / 2)
    assert token_mean(loss, mask).item() == pytest.approx(7 / 3)
    assert token_mean(loss, mask, num_tokens_global=10).item() == pytest.approx(0.7)
    assert constant_norm(loss, mask, max_len=4).item() == pytest.approx(7 / 8)
    assert constant_norm(loss, mask, max_len=4, num_seqs_global=4).item() == pytest.approx(7 / 16)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert token_mean(loss, empty).item() == 0.0 and sequence_mean(loss, empty).item() == 0.0


def test_token_mean_with_global_count_is_split_invariant():
    b, t = 6, 5
    logp = torch.randn(b, t, requires_grad=True)
    old = (logp + 0.3 * torch.randn(b, t)).detach()
    adv = torch.randn(b)
    mask = torch.rand(b, t) > 0.3
    mask[:3, :] = True  # micro-batches with different token counts, so local normalization would differ
    n_global = mask.sum()
    full, _ = grpo_loss(logp, old, adv, mask, aggregate=token_mean)
    (g_full,) = torch.autograd.grad(full, logp)
    agg = functools.partial(token_mean, num_tokens_global=n_global)
    split = sum(grpo_loss(logp[s], old[s], adv[s], mask[s], aggregate=agg)[0] for s in (slice(0, 3), slice(3, 6)))
    (g_split,) = torch.autograd.grad(split, logp)
    torch.testing.assert_close(split, full)
    torch.testing.assert_close(g_split, g_full)
    # local normalization (averaging the two micro-batch means) is not invariant
    halves = (slice(0, 3), slice(3, 6))
    local = sum(grpo_loss(logp[s], old[s], adv[s], mask[s], aggregate=token_mean)[0] for s in halves) / 2
    assert not torch.allclose(local, full)


# ---------------------------------------------------------------------------------------------
# grpo_loss
def test_grpo_loss_matches_deepseekmath_formula():
    b, t, beta = 4, 6, 0.04
    logp = torch.randn(b, t, requires_grad=True)
    old = (logp + 0.2 * torch.randn(b, t)).detach()
    ref = (logp + 0.5 * torch.randn(b, t)).detach()
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 4)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    loss, metrics = grpo_loss(logp, old, adv, mask, beta=beta, ref_logp_BT=ref)
    # J = (1/G) Σ_i (1/|o_i|) Σ_t [min(ρA, clip(ρ, 0.8, 1.2)A) − β (π_ref/π − log(π_ref/π) − 1)]
    expected = 0.0
    for i in range(b):
        terms = []
        for j in range(t):
            if mask[i, j]:
                rho = torch.exp(logp[i, j] - old[i, j])
                surr = torch.min(rho * adv[i], rho.clamp(0.8, 1.2) * adv[i])
                q = torch.exp(ref[i, j] - logp[i, j])
                terms.append(surr - beta * (q - torch.log(q) - 1))
        expected = expected + sum(terms) / len(terms)
    expected = -expected / b
    torch.testing.assert_close(loss, expected)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, torch.autograd.grad(expected, logp)[0])
    rho = torch.exp(logp - old)[mask]
    assert metrics["ratio_mean"].item() == pytest.approx(rho.mean().item(), rel=1e-6)
    assert metrics["kl"].item() == pytest.approx(k3_kl(logp, ref)[mask].mean().item(), rel=1e-6)
    assert set(metrics) == {"clip_frac", "ratio_mean", "kl"}


def test_grpo_loss_on_policy_gradient_is_minus_advantage_over_length():
    logp = torch.randn(2, 3, requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    loss, metrics = grpo_loss(logp, logp.detach(), adv, mask)  # ρ ≡ 1, β = 0
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, torch.tensor([[-2 / 6, -2 / 6, -2 / 6], [1 / 2, 0.0, 0.0]]))
    assert metrics["clip_frac"].item() == 0.0 and metrics["ratio_mean"].item() == 1.0
    assert "kl" not in metrics


def test_grpo_loss_variants_by_arguments():
    logp, old, adv, mask = _ratios_case()
    ref = torch.full((2, 4), -0.5)
    surr, _ = clipped_surrogate(logp, old, adv, mask, 0.2, 0.28)
    # Dr. GRPO: constant normalizer; TIS weights scale only the policy term; KL times ρ (V3.2)
    w = torch.tensor([[1.0, 2.0, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0]])
    agg = functools.partial(constant_norm, max_len=8)
    loss, _ = grpo_loss(logp, old, adv, mask, eps_high=0.28, beta=0.1, ref_logp_BT=ref, aggregate=agg,
                        is_weights_BT=w, kl_times_ratio=True)
    rho = torch.exp(logp - old)
    expected = torch.where(mask, surr * w + 0.1 * k3_kl(logp, ref) * rho, 0.0).sum() / (2 * 8)
    torch.testing.assert_close(loss, expected)
    # β = 0 with a reference: KL is reported but not added
    loss0, m0 = grpo_loss(logp, old, adv, mask, eps_high=0.28, ref_logp_BT=ref)
    torch.testing.assert_close(loss0, sequence_mean(surr, mask))
    assert "kl" in m0
    with pytest.raises(ValueError, match="ref_logp_BT"):
        grpo_loss(logp, old, adv, mask, beta=0.1)
