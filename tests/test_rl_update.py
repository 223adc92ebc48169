"""The RL update's pieces on a micro model, without a run: the completion-only head and its
micro-batches, gradients that equal the loss formula and do not depend on the micro-batching, each
variant's aggregation, the reward's overlong penalty, a skipped update's expert load, and π_old
across inner steps."""
import math

import pytest
import torch

from sputnik.model import build_model
from sputnik.model.config import tiny
from sputnik.rl import update as rl_update
from sputnik.rl.rewards import score
from sputnik.rl.rollout import micro_batches
from sputnik.stages import rl
from test_rl_stage import MICRO


# ---------------------------------------------------------------------------------------------
# The update's batching: completion-only head, sorted and trimmed micro-batches
def _rollout(vocab=300, seed=0):
    """A rollout batch with prompts and completions of different lengths (so rows carry padding)."""
    from sputnik.rl.rollout import build_rollout_batch

    g = torch.Generator().manual_seed(seed)
    lens = [(3, 9), (5, 2), (4, 6), (2, 1), (6, 7), (3, 4)]
    prompts = [torch.randint(1, vocab, (p,), generator=g).tolist() for p, _ in lens]
    comps = [torch.randint(1, vocab, (c,), generator=g).tolist() for _, c in lens]
    return build_rollout_batch(prompts, comps, [[0.0] * len(c) for c in comps], pad_id=0)


def test_policy_logprobs_equal_the_full_logits_at_completion_positions():
    """Only completion positions go through the head (and a trimmed batch drops trailing padding):
    same log-probs and entropies as log_softmax over the full [B, T, V] logits."""
    from sputnik.rl.rollout import policy_logprobs

    torch.manual_seed(0)
    model = build_model(tiny(**MICRO)).eval()
    batch, vocab_limit, tau = _rollout(), 300, 0.7
    with torch.no_grad():
        logits_BTV = model(batch.input_ids_BT).logits[..., :vocab_limit] / tau
        logp_all = torch.log_softmax(logits_BTV, -1)
        mask_BT = batch.completion_mask_BT.bool()
        ref_logp = torch.where(mask_BT, logp_all.gather(-1, batch.targets_BT.clamp(min=0)[..., None])[..., 0], 0.0)
        ref_ent = torch.where(mask_BT, -(logp_all.exp() * logp_all).sum(-1), 0.0)
        for rows in (slice(None), slice(1, 4)):
            sub = batch.select(rows).trimmed()
            logp, ent, _ = policy_logprobs(model, sub, tau, vocab_limit=vocab_limit)
            T = sub.input_ids_BT.shape[1]
            torch.testing.assert_close(logp, ref_logp[rows, :T], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ent, ref_ent[rows, :T], atol=1e-5, rtol=1e-5)
    sub = batch.select(slice(1, 4)).trimmed()  # rows (5, 2), (4, 6), (2, 1): targets end at column 9
    assert sub.input_ids_BT.shape[1] == 9 < batch.input_ids_BT.shape[1]
    assert sub.completion_mask_BT.sum() == batch.select(slice(1, 4)).completion_mask_BT.sum()


def test_valid_positions_end_at_each_rows_last_target():
    """valid_BT (what counts as expert load): prompt + completion up to the last target, per row."""
    batch = _rollout()
    lens = [(3, 9), (5, 2), (4, 6), (2, 1), (6, 7), (3, 4)]
    assert batch.valid_BT().sum(1).tolist() == [p + c - 1 for p, c in lens]
    assert batch.valid_BT()[:, 0].all() and not batch.valid_BT()[3, 2:].any()


def test_micro_batches_sort_by_length_and_keep_every_row():
    batch = _rollout()
    adv_B = torch.arange(6.0)
    parts = micro_batches(batch, adv_B, 4)
    assert [p.input_ids_BT.shape for p, _ in parts] == [(4, 12), (2, 6)]  # longest first, each trimmed
    assert sorted(torch.cat([a for _, a in parts]).tolist()) == adv_B.tolist()
    assert sum(float(p.completion_mask_BT.sum()) for p, _ in parts) == float(batch.completion_mask_BT.sum())


