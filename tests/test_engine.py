"""Engine semantics on a tiny stand-in model that honours the cached-model contract
(inference/decoders.py); the real models' cached-decode parity lives in test_mla.py / test_llama.py,
and test_engine_models.py runs the engine on them. Below: the DeepSeek-V3 decode path's pieces
(mla_decode, the few-token MoE, derived weights, the static step) against their references."""
import pytest
import torch
from torch import nn

from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams, filter_logits, sample_next


class TokenCache:
    def __init__(self, ids_BS):
        self.ids_BS = ids_BS

    def select(self, rows):
        return TokenCache(self.ids_BS[rows].clone())


class CountingLM(nn.Module):
    """logits[t] = f(token t, token t-1, position): enough history dependence that a wrong cache
    row, position or fork shows up in the samples."""

    def __init__(self, vocab=11):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.b = nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.pos = nn.Parameter(torch.randn(64, vocab, generator=g))
        self.calls = []

    def full_logits(self, ids_BT):
        prev = torch.cat([torch.zeros_like(ids_BT[:, :1]), ids_BT[:, :-1]], 1)
        T = ids_BT.shape[1]
        return self.a[ids_BT] + 0.5 * self.b[prev] + self.pos[:T]

    # --- the cached-model contract
    def new_cache(self, batch, max_len, dtype=None, device=None):
        return TokenCache(torch.zeros(batch, max_len, dtype=torch.long, device=device))

    def forward_cached(self, ids_BT, cache, seqlens_B, logits_at_B=None):
        B, T = ids_BT.shape
        self.calls.append(B)
        pos_BT = seqlens_B[:, None] + torch.arange(T)
        cache.ids_BS.scatter_(1, pos_BT, ids_BT)
        prev_BT = cache.ids_BS.gather(1, (pos_BT - 1).clamp(min=0)) * (pos_BT > 0)
        logits_BTV = self.a[ids_BT] + 0.5 * self.b[prev_BT] + self.pos[pos_BT]
        return logits_BTV if logits_at_B is None else logits_BTV[torch.arange(B), logits_at_B]

    def step_weights(self):
        return None

    def step(self, tok_B, cache, seqlens_B, weights=None, step_fn=None):
        return self.forward_cached(tok_B[:, None], cache, seqlens_B)[:, -1]


def test_greedy_matches_full_forward_and_is_deterministic():
    m = CountingLM()
    eng = Engine(m)
    prompt = [3, 1, 4]
    out = eng.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0))[0][0]
    seq = list(prompt)
    for _ in range(8):  # reference: greedy with the full (uncached) forward
        seq.append(int(m.full_logits(torch.tensor([seq]))[0, -1].argmax()))
    assert out.token_ids == seq[3:]
    assert out.finish_reason == "length" and len(out.logprobs) == 8
    again = eng.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0))[0][0]
    assert again.token_ids == out.token_ids


def test_batch_equals_one_by_one_greedy_with_ragged_prompts():
    m = CountingLM()
    eng = Engine(m)
    prompts = [[1], [2, 3, 4, 5], [6, 7]]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    batched = [r[0].token_ids for r in eng.generate(prompts, params)]
    single = [eng.generate([p], params)[0][0].token_ids for p in prompts]
    assert batched == single


def test_forked_group_equals_separate_prefill():
    """n samples of one prompt (one prefill, forked cache) == the same prompt repeated n times."""
    m = CountingLM()
    eng = Engine(m)
    params = SamplingParams(max_new_tokens=7, temperature=1.0, seed=5)
    forked = eng.generate([[2, 9]], params, num_samples=4)[0]
    repeated = eng.generate([[2, 9]] * 4, params, num_samples=1)
    assert [c.token_ids for c in forked] == [r[0].token_ids for r in repeated]
    assert m.calls[0] == 1  # the forked run prefilled the prompt once


