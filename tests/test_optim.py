"""Parameter groups, schedules, clipping and the non-finite guard (sputnik/train/optim.py)."""
import math

import pytest
import torch
from torch import nn

from sputnik.config import build
from sputnik.model import build_model
from sputnik.model.config import ModelConfig
from sputnik.train.optim import (OptimConfig, OptimizerList, build_optimizer, clip_grad_norm, guarded_step, lr_multiplier,
                           param_groups, set_lr)

TINY_MOE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=16,
                n_routed_experts=4, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8)


class Toy(nn.Module):
    def __init__(self, tie=False):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)  # weight decays, bias does not
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("e_score_correction_bias", torch.zeros(4))

    def forward(self, x):
        return self.head(self.norm(self.proj(self.embed(x))))


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_param_groups_decay_only_matrices():
    m = Toy()
    groups = {g["name"]: g for g in param_groups(m, 0.1)}
    assert _names(m, groups["decay"]) == ["head.weight", "proj.weight"]
    assert _names(m, groups["no_decay"]) == ["embed.weight", "norm.bias", "norm.weight", "proj.bias"]
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0


def test_tied_weight_appears_once_and_no_decay():
    m = Toy(tie=True)
    groups = param_groups(m, 0.1)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == 5
    assert id(m.embed.weight) in {id(p) for g in groups if g["name"] == "no_decay" for p in g["params"]}


def test_real_moe_router_bias_never_in_optimizer():
    model = build_model(build(ModelConfig, TINY_MOE))
    opt = build_optimizer(model, OptimConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}  # every parameter exactly once
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and not any(id(b) in in_opt for b in biases)
    no_decay = {n for n, p in model.named_parameters() if any(id(p) == id(q) for g in opt.param_groups
                                                              if g["weight_decay"] == 0 for q in g["params"])}
    assert "model.embed_tokens.weight" in no_decay and "model.norm.weight" in no_decay
    assert "lm_head.weight" not in no_decay


def test_schedule_values():
    cos = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, 110, cos) == pytest.approx(0.1)
    assert lr_multiplier(9, 110, cos) == pytest.approx(1.0)
    assert lr_multiplier(10, 110, cos) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, cos) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert lr_multiplier(110, 110, cos) == pytest.approx(0.1)
    wsd = OptimConfig(warmup_steps=0, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(79, 100, wsd) == 1.0
    assert lr_multiplier(80, 100, wsd) == pytest.approx(0.95)  # first of 20 decay steps
    assert lr_multiplier(99, 100, wsd) == pytest.approx(0.0)
    const = OptimConfig(warmup_steps=4, schedule="constant")
    assert [lr_multiplier(s, 10, const) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]


def test_set_lr_scales_each_group_peak():
    m = Toy()
    opt = build_optimizer(m, OptimConfig(lr=0.01))
    assert set_lr(opt, 0.5) == pytest.approx(0.005)
    assert all(g["lr"] == pytest.approx(0.005) for g in opt.param_groups)


def test_clip_grad_norm_value_and_clipping():
    m = nn.Linear(2, 1, bias=False)
    m.weight.grad = torch.tensor([[3.0, 4.0]])
    assert clip_grad_norm(m, 0.0) == pytest.approx(5.0)  # measured, not clipped
    assert torch.allclose(m.weight.grad, torch.tensor([[3.0, 4.0]]))
    assert clip_grad_norm(m, 1.0) == pytest.approx(5.0)
    assert torch.allclose(m.weight.grad, torch.tensor([[0.6, 0.8]]), atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_guarded_step_skips_nonfinite(bad):
    m = Toy()
    opt = build_optimizer(m, OptimConfig(lr=0.1))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    loss = m(torch.tensor([1, 2])).sum() * bad
    loss.backward()
    norm = clip_grad_norm(m, 1.0)
    assert not math.isfinite(norm)
    assert guarded_step(opt, float(loss.detach()), norm) is False
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters()) and not opt.state  # no Adam moments either
    # a finite step afterwards moves the weights
    m(torch.tensor([1, 2])).sum().backward()
    assert guarded_step(opt, 1.0, clip_grad_norm(m, 1.0)) is True
    assert not torch.equal(before["proj.weight"], m.proj.weight)


def test_muon_option_steps_and_roundtrips_state():
    model = build_model(build(ModelConfig, TINY_MOE))
    opt = build_optimizer(model, OptimConfig(optimizer="muon"))
    assert isinstance(opt, OptimizerList) and len(opt.optimizers) == 2
    muon_params = {id(p) for p in opt.optimizers[1].param_groups[0]["params"]}
    assert id(model.model.embed_tokens.weight) not in muon_params and id(model.lm_head.weight) not in muon_params
    assert all(p.ndim == 2 for g in opt.optimizers[1].param_groups for p in g["params"])
    x = torch.randint(0, 64, (2, 8))
    model(x, x).loss.backward()
    opt.step()
    state = opt.state_dict()
    opt2 = build_optimizer(model, OptimConfig(optimizer="muon"))
    opt2.load_state_dict(state)
    assert len(opt2.optimizers[1].state) == len(opt.optimizers[1].state) > 0


def test_adamw_uses_the_fused_kernel_and_matches_foreach():
    """build_optimizer picks fused AdamW (also on CPU); one step agrees with foreach to rounding."""
    torch.manual_seed(0)
    a, b = nn.Linear(16, 8), nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    opt = build_optimizer(a, OptimConfig(lr=1e-2))
    assert all(g["fused"] for g in opt.param_groups)
    ref = torch.optim.AdamW([dict(params=[b.weight], weight_decay=0.1), dict(params=[b.bias], weight_decay=0.0)],
                            lr=1e-2, betas=(0.9, 0.95), foreach=True)
    for model in (a, b):
        model(torch.randn(4, 16, generator=torch.Generator().manual_seed(1))).square().sum().backward()
    opt.step()
    ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_step_moves_the_parameters_version_counters(optimizer):
    """Caches of derived weights (mla.cached_weights: the engine's decode weights) key on the
    version counter; the fused AdamW kernel does not bump it by itself."""
    from sputnik.config import build
    from sputnik.train.optim import OptimConfig, build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, bias=False))
    opt = build_optimizer(model, build(OptimConfig, {"optimizer": optimizer}))
    before = [p._version for p in model.parameters()]
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert all(p._version > v for p, v in zip(model.parameters(), before))