class _CaptureGrads:
    """An optimizer stand-in that records the gradients update() would step with."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize("variant", ["dapo", "grpo", "dr_grpo"])
def test_update_gradient_does_not_depend_on_the_micro_batch(variant):
    """Sorting rows by length, splitting them and trimming each micro-batch's padding is exact:
    the gradient of one update equals the unsplit batch's, for every aggregation."""
    from sputnik.common import DeviceChoice
    from sputnik.train.optim import OptimConfig

    torch.manual_seed(0)
    model = build_model(tiny(**MICRO))
    batch, adv_B = _rollout(), torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, -0.4])
    dc = DeviceChoice(torch.device("cpu"), torch.float32, "test")
    grads, state = {}, {k: v.clone() for k, v in model.state_dict().items()}
    for mb in (6, 4, 1):
        model.load_state_dict(state)  # update() moves the routers' expert bias after its step
        cfg = rl.Config(init="<test>", variant=variant, micro_batch=mb, max_new_tokens=9,
                        optim=OptimConfig(lr=1e-4, grad_clip=0.0))
        opt = _CaptureGrads(model)
        rl_update.update(model, None, opt, batch, adv_B, cfg, dc, vocab_limit=300)
        grads[mb] = opt.grads
    assert grads[6] and grads[6].keys() == grads[4].keys() == grads[1].keys()
    for n, g in grads[6].items():
        torch.testing.assert_close(grads[4][n], g, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-4)


def test_variant_aggregations_hand_values():
    """Per-token losses [[1, 2, 3], [4]] (L_max 5): GRPO means each sequence then the batch
    ((2 + 4) / 2), DAPO divides by all tokens (10 / 4), Dr. GRPO by B·L_max (10 / 10); only GRPO and
    DAPO scale advantages by the group's std."""
    loss_BT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask_BT = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    got = {v: rl_update.aggregation(rl.Config(init="x", variant=v, max_new_tokens=5), 4)(loss_BT, mask_BT).item()
           for v in ("grpo", "dapo", "dr_grpo")}
    assert got == {"grpo": 3.0, "dapo": 2.5, "dr_grpo": 1.0}
    assert rl_update.aggregation(rl.Config(init="x", variant="dapo"), 8)(loss_BT, mask_BT).item() == 10 / 8  # all ranks' tokens
    variants = rl_update.VARIANTS
    assert {v: variants[v]["scale_by_std"] for v in variants} == {"grpo": True, "dapo": True, "dr_grpo": False}


def test_score_adds_the_overlong_penalty_and_the_custom_reward():
    """Accuracy 1 + format 0.1 (even lengths) + custom 0.5, and DAPO's soft overlong penalty with
    L_max 8 and a window of 4: length 4 none, 6 -0.5, 7 -0.75."""
    from types import SimpleNamespace as NS

    cfg = rl.Config(init="x", max_new_tokens=8, overlong_cache=4, accuracy_weight=1.0, format_weight=0.1)
    task = NS(verify=lambda ex, text: NS(correct=True, well_formatted=len(text) % 2 == 0))
    completions = [NS(text="x" * n, token_ids=[1] * n) for n in (4, 6, 7)]
    rewards, _ = score(cfg, {"t": task}, [NS(task="t", prompt="p", answer="a")] * 3, completions,
                            lambda batch: [0.5] * len(batch))
    assert rewards == pytest.approx([1.6, 1.6 - 0.5, 1.5 - 0.75])


@pytest.mark.parametrize("knobs", [dict(tis_cap=2.0), dict(beta=0.1)])
def test_update_gradient_is_the_loss_formula(knobs):
    """update() on one micro-batch = autograd of rl_losses.grpo_loss over policy_logprobs (DAPO),
    with truncated importance weights or the k3 KL to another model; the mismatch metric is the mean
    |log p| here, since the test batch's sampler log-probs are 0."""
    from sputnik.common import DeviceChoice
    from sputnik.train.optim import OptimConfig
    from sputnik.rl.rollout import policy_logprobs
    from sputnik.rl import objectives as rl_losses

    torch.manual_seed(0)
    model = build_model(tiny(**MICRO))
    torch.manual_seed(1)
    ref_model = build_model(tiny(**MICRO)).requires_grad_(False) if knobs.get("beta") else None
    batch, adv_B = _rollout(), torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, -0.4])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    logp_BT, _, _ = policy_logprobs(model, batch, 1.0, vocab_limit=300)
    ref_BT = None if ref_model is None else policy_logprobs(ref_model, batch, 1.0, vocab_limit=300)[0].detach()
    is_w = (rl_losses.truncated_importance_weights(logp_BT.detach(), batch.sampler_logp_BT, knobs["tis_cap"])
            if "tis_cap" in knobs else None)
    loss, expected = rl_losses.grpo_loss(logp_BT, logp_BT.detach(), adv_B, batch.completion_mask_BT, eps_high=0.28,
                                         beta=knobs.get("beta", 0.0), ref_logp_BT=ref_BT,
                                         aggregate=rl_losses.token_mean, is_weights_BT=is_w)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    cfg = rl.Config(init="<test>", variant="dapo", micro_batch=6, max_new_tokens=9,
                    optim=OptimConfig(lr=1e-4, grad_clip=0.0), **knobs)
    opt = _CaptureGrads(model)
    m = rl_update.update(model, ref_model, opt, batch, adv_B, cfg, DeviceChoice(torch.device("cpu"), torch.float32, "test"),
                         vocab_limit=300)
    assert want and want.keys() == opt.grads.keys()
    for n, g in want.items():
        torch.testing.assert_close(opt.grads[n], g, atol=1e-6, rtol=1e-4)
    mask = batch.completion_mask_BT.bool()
    assert m["logp_mismatch"] == pytest.approx(logp_BT.detach().abs()[mask].mean().item(), rel=1e-5)
    if "beta" in knobs:
        assert m["kl"] > 0 and m["kl"] == pytest.approx(float(expected["kl"]), rel=1e-4)