def test_stop_token_and_compaction():
    m = CountingLM(vocab=5)
    eng = Engine(m)
    params = SamplingParams(max_new_tokens=30, temperature=1.0, stop_token_ids=(0,), seed=3)
    outs = eng.generate([[1, 2]], params, num_samples=16)[0]
    for c in outs:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == 0 and 0 not in c.token_ids[:-1]
        else:
            assert len(c.token_ids) == 30 and 0 not in c.token_ids
    assert any(c.finish_reason == "stop" for c in outs)
    # finished rows leave the batch: later decode calls have fewer rows
    assert min(m.calls[1:]) < 16


def test_logprobs_are_policy_logprobs():
    m = CountingLM()
    eng = Engine(m)
    c = eng.generate([[4, 4]], SamplingParams(max_new_tokens=5, temperature=0.7, seed=1))[0][0]
    seq = [4, 4] + c.token_ids
    logits = m.full_logits(torch.tensor([seq]))[0] / 0.7
    ref = torch.log_softmax(logits, -1)[1:-1].gather(-1, torch.tensor(seq[2:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5)


def test_top_k_and_top_p_never_sample_outside_their_sets():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(2000, 1)
    toks, _ = sample_next(logits, SamplingParams(temperature=1.0, top_k=2), g)
    assert set(toks.tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)  # 0.61, 0.22, 0.08, ... -> top_p 0.8 keeps {0, 1}
    assert p[0] < 0.8 < p[0] + p[1]
    toks, _ = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), g)
    assert set(toks.tolist()) == {0, 1}
    f = filter_logits(logits[:1], 0, 0.5)  # the top token alone reaches 0.5 -> only it survives
    assert torch.isfinite(f).sum() == 1


def test_bad_params():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="empty prompt"):
        Engine(CountingLM()).generate([[]], SamplingParams())


def test_never_samples_ids_beyond_the_tokenizer_vocabulary():
    class Tok:
        vocab_size, eot_id = 4, None

        def decode(self, ids):
            assert max(ids) < 4
            return ""

    m = CountingLM(vocab=11)
    with torch.no_grad():
        m.a[:, 4:] += 50.0  # the untrained tail would win every draw
    outs = Engine(m, Tok()).generate([[1, 2]], SamplingParams(max_new_tokens=6, temperature=1.0), num_samples=8)[0]
    assert all(t < 4 for c in outs for t in c.token_ids)


