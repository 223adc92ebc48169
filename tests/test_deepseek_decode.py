"""Our DeepSeek-V3's decode step and prefill in one C call (kernels/deepseek_step.c via
inference/deepseek_decode.py): values against the torch path for each router rule and layout switch
(V3's biased sigmoid with node-limited groups, V2's softmax, gates renormalised or not, scaled, shared
experts or none, a dense first layer or every FFN dense, no query low-rank, W_UK/W_UV folded in or
applied per token), ragged rows, thread-count independence, in-place weight updates, when it steps
aside (kernels off, bf16, Abacus, a replaying routing tape), what a recording tape gets, and bad input."""
import pytest
import torch

from sputnik.inference import deepseek_decode
from sputnik.inference.deepseek import DeepSeekCachedModel
from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams
from sputnik.kernels import cpu as cpu_kernels
from sputnik.kernels.cpu import kernels_off
from sputnik.model import build_model
from sputnik.model.config import tiny
from sputnik.model.moe import MoE
from sputnik.model.routing_replay import recording, replaying

needs_kernel = pytest.mark.skipif(cpu_kernels.deepseek_step_library() is None or not cpu_kernels.routed_ffn_available(),
                                  reason="no C compiler for the CPU kernels")

VARIANTS = {
    "v3-sigmoid-groups": dict(n_group=4, topk_group=2, routed_scaling_factor=2.5),
    "v3-one-group-unnormalised": dict(norm_topk_prob=False, routed_scaling_factor=1.5),
    "v2-softmax": dict(topk_method="greedy"),
    "v2-softmax-groups": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "no-shared-expert": dict(n_shared_experts=0),
    "two-shared-no-dense-layer": dict(n_shared_experts=2, first_k_dense_replace=0),
    "no-query-low-rank": dict(q_lora_rank=0),
    "every-ffn-dense": dict(first_k_dense_replace=3),  # moe_vs_dense's MLA twin
    # C·Q = 2048 > 2(N·Q + N·C) = 1536 and D·C > 2(D·V + V·C): W_UK and W_UV stay out of W_q and W_o
    "unabsorbed": dict(kv_lora_rank=64),
    "unabsorbed-v2-lite-like": dict(kv_lora_rank=64, q_lora_rank=0, topk_method="greedy", n_shared_experts=2),
}


