"""layers.py: the blocked causal attention used for CPU training equals SDPA, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

import sputnik.model.layers as layers_module
from sputnik.model.config import tiny
from sputnik.model.layers import block_causal_attention
from sputnik.model.mla import MLA
from sputnik.model.rope import RotaryTables


@pytest.mark.parametrize("T,block", [(37, 32), (64, 32), (5, 2), (100, 7), (50, 96)])
def test_block_causal_attention_matches_sdpa(T, block):
    torch.manual_seed(0)
    q_GTK, k_GTK = (torch.randn(6, T, 12, requires_grad=True) for _ in range(2))
    v_GTV = torch.randn(6, T, 8, requires_grad=True)  # V != K, as in MLA
    out = block_causal_attention(q_GTK, k_GTK, v_GTV, 0.3, block)
    ref = F.scaled_dot_product_attention(q_GTK, k_GTK, v_GTV, is_causal=True, scale=0.3)
    g = torch.randn_like(ref)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out, (q_GTK, k_GTK, v_GTV), g),
                         torch.autograd.grad(ref, (q_GTK, k_GTK, v_GTV), g)):
        torch.testing.assert_close(got, want)


def test_mla_training_forward_same_with_and_without_blocked_attention(monkeypatch):
    cfg = tiny()
    torch.manual_seed(0)
    mla = MLA(cfg, 0)
    cos, sin = RotaryTables(cfg)(48, torch.float32)
    x = torch.randn(2, 48, cfg.hidden_size)
    results = []
    for limit in (2 ** 24, 0):  # blocked path, then the SDPA path
        monkeypatch.setattr(layers_module, "BLOCK_ATTENTION_MAX", limit)
        mla.zero_grad()
        out = mla(x, cos, sin)
        out.square().sum().backward()
        results.append((out, mla.q_b_proj.weight.grad.clone(), mla.kv_b_proj.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)  # fp32 defaults: rtol 1.3e-6, atol 1e-5