def test_a_skipped_update_discards_its_expert_load():
    """A taken step moves each router bias by γ·sign(mean − load) of the step's load (every micro-batch's
    real tokens: train/balance.ExpertLoad); a step the non-finite guard skips discards that load with
    the gradient: weights, router biases and Adam moments stay exactly as they were."""
    from sputnik.common import DeviceChoice
    from sputnik.rl.rollout import policy_logprobs
    from sputnik.train.optim import OptimConfig, build_optimizer

    torch.manual_seed(0)
    model = build_model(tiny(**MICRO))
    batch, adv_B = _rollout(), torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, -0.4])
    cfg = rl.Config(init="<test>", variant="dapo", micro_batch=4, max_new_tokens=9, share_prompts="never",
                    optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", grad_clip=0.0))
    dc = DeviceChoice(torch.device("cpu"), torch.float32, "test")
    opt = build_optimizer(model, cfg.optim)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = rl_update.update(model, None, opt, batch, adv_B, cfg, dc, vocab_limit=300, poison=True)
    assert m["skipped"] == 1 and not math.isfinite(m["loss"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opt.state  # no Adam moments either
    with torch.no_grad():
        _, _, load = policy_logprobs(model, batch, 1.0, vocab_limit=300)  # the step's load: all rows, no padding
    gamma = model.config.bias_update_speed
    m = rl_update.update(model, None, opt, batch, adv_B, cfg, dc, vocab_limit=300)
    assert m["skipped"] == 0
    moes = model.moe_layers()
    assert list(moes) == list(load) == ["model.layers.1.mlp"]
    for name, moe in moes.items():
        key = f"{name}.gate.e_score_correction_bias"
        delta = moe.gate.e_score_correction_bias - before[key]
        torch.testing.assert_close(delta, gamma * torch.sign(load[name].mean() - load[name]), rtol=0, atol=1e-9)
        assert delta.abs().sum() > 0  # the batch's load is uneven: the bias did move


def test_second_inner_step_keeps_pi_old(monkeypatch):
    """μ = 2: the second step's π_old is the first step's log-probs (the sampling policy), not the
    updated model's."""
    from sputnik.common import DeviceChoice
    from sputnik.train.optim import OptimConfig

    seen = []
    real = rl_update.objectives.grpo_loss

    def spy(logp_BT, old_BT, *args, **kw):
        seen.append((logp_BT.detach().clone(), old_BT.clone()))
        return real(logp_BT, old_BT, *args, **kw)

    monkeypatch.setattr(rl_update.objectives, "grpo_loss", spy)
    torch.manual_seed(0)
    model = build_model(tiny(**MICRO))
    cfg = rl.Config(init="<test>", variant="dapo", micro_batch=6, max_new_tokens=9, inner_updates=2,
                    optim=OptimConfig(lr=1e-2, grad_clip=0.0))
    rl_update.update(model, None, torch.optim.SGD(model.parameters(), lr=1.0), _rollout(),
                     torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, -0.4]), cfg,
                     DeviceChoice(torch.device("cpu"), torch.float32, "test"), vocab_limit=300)
    (logp0, old0), (logp1, old1) = seen
    assert torch.equal(old0, logp0) and torch.equal(old1, logp0) and not torch.equal(logp1, logp0)