def v3(**kw):
    """A small model whose MLA is absorbed by default (C·Q ≤ 2(N·Q + N·C)), with norms, biases and the router's
    selection bias moved off their initial values so that a skipped one changes the logits."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, hidden_size=48, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=80,
               moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=1,
               topk_group=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64, initializer_range=0.1,
               num_nextn_predict_layers=0)
    model = build_model(tiny(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        for block in model.model.layers:
            if isinstance(block.mlp, MoE) and not block.mlp.gate.softmax:
                block.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def prompts(model, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (len(lens), max(lens)), generator=g)


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_c_step_equals_the_torch_path(variant):
    """A ragged prefill (every position's logits, and only each row's last), then 10 decode steps of
    ragged rows: logits and every cache entry written equal to the torch path's (kernels off)."""
    model = v3(**VARIANTS[variant])
    cm = DeepSeekCachedModel(model)
    assert cm.step_weights()["c_step"] is not None
    ids = prompts(model, [7, 4, 6])
    seq0 = torch.tensor([0, 3, 1])
    caches = {}
    for kernels in (True, False):
        with (kernels_off() if not kernels else torch.no_grad()):
            cache = cm.new_cache(3, 32)
            every = cm.forward_cached(ids, cache, seq0)
            last = cm.forward_cached(ids[:, :2], cm.new_cache(3, 32), seq0, logits_at_B=torch.tensor([1, 0, 1]))
            seq = seq0 + ids.shape[1]
            steps, w = [], cm.step_weights()
            assert (w["c_step"] is not None) == kernels
            for t in range(10):
                tok = ids[:, t % ids.shape[1]]
                steps.append(cm.step(tok, cache, seq, w))
                seq = seq + torch.tensor([1, 0, 1]) + (t % 2)  # rows advance unevenly
            caches[kernels] = (every, last, torch.stack(steps), cache)
    (e1, l1, s1, c1), (e0, l0, s0, c0) = caches[True], caches[False]
    assert e1.shape == e0.shape == (3, 7, 96) and l1.shape == (3, 96)
    torch.testing.assert_close(e1, e0, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(l1, l0, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(s1, s0, atol=2e-5, rtol=1e-4)
    for a, b in zip(c1.kv_BSX, c0.kv_BSX):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert s1.abs().max() > 0.1  # real logits, not zeros


@needs_kernel
@torch.no_grad()
def test_the_result_does_not_depend_on_the_thread_count():
    model = v3(n_group=4, topk_group=2)
    cm = DeepSeekCachedModel(model)
    ids = prompts(model, [9, 9, 9, 9, 9])
    threads, out = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            cache = cm.new_cache(5, 16)
            prefill = cm.forward_cached(ids, cache, torch.zeros(5, dtype=torch.long))
            out.append((prefill, cm.step(ids[:, 0], cache, torch.full((5,), 9))))
    finally:
        torch.set_num_threads(threads)
    for prefill, step in out[1:]:
        assert torch.equal(prefill, out[0][0]) and torch.equal(step, out[0][1])


@needs_kernel
def test_in_place_weight_updates_are_seen():
    """An optimizer step between waves (RL): the table is rebuilt over refreshed copies, and the C step
    follows the new weights (equal to the torch path on them, different from before)."""
    model = v3()
    cm = DeepSeekCachedModel(model)
    ids = prompts(model, [5, 5])
    zeros = torch.zeros(2, dtype=torch.long)

    def logits():
        with torch.no_grad():
            return cm.forward_cached(ids, cm.new_cache(2, 8), zeros, logits_at_B=torch.tensor([4, 4]))

    before = logits()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(ids).logits.square().mean().backward()
    opt.step()
    model.eval()
    after = logits()
    with kernels_off():
        want = logits()
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, want, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_it_steps_aside_where_it_cannot_run(monkeypatch):
    """Kernels off, bf16 weights, Abacus places: no table. A replaying routing tape (the RL update's
    forward hooks the router's Python call): the torch path, same values."""
    with kernels_off():
        assert DeepSeekCachedModel(v3()).step_weights()["c_step"] is None
    assert DeepSeekCachedModel(v3().to(torch.bfloat16)).step_weights()["c_step"] is None
    abacus = v3(abacus_max_index=8, abacus_digit_ids=list(range(10, 20)))
    assert DeepSeekCachedModel(abacus).step_weights()["c_step"] is None

    model = v3()
    cm = DeepSeekCachedModel(model)
    ids = prompts(model, [4, 4])
    calls = []
    real = deepseek_decode.forward_tokens
    monkeypatch.setattr(deepseek_decode, "forward_tokens", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        cache = cm.new_cache(2, 8)
        want = cm.forward_cached(ids, cache, torch.zeros(2, dtype=torch.long))
        assert calls  # the C prefill ran
        calls.clear()
        replay = torch.full((8, 2, 3), -1, dtype=torch.long)  # every token keeps its own experts
        with replaying(model, replay) as tape:
            got = cm.forward_cached(ids, cm.new_cache(2, 8), torch.zeros(2, dtype=torch.long))
        assert not calls and tape.compared == 0  # the routers ran in Python: the torch path
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernel
@torch.no_grad()
def test_a_recording_tape_gets_the_experts_the_c_call_chose():
    """RL rollouts with routing replay record each token's experts: through the C prefill and steps
    they are the ones the torch path records for the same tokens (as sets), row-major over [B, T]."""
    model = v3(n_group=4, topk_group=2)
    cm = DeepSeekCachedModel(model)
    ids = prompts(model, [6, 6, 6])
    steps = prompts(model, [3, 3, 3], seed=4)
    recorded = {}
    for kernels in (True, False):
        with (kernels_off() if not kernels else torch.no_grad()):
            cache = cm.new_cache(3, 16)
            with recording(model) as tape:
                cm.forward_cached(ids, cache, torch.zeros(3, dtype=torch.long))
                prefill = tape.take()
                w = cm.step_weights()
                for t in range(3):
                    cm.step(steps[:, t], cache, torch.full((3,), 6 + t), w)
                recorded[kernels] = (prefill, tape.take())
    (p1, s1), (p0, s0) = recorded[True], recorded[False]
    assert p1.shape == p0.shape == (18, 2, 3) and s1.shape == s0.shape == (9, 2, 3) and p1.dtype == torch.int16
    assert torch.equal(p1.sort(-1).values, p0.sort(-1).values)
    assert torch.equal(s1.sort(-1).values, s0.sort(-1).values)


@needs_kernel
def test_the_engine_generates_the_same_through_the_c_step():
    """Greedy generation of ragged prompts with several samples each, C step vs torch path: the same
    tokens, log-probs within float tolerance."""
    model = v3()
    rows = [[5, 7, 9], [11, 3], [2, 4, 6, 8, 10]]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    fast = Engine(model).generate(rows, params, num_samples=2)
    with kernels_off():
        plain = Engine(model).generate(rows, params, num_samples=2)
    for a_row, b_row in zip(fast, plain, strict=True):
        for a, b in zip(a_row, b_row, strict=True):
            assert a.token_ids == b.token_ids and len(a.token_ids) == 12
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


@needs_kernel
@torch.no_grad()
def test_bad_input_is_a_clear_error_and_writes_nothing():
    model = v3()
    cm = DeepSeekCachedModel(model)
    cache = cm.new_cache(2, 8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cm.forward_cached(torch.tensor([[1, 2], [3, 96]]), cache, torch.zeros(2, dtype=torch.long))
    assert all(b.abs().max() == 0 for b in cache.kv_BSX)
    with pytest.raises(ValueError, match="cache overflow"):
        cm.forward_cached(torch.tensor([[1, 2], [3, 4]]), cache, torch.tensor([7, 0]))
    with pytest.raises(ValueError, match="cache overflow"):
        cm.step(torch.tensor([1, 2]), cache, torch.tensor([8, 0]))
    table = cm.step_weights()["c_step"]
    with pytest.raises(ValueError, match="outside the cache"):
        deepseek_decode.forward_tokens(table, torch.tensor([1]), torch.tensor([2]), torch.tensor([0]), cache,
                                       torch.tensor([0]))
    with pytest.raises(ValueError, match="output index"):
        deepseek_decode.forward_tokens(table, torch.tensor([1]), torch.tensor([0]), torch.tensor([0]), cache,
                                       torch.tensor([1]))
    assert all(b.abs().max() == 0 for b in cache.kv_BSX)
