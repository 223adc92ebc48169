"""MLA and RoPE: HF parity, DeepSeek pair convention, YaRN, padded-V SDPA, the attention hook, the
absorbed form over a latent cache == the naive full forward (the plain oracle and the engine's decode,
single sequence and ragged batch)."""
import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from sputnik.model.config import tiny, v3_671b
from sputnik.model.hf import hf_config
from oracles import absorbed_mla_forward, rope_at
from sputnik.inference.decoders import cached_model
from sputnik.inference.mla_decode import MLACache
from sputnik.model.mla import MLA
from sputnik.model.rope import RotaryTables, apply_rope, rope_frequencies, softmax_scale
from sputnik.model.transformer import Transformer

YARN = dict(rope_type="yarn", rope_factor=4.0, max_position_embeddings=128, original_max_position_embeddings=32,
            mscale=0.707, mscale_all_dim=1.0)


def small_cfg(**kw):
    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
                q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                max_position_embeddings=128, first_k_dense_replace=2, num_nextn_predict_layers=0)
    return tiny(**{**base, **kw})


def hf_cfg(cfg):
    hc = DeepseekV3Config(**{k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")})
    hc._attn_implementation = "eager"
    return hc


# ---------------------------------------------------------------------------------------------
def test_rope_is_deepseek_adjacent_pair_rotation():
    """Our output is DeepSeek's complex-number rotation of pairs (x_2j, x_2j+1), written
    de-interleaved [evens; odds] like HF: same q·k, and a fixed permutation of the vector."""
    cfg = small_cfg()
    cos, sin = RotaryTables(cfg)(6, torch.float32)
    q_BTHR, k_BTHR = torch.randn(2, 6, 3, 8), torch.randn(2, 6, 1, 8)
    inv_freq_F, _ = rope_frequencies(cfg)
    rot_TF = torch.polar(torch.ones(6, 4), torch.arange(6.0)[:, None] * inv_freq_F)[:, None]

    def ds_ref(x):  # DeepSeek inference/model.py apply_rotary_emb
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot_TF).flatten(-2)

    q_ds, ours = ds_ref(q_BTHR), apply_rope(q_BTHR, cos, sin)
    torch.testing.assert_close(ours, torch.cat([q_ds[..., 0::2], q_ds[..., 1::2]], -1), atol=1e-6, rtol=0)
    scores_ds = torch.einsum("bthr,bshr->bhts", q_ds, ds_ref(k_BTHR))
    scores_ours = torch.einsum("bthr,bshr->bhts", ours, apply_rope(k_BTHR, cos, sin))
    torch.testing.assert_close(scores_ours, scores_ds, atol=1e-5, rtol=0)
    # position 0 is the identity; rotation preserves each pair's norm
    torch.testing.assert_close(ours[:, 0], torch.cat([q_BTHR[:, 0, :, 0::2], q_BTHR[:, 0, :, 1::2]], -1))


@pytest.mark.parametrize("extra", [{}, YARN])
def test_frequencies_and_scale_match_hf(extra):
    cfg = small_cfg(**extra)
    hc = hf_cfg(cfg)
    fn = DeepseekV3RotaryEmbedding.compute_default_rope_parameters if not extra else ROPE_INIT_FUNCTIONS["yarn"]
    inv_hf, factor_hf = fn(hc)
    inv_ours, factor_ours = rope_frequencies(cfg)
    assert torch.equal(inv_ours, inv_hf) and factor_ours == pytest.approx(factor_hf, abs=1e-12)
    assert softmax_scale(cfg) == pytest.approx(DeepseekV3Attention(hc, 0).scaling, abs=1e-12)
    if extra:  # ramp: low dims keep θ^(−2j/R), high dims are divided by the factor
        base = 1.0 / cfg.rope_theta ** (torch.arange(0, 8, 2) / 8)
        assert inv_ours[0] == base[0] and inv_ours[-1] == pytest.approx(base[-1] / 4.0)
        assert factor_ours == pytest.approx((0.1 * 0.707 * math.log(4) + 1) / (0.1 * math.log(4) + 1))


def test_v3_softmax_scale():
    """Reference §1.4: 192^−1/2 · (0.1·ln 40 + 1)² = 0.1352338."""
    assert softmax_scale(v3_671b()) == pytest.approx(0.1352338, abs=1e-7)


@pytest.mark.parametrize("extra", [{}, dict(q_lora_rank=0, **YARN)])
def test_mla_matches_hf_attention(extra):
    cfg = small_cfg(**extra)
    hc = hf_cfg(cfg)
    ours, theirs = MLA(cfg, 0), DeepseekV3Attention(hc, 0)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours.load_state_dict(theirs.state_dict())
    x_BTD = torch.randn(2, 9, 64)
    cos_sin = DeepseekV3RotaryEmbedding(hc)(x_BTD, torch.arange(9)[None])
    mask = torch.full((9, 9), float("-inf")).triu(1)[None, None]
    expected, _ = theirs(x_BTD, cos_sin, mask)
    cos, sin = RotaryTables(cfg)(9, torch.float32)
    torch.testing.assert_close(ours(x_BTD, cos, sin), expected, atol=1e-5, rtol=1e-5)


def test_padded_v_sdpa_equals_unpadded(monkeypatch):
    """SDPA with V zero-padded to the q/k head dim == SDPA on the plain V == the CPU's blocked attention
    (training on a CPU takes the blocked matmuls, which never read pad_v: switched off to test SDPA)."""
    from sputnik.model import layers

    cfg = small_cfg()
    attn = MLA(cfg, 0)
    x_BTD = torch.randn(2, 7, 64)
    cos, sin = RotaryTables(cfg)(7, torch.float32)
    blocked = attn(x_BTD, cos, sin)
    monkeypatch.setattr(layers, "BLOCK_ATTENTION_MAX", 0)
    attn.pad_v = False
    plain = attn(x_BTD, cos, sin)
    attn.pad_v = True
    padded = attn(x_BTD, cos, sin)
    torch.testing.assert_close(padded, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plain, blocked, atol=1e-5, rtol=1e-5)
    assert plain.shape == (2, 7, 64) and plain.std() > 0.01


# ---------------------------------------------------------------------------------------------
def test_absorbed_cached_decode_equals_naive_every_position():
    """Token-by-token decode through the compressed cache reproduces the full causal forward."""
    torch.manual_seed(1)
    cfg = small_cfg(**YARN)
    attn = MLA(cfg, 0)
    tables = RotaryTables(cfg)
    x_BTD = torch.randn(2, 10, 64)
    full = attn(x_BTD, *tables(10, torch.float32))
    cache = MLACache(1, 2, 16, cfg.kv_lora_rank, cfg.qk_rope_head_dim, torch.float32)
    # prefill 4 tokens at once, then one token per step
    steps = [(0, 4)] + [(t, t + 1) for t in range(4, 10)]
    for a, b in steps:
        pos_BT = torch.arange(a, b)[None].expand(2, b - a)
        out = absorbed_mla_forward(attn, x_BTD[:, a:b], *tables(pos_BT, torch.float32), cache.kv_BSX[0], pos_BT)
        torch.testing.assert_close(out, full[:, a:b], atol=1e-5, rtol=1e-5)
    # the cache holds exactly c_KV (post-norm) and the rotated k_R, nothing per head
    assert cache.kv_BSX[0].shape == (2, 16, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    c_BTC = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(x_BTD)[..., : cfg.kv_lora_rank])
    torch.testing.assert_close(cache.c_kv(0)[:, :10], c_BTC, atol=1e-6, rtol=0)
    assert cache.k_rope(0)[:, 10:].abs().sum() == 0


def test_absorbed_form_ragged_rows_equal_each_row_alone():
    """The absorbed form with ragged positions: rows of 3, 7 and 5 tokens prefilled right-padded (the
    padding's cache rows are written, then overwritten by the next real token), then 3 single-token
    steps at each row's own position: every real token's output is its row's naive causal forward."""
    torch.manual_seed(3)
    cfg = small_cfg(**YARN)
    attn = MLA(cfg, 0)
    tables = RotaryTables(cfg)
    lens, new = [3, 7, 5], 3
    xs = [torch.randn(1, n + new, 64) for n in lens]
    refs = [attn(x, *tables(x.shape[1], torch.float32))[0] for x in xs]
    kv_BSX = torch.zeros(3, 16, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    prompt_BTD = torch.randn(3, max(lens), 64)  # padding: random rows, never visible to a real token
    for b, n in enumerate(lens):
        prompt_BTD[b, :n] = xs[b][0, :n]
    pos_BT = torch.arange(max(lens))[None].expand(3, -1)
    out = absorbed_mla_forward(attn, prompt_BTD, *rope_at(tables, pos_BT), kv_BSX, pos_BT)
    for b, n in enumerate(lens):
        torch.testing.assert_close(out[b, :n], refs[b][:n], atol=1e-5, rtol=1e-5)
    for t in range(new):
        pos_B1 = torch.tensor(lens)[:, None] + t
        x_B1D = torch.stack([x[0, n + t] for x, n in zip(xs, lens)])[:, None]
        out = absorbed_mla_forward(attn, x_B1D, *rope_at(tables, pos_B1), kv_BSX, pos_B1)
        for b, n in enumerate(lens):
            torch.testing.assert_close(out[b, 0], refs[b][n + t], atol=1e-5, rtol=1e-5)
    c_BTC = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(xs[0])[..., : cfg.kv_lora_rank])
    torch.testing.assert_close(kv_BSX[0, : lens[0] + new, : cfg.kv_lora_rank], c_BTC[0], atol=1e-6, rtol=0)
    assert kv_BSX[0, max(lens):].abs().sum() == 0 and kv_BSX[1, lens[1] + new:].abs().sum() == 0


def test_attention_hook_replaces_only_the_attention():
    """MLA.forward's attend(mla, q, k, v) sees the per-head q, k, v of the naive form; given the
    causal attention it reproduces the default output, given another it changes only that step."""
    cfg = small_cfg()
    attn = MLA(cfg, 0)
    x_BTD = torch.randn(2, 7, 64)
    cos, sin = RotaryTables(cfg)(7, torch.float32)
    seen = []

    def causal(mla, q_BHTK, k_BHTK, v_BHTV):
        seen.append((q_BHTK.shape, v_BHTV.shape))
        return mla.causal_attention(q_BHTK, k_BHTK, v_BHTV)

    torch.testing.assert_close(attn(x_BTD, cos, sin, attend=causal), attn(x_BTD, cos, sin))
    assert seen == [((2, 4, 7, 24), (2, 4, 7, 12))]
    zeros = attn(x_BTD, cos, sin, attend=lambda mla, q, k, v: torch.zeros_like(v))
    torch.testing.assert_close(zeros, torch.zeros_like(zeros))  # o_proj has no bias


def test_ragged_batch_decode_matches_per_sequence_forward():
    """Rows with prompts of 3, 7 and 5 tokens, right-padded prefill, then 4 decode steps: every
    row's logits equal its own unbatched full forward."""
    torch.manual_seed(2)
    model = Transformer(small_cfg(num_nextn_predict_layers=1)).eval()
    cm = cached_model(model)
    lens, new = [3, 7, 5], 4
    seqs = [torch.randint(0, 128, (n + new,)) for n in lens]
    with torch.no_grad():
        refs = [model(s[None]).logits[0] for s in seqs]
        cache = cm.new_cache(3, 16)
        prompt_BT = torch.zeros(3, max(lens), dtype=torch.long)
        for b, n in enumerate(lens):
            prompt_BT[b, :n] = seqs[b][:n]
        logits_BTV = cm.forward_cached(prompt_BT, cache, torch.zeros(3, dtype=torch.long))
        for b, n in enumerate(lens):
            torch.testing.assert_close(logits_BTV[b, :n], refs[b][:n], atol=1e-4, rtol=1e-4)
        seqlens_B = torch.tensor(lens)
        for t in range(new):
            tok_B1 = torch.stack([seqs[b][n + t] for b, n in enumerate(lens)])[:, None]
            step_BV = cm.forward_cached(tok_B1, cache, seqlens_B)[:, -1]
            for b, n in enumerate(lens):
                torch.testing.assert_close(step_BV[b], refs[b][n + t], atol=1e-4, rtol=1e-4)
            seqlens_B += 1


def test_cache_select_forks_rows_and_overflow_raises():
    cache = MLACache(2, 2, 4, 3, 2, torch.float32)
    cache.kv_BSX[1][1] = 7.0
    forked = cache.select(torch.tensor([1, 1, 0]))
    assert forked.kv_BSX[1].shape == (3, 4, 5) and forked.kv_BSX[1][:2].eq(7).all() and forked.kv_BSX[1][2].eq(0).all()
    forked.kv_BSX[1][0] = 1.0
    assert cache.kv_BSX[1][1].eq(7).all()  # a copy, not a view
    with pytest.raises(ValueError, match="cache overflow"):
        cache.decode_step(torch.tensor([2, 3]), 2, 1, torch.zeros(8, 2), torch.zeros(8, 2), torch.float32)


def test_rms_norm_rows_equals_the_module():
    """The decode path's norm gives RMSNorm.forward's values (fp32 fast path; bf16 via the module)."""
    from sputnik.model.layers import RMSNorm
    from sputnik.inference.mla_decode import rms_norm_rows

    torch.manual_seed(0)
    for shape in [(1, 256), (32, 256), (3, 5, 64)]:
        norm = RMSNorm(shape[-1], eps=1e-5)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(shape) * 3
        torch.testing.assert_close(rms_norm_rows(x, norm), norm(x), atol=1e-6, rtol=1e-6)
    xb = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(rms_norm_rows(xb, norm), norm(xb))