def test_sampling_matches_the_distribution():
    """Inverse-CDF sampling draws from softmax(logits / T): empirical frequencies over 40k draws."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(40000, 1)
    toks, _ = sample_next(logits, SamplingParams(temperature=0.8), g)
    freq = torch.bincount(toks, minlength=5).float() / 40000
    expected = torch.softmax(logits[0] / 0.8, -1)
    assert torch.allclose(freq, expected, atol=0.01) and freq[4] == 0


# ---------------------------------------------------------------------------------------------
# The DeepSeek-V3 decode path (inference/: mla_decode, moe_few_tokens, derived weights, the static step)
def _v3(**kw):
    from sputnik.model import build_model
    from sputnik.model.config import tiny

    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                moe_intermediate_size=16, n_routed_experts=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(0)
    return build_model(tiny(**{**base, **kw})).eval()


@pytest.mark.parametrize("absorb", [None, True, False])
@pytest.mark.parametrize("q_lora_rank", [16, 0])
def test_mla_decode_equals_reference_cached_forward(absorb, q_lora_rank):
    """mla_decode (fused/absorbed weights, split-halves RoPE, baddbmm mask) == the plain absorbed
    form (tests/oracles.py), for a ragged prefill then single tokens; the cache rows are the same too."""
    from oracles import absorbed_mla_forward
    from sputnik.inference.decoders import cached_model
    from sputnik.inference.mla_decode import MLACache, mla_decode, mla_decode_weights

    model = _v3(q_lora_rank=q_lora_rank, rope_type="yarn", rope_factor=4.0, original_max_position_embeddings=16)
    attn = model.model.layers[0].self_attn
    cfg = model.config
    x_BTD = torch.randn(3, 9, cfg.hidden_size)
    new = lambda: MLACache(1, 3, 16, cfg.kv_lora_rank, cfg.qk_rope_head_dim, torch.float32)  # noqa: E731
    ref_cache, fast_cache = new(), new()
    seqlens_B = torch.tensor([0, 2, 1])
    cm = cached_model(model)
    with torch.no_grad():
        for a, b in [(0, 4), (4, 5), (5, 6), (6, 8), (8, 9)]:
            pos_BT = seqlens_B[:, None] + torch.arange(b - a)
            cos, sin = model.rope(pos_BT, torch.float32)
            ref = absorbed_mla_forward(attn, x_BTD[:, a:b], cos, sin, ref_cache.kv_BSX[0], pos_BT)
            step = cm._decode_step(fast_cache, seqlens_B, b - a)
            out = mla_decode(attn, x_BTD[:, a:b].reshape(-1, cfg.hidden_size), step, fast_cache,
                             mla_decode_weights(attn, absorb))
            torch.testing.assert_close(out.view(3, b - a, -1), ref, atol=1e-5, rtol=1e-5)
            seqlens_B = seqlens_B + (b - a)
    torch.testing.assert_close(fast_cache.kv_BSX[0], ref_cache.kv_BSX[0], atol=1e-6, rtol=0)
    if absorb is not None:
        w = mla_decode_weights(attn, absorb)
        assert w["absorb_q"] == absorb and w["absorb_o"] == absorb


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("kw", [{}, dict(n_group=2, topk_group=1, routed_scaling_factor=2.5),
                                dict(n_shared_experts=0, norm_topk_prob=False)])
def test_moe_few_tokens_equals_training_path(kw, kernel, monkeypatch):
    """The decode MoE path (fused router+shared; routed experts through the C kernel, or without a
    compiler through routed_rows) == the grouped training path on random inputs, including
    group-limited routing and no shared expert."""
    from sputnik.kernels import cpu as cpu_kernels
    from sputnik.model.moe import MoE
    from sputnik.inference.moe_decode import moe_decode_weights, moe_few_tokens

    if kernel and not cpu_kernels.routed_ffn_available():
        pytest.skip("no C compiler: the CPU MoE kernel cannot be built")
    monkeypatch.setattr(cpu_kernels, "routed_ffn_available", lambda: kernel)
    model = _v3(**kw)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    with torch.no_grad():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
        for n in (1, 2, 5):
            x_1ND = torch.randn(1, n, model.config.hidden_size)
            ref, _ = moe(x_1ND)  # the model's own (grouped) path
            torch.testing.assert_close(moe_few_tokens(moe, x_1ND[0]), ref[0], atol=1e-5, rtol=1e-5)
        assert ("gate_up_packed" in moe_decode_weights(moe)) == kernel


def test_padded_experts_equal_the_grouped_path(monkeypatch):
    """The CPU multi-thread decode path for >= 16 tokens (experts padded to a common capacity, two
    bmm's) == the grouped sum, both when it is taken and for routing too skewed for it."""
    from sputnik.model import moe as moe_lib
    from sputnik.inference import moe_decode

    taken = []
    padded_fn = moe_decode.routed_experts_padded
    monkeypatch.setattr(moe_decode, "routed_experts_padded", lambda *a: taken.append(a[-1]) or padded_fn(*a))
    model = _v3(n_routed_experts=16)
    moe = next(m for m in model.modules() if isinstance(m, moe_lib.MoE))
    w = {"gate_up_ED2I": moe.experts.gate_up_proj.detach().transpose(1, 2).contiguous(),
         "down_EID": moe.experts.down_proj.detach().transpose(1, 2).contiguous()}
    E, K = moe.num_experts, moe.top_k
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for n, skew in ((16, False), (40, False), (40, True)):
            x_ND = torch.randn(n, model.config.hidden_size)
            idx_NK = torch.stack([torch.randperm(E)[:K] for _ in range(n)])
            if skew:  # every token picks experts 0 and 1: capacity n, E·n = 16n > 4·n·K -> grouped path
                idx_NK = torch.tensor([[0, 1]] * n)
            weight_NK = torch.rand(n, K)
            counts_E = torch.bincount(idx_NK.flatten(), minlength=E)
            ref = moe_lib.routed_experts_grouped(x_ND, idx_NK, weight_NK, w["gate_up_ED2I"].transpose(1, 2),
                                                 w["down_EID"].transpose(1, 2), counts_E)
            got = moe_decode._routed_rows(x_ND, idx_NK, weight_NK, w["gate_up_ED2I"], w["down_EID"])
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            assert len(taken) == (0 if skew else 1)
            taken.clear()
            padded = padded_fn(x_ND, idx_NK, weight_NK, w["gate_up_ED2I"], w["down_EID"],
                                                   counts_E, int(counts_E.max()))
            torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_gathered_experts_equal_the_grouped_path():
    """The compiled CPU decode path for a few tokens (each slot's expert weights gathered, two reductions)
    == the grouped sum, with experts shared between tokens and repeated within the batch."""
    from sputnik.model import moe as moe_lib
    from sputnik.inference import moe_decode

    model = _v3(n_routed_experts=16)
    moe = next(m for m in model.modules() if isinstance(m, moe_lib.MoE))
    E, K = moe.num_experts, moe.top_k
    gate_up_E2ID, down_EDI = moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach()
    for n in (1, 3, 16, 64):
        x_ND = torch.randn(n, model.config.hidden_size)
        idx_NK = torch.stack([torch.randperm(E)[:K] for _ in range(n)])
        idx_NK[-1] = idx_NK[0]  # two tokens on the same experts
        weight_NK = torch.rand(n, K)
        ref = moe_lib.routed_experts_grouped(x_ND, idx_NK, weight_NK, gate_up_E2ID, down_EDI,
                                             torch.bincount(idx_NK.flatten(), minlength=E))
        got = moe_decode.routed_experts_gathered(x_ND, idx_NK, weight_NK, moe.experts.gate_up_proj, moe.experts.down_proj)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_cached_weights_follow_optimizer_updates():
    """Derived decode weights are rebuilt after an in-place update (an optimizer step between RL
    rollouts): forward_cached keeps matching the full forward. They are kept outside the model."""
    from sputnik.inference.decoders import cached_model

    model = _v3()
    cm = cached_model(model)
    ids = torch.randint(0, 64, (2, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        with torch.no_grad():
            full = model(ids).logits
            cache = cm.new_cache(2, 8)
            cached = cm.forward_cached(ids, cache, torch.zeros(2, dtype=torch.long))
        assert not [k for m in model.modules() for k in vars(m) if "decode" in k]  # nothing stashed on modules
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
        model(ids, ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_static_decode_step_equals_forward_cached_and_follows_updates():
    """The one-token step, eagerly over the written prefix (cm.step) and over the whole buffer under a
    −inf bias (deepseek.static_step: no host sync, the shape the compiled step has) == forward_cached's
    last row, for ragged rows, before and after an SGD step. All through torch (kernels off): the C
    step and C prefill, which would otherwise serve both sides, are checked in test_deepseek_decode.py."""
    from sputnik.inference.decoders import cached_model
    from sputnik.inference.deepseek import static_step
    from sputnik.kernels import cpu as cpu_kernels

    model = _v3(n_group=2, topk_group=1)
    cm = cached_model(model)
    ids = torch.randint(0, 64, (3, 5))
    seqlens_B = torch.tensor([5, 3, 4])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        with torch.no_grad(), cpu_kernels.kernels_off():
            a, b, c = cm.new_cache(3, 12), cm.new_cache(3, 12), cm.new_cache(3, 12)
            for cache in (a, b, c):
                cm.forward_cached(ids, cache, torch.zeros(3, dtype=torch.long))
            tok_B = torch.tensor([7, 8, 9])
            for _ in range(3):
                ref = cm.forward_cached(tok_B[:, None], a, seqlens_B)[:, -1]
                torch.testing.assert_close(cm.step(tok_B, b, seqlens_B), ref, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(static_step(model, tok_B, c, seqlens_B, cm.step_weights()), ref,
                                           atol=1e-5, rtol=1e-5)
                seqlens_B, tok_B = seqlens_B + 1, ref.argmax(-1)
        model(ids, ids).loss.backward()
        opt.step()
        opt.zero_grad()
        seqlens_B = torch.tensor([5, 3, 4])
    with pytest.raises(ValueError, match="cache overflow"):
        cm.step(tok_B, b, torch.tensor([12, 0, 0]))


@pytest.mark.slow  # one torch.compile: ~40-90 s on 2 shared cores
def test_compiled_decode_equals_eager_and_never_uses_stale_weights(monkeypatch):
    """Engine(compile=True): the torch.compile'd step (on CPU: static shapes, one graph per batch
    bucket of the decode-graph runner) gives the eager step's logits, also as rows finish and the batch
    moves to smaller buckets, and after an optimizer step (RL updates weights between generate() calls)
    it decodes with the new weights: tokens and log-probs equal the eager engine's each time. The
    routed experts run gathered in the graph up to 2 rows and, where it builds, through the C kernel
    as an opaque op from 3 (the bucket of 4). The one-call C step, which compile=True prefers where it
    runs (test_deepseek_decode.py), is kept out."""
    from sputnik.inference import deepseek_decode, moe_decode

    monkeypatch.setattr(moe_decode, "GATHER_MAX_TOKENS_KERNEL", 2)
    monkeypatch.setattr(deepseek_decode, "supported", lambda model: False)
    model = _v3()
    prompts = [[1, 2, 3], [4, 5], [6]]
    # Sampled (same seed on both sides) with frequent stop tokens, so rows finish at different steps
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, stop_token_ids=tuple(range(0, 64, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    ids = torch.randint(0, 64, (2, 6))
    for _ in range(2):
        eager = Engine(model, compile=False).generate(prompts, params)
        fast = Engine(model, compile=True)
        compiled = fast.generate(prompts, params)
        assert not fast.decoder.failed and fast.decoder.stats["replays"] > 0
        assert len({len(e[0].token_ids) for e in eager}) > 1  # rows finished apart: compaction ran
        for e, c in zip(eager, compiled):
            assert e[0].token_ids == c[0].token_ids
            torch.testing.assert_close(torch.tensor(c[0].logprobs), torch.tensor(e[0].logprobs), atol=1e-4, rtol=0)
        model.train()
        model(ids, ids).loss.backward()
        opt.step()
        opt.zero_grad()
        model.eval()


@pytest.mark.parametrize("arch", ["deepseek_v3", "llama"])
def test_prefill_last_position_logits_equal_full_prefill(arch):
    """forward_cached(..., logits_at_B=lens−1) == the full prefill's logits at each row's last token."""
    from sputnik.model import build_model
    from sputnik.model.config import tiny_dense

    if arch == "llama":
        torch.manual_seed(0)
        model = build_model(tiny_dense(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=64)).eval()
    else:
        model = _v3()
    ids = torch.randint(0, 64, (3, 6))
    last_B = torch.tensor([5, 2, 3])
    zeros = torch.zeros(3, dtype=torch.long)
    from sputnik.inference.decoders import cached_model

    cm = cached_model(model)
    with torch.no_grad():
        full = cm.forward_cached(ids, cm.new_cache(3, 8), zeros)
        last = cm.forward_cached(ids, cm.new_cache(3, 8), zeros, logits_at_B=last_B)
    torch.testing.assert_close(last, full[torch.arange(3), last_B], atol=1e-5, rtol=1e-5)


def test_generation_stops_at_the_models_context_per_prompt():
    """max_new_tokens past the context (64 positions here): each prompt generates only what its own
    length leaves (finish_reason "length"), batched or alone the same; a prompt that fills the
    context is a clear error, not a cache overflow deep inside."""
    model = _v3()
    long_p, short_p = list(range(1, 61)), [5, 6, 7]
    params = SamplingParams(max_new_tokens=20, temperature=0)
    both = Engine(model).generate([long_p, short_p], params)
    assert len(both[0][0].token_ids) == 4 and both[0][0].finish_reason == "length"  # 60 + 4 = 64
    assert len(both[1][0].token_ids) == 20  # the short prompt is not cut by its long neighbour
    for prompt, got in zip([long_p, short_p], both):
        assert Engine(model).generate([prompt], params)[0][0].token_ids == got[0].token_ids
    with pytest.raises(ValueError, match="a prompt has 64 tokens; the model's context is 64"):
        Engine(model).generate([list(range(1, 65))], params)
