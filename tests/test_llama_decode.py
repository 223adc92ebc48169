"""The dense family's decode step in one C call (kernels/llama_step.c via inference/llama_decode.py):
values against the torch step for every family switch (biases, q/k norm, sliding window, GQA/MQA,
tied and untied heads), ragged rows, thread-count independence, in-place weight updates and LoRA's
merged weights, Qwen3-MoE's sparse layers (prefill too), when it steps aside (bf16, kernels off, a routing
tape, more rows than it takes), and
bad input."""
import contextlib

import pytest
import torch

from sputnik.inference.engine import Engine
from sputnik.inference.llama import LlamaCachedModel
from sputnik.inference.llama_decode import MAX_ROWS, decode_weights, fused_step
from sputnik.inference.sampling import SamplingParams
from sputnik.kernels import cpu as cpu_kernels
from sputnik.model import build_model
from sputnik.model.config import tiny_dense

needs_kernel = pytest.mark.skipif(cpu_kernels.llama_step_library() is None, reason="no C compiler for the CPU kernel")

FAMILIES = {
    "llama-gqa": {},
    "llama-mqa-untied": dict(num_key_value_heads=1, tie_word_embeddings=False),
    "qwen2-bias": dict(family="qwen2", qkv_bias=True),
    "qwen3-qk-norm": dict(family="qwen3", qk_norm=True, head_dim=24),
    "mistral-window": dict(family="mistral", sliding_window=5),
    "llama-o-bias": dict(o_proj_bias=True, qkv_bias=True),
    "qwen3-moe": dict(family="qwen3_moe", qk_norm=True, head_dim=24, n_routed_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, mlp_only_layers=(1,)),
    "qwen3-moe-unnormalised": dict(family="qwen3_moe", qk_norm=True, n_routed_experts=8, num_experts_per_tok=3,
                                   moe_intermediate_size=16, norm_topk_prob=False),
}


def dense(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=80, max_position_embeddings=64, initializer_range=0.1)
    model = build_model(tiny_dense(**{**cfg, **kw})).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: move them so a skipped one changes the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def prefilled(model, lens, max_len=24, seed=1, torch_b=False):
    """Two caches holding the same ragged prompts (lens tokens per row) -> (cm, cache_a, cache_b).
    torch_b: cache_b prefilled by the torch path (kernels off), the reference of a C-vs-torch test."""
    cm = LlamaCachedModel(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (len(lens), max(lens)), generator=g)
    caches = []
    for i in range(2):
        cache = cm.new_cache(len(lens), max_len)
        with cpu_kernels.kernels_off() if torch_b and i == 1 else contextlib.nullcontext():
            cm.forward_cached(ids, cache, torch.zeros(len(lens), dtype=torch.long))
        caches.append(cache)
    return cm, *caches


def torch_step(cm, tok, cache, lens):
    """The reference: the eager torch step (kernels off: neither the C step nor the C prefill)."""
    with cpu_kernels.kernels_off():
        return cm.step(tok, cache, lens, None)


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_step_equals_the_torch_step(family):
    """Ragged rows decoded for 12 steps (past the sliding window), every step's logits and the cache
    entries it writes equal to the torch step's (prefill and steps with the kernels off)."""
    model = dense(**FAMILIES[family])
    lens = torch.tensor([7, 3, 10])
    cm, ours, _ = prefilled(model, lens.tolist())
    with cpu_kernels.kernels_off():
        _, ref, _ = prefilled(model, lens.tolist())
    weights = cm.step_weights()
    assert weights is not None
    g = torch.Generator().manual_seed(2)
    for t in range(12):
        tok = torch.randint(0, model.config.vocab_size, (3,), generator=g)
        got = cm.step(tok, ours, lens + t, weights)
        with cpu_kernels.kernels_off():
            want = cm.step(tok, ref, lens + t, None)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert want.std() > 0.1
    torch.testing.assert_close(ours.k_LBKSC, ref.k_LBKSC, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.v_LBKSC, ref.v_LBKSC, atol=1e-5, rtol=1e-5)


@needs_kernel
@torch.no_grad()
def test_fused_step_does_not_depend_on_the_thread_count():
    model = dense()
    lens = torch.tensor([5, 8])
    cm, a, b = prefilled(model, lens.tolist())
    weights, tok = cm.step_weights(), torch.tensor([3, 7])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cm.step(tok, a, lens, weights)
        torch.set_num_threads(2)
        two = cm.step(tok, b, lens, weights)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(a.k_LBKSC, b.k_LBKSC)


@needs_kernel
@torch.no_grad()
def test_table_reads_the_parameters_in_place():
    """An optimizer step updates parameters in place: the next step sees it through the same table."""
    model = dense()
    lens = torch.tensor([6])
    cm, a, b = prefilled(model, lens.tolist(), torch_b=True)
    weights = cm.step_weights()
    model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    model.model.norm.weight.add_(0.3)
    tok = torch.tensor([4])
    torch.testing.assert_close(cm.step(tok, a, lens, weights), torch_step(cm, tok, b, lens), atol=2e-5, rtol=1e-5)


@needs_kernel
@torch.no_grad()
def test_lora_layers_decode_through_their_merged_weight():
    from sputnik.config import LoRAConfig
    from sputnik.train.lora import apply_lora, lora_modules

    model = dense()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")))
    for m in lora_modules(model).values():
        m.lora_B.normal_(0, 0.1)
    lens = torch.tensor([6, 2])
    cm, a, b = prefilled(model, lens.tolist(), torch_b=True)
    tok = torch.tensor([4, 9])
    got = cm.step(tok, a, lens, cm.step_weights())
    # the reference: LoRALinear's own forward (x W^T + s x A^T B^T, unmerged), through the torch step
    torch.testing.assert_close(got, torch_step(cm, tok, b, lens), atol=2e-5, rtol=1e-5)


@needs_kernel
def test_engine_generates_the_same_tokens_with_the_kernel_and_without():
    model = dense(family="qwen3", qk_norm=True, head_dim=24)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12]]
    params = SamplingParams(max_new_tokens=15, temperature=0)
    fused = Engine(model).generate(prompts, params, num_samples=2)
    with cpu_kernels.kernels_off():
        plain = Engine(model).generate(prompts, params, num_samples=2)
    for row_a, row_b in zip(fused, plain, strict=True):
        for a, b in zip(row_a, row_b, strict=True):
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


@needs_kernel
def test_the_fused_step_steps_aside(monkeypatch):
    model = dense()
    assert decode_weights(model.to(torch.bfloat16)) is None
    with cpu_kernels.kernels_off():
        assert decode_weights(dense()) is None
    # more rows than the kernel takes: the step does not call it, and equals the torch step
    import sputnik.inference.llama as llama_inference

    model = dense()
    lens = torch.full((MAX_ROWS + 1,), 3)
    cm, a, b = prefilled(model, lens.tolist(), max_len=8, torch_b=True)
    tok = torch.arange(MAX_ROWS + 1) % 90
    calls = []
    real = llama_inference.fused_step
    monkeypatch.setattr(llama_inference, "fused_step", lambda *args: calls.append(args[1].shape[0]) or real(*args))
    with torch.no_grad():
        got = cm.step(tok, a, lens, cm.step_weights())
    assert calls == []
    with torch.no_grad():
        torch.testing.assert_close(got, torch_step(cm, tok, b, lens), atol=2e-5, rtol=1e-5)


@needs_kernel
@torch.no_grad()
def test_bad_input_is_refused_before_anything_is_written():
    model = dense()
    lens = torch.tensor([4])
    cm, cache, _ = prefilled(model, lens.tolist(), max_len=8)
    weights, before = cm.step_weights(), cache.k_LBKSC.clone()
    with pytest.raises(ValueError, match="token id"):
        fused_step(weights, torch.tensor([96]), cache.k_LBKSC, cache.v_LBKSC, lens)
    with pytest.raises(ValueError, match="position"):
        fused_step(weights, torch.tensor([3]), cache.k_LBKSC, cache.v_LBKSC, torch.tensor([8]))
    with pytest.raises(ValueError, match="does not fit"):
        fused_step(weights, torch.tensor([3]), cache.k_LBKSC[:1], cache.v_LBKSC[:1], lens)
    assert torch.equal(cache.k_LBKSC, before)


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize("rows", [8, 19, 23, 27])
def test_packed_weights_from_eight_rows(rows):
    """From PACKED_MIN_ROWS rows the step reads strip-packed copies and its inputs regrouped in register
    blocks (8; 12+4+2+1; 12+8+2+1; 12+12+2+1 rows; widths 48 and 80 and a 96-token head that are not
    multiples of the strip width): same values as the torch step; the copy is refreshed when a
    parameter changes between waves."""
    from sputnik.inference.llama_decode import PACKED_MIN_ROWS

    assert rows >= PACKED_MIN_ROWS
    model = dense(family="qwen2", qkv_bias=True)
    lens = torch.arange(rows) % 9 + 2
    cm, ours, ref = prefilled(model, lens.tolist(), torch_b=True)
    g = torch.Generator().manual_seed(3)
    for t in range(3):
        tok = torch.randint(0, model.config.vocab_size, (rows,), generator=g)
        torch.testing.assert_close(cm.step(tok, ours, lens + t, cm.step_weights()), torch_step(cm, tok, ref, lens + t),
                                   atol=2e-5, rtol=1e-5)
        model.model.layers[0].mlp.up_proj.weight.mul_(1.25)  # an optimizer step before the next wave
        model.lm_head.weight.add_(0.01)


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize("family", ["llama-gqa", "mistral-window", "qwen3-qk-norm"])
def test_prefill_in_c_equals_the_torch_prefill(family, monkeypatch):
    """forward_cached through llama_forward (ragged right-padded prompts, a second chunk appended to a
    filled cache, logits of every token or of one per row) == the torch forward, and so are the
    caches; chunked into calls of a few tokens, the same."""
    from sputnik.inference import llama_decode

    model = dense(**FAMILIES[family])
    cm = LlamaCachedModel(model)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 96, (3, 9), generator=g)
    more = torch.randint(0, 96, (3, 4), generator=g)
    lens = torch.tensor([9, 4, 6])

    def run():
        cache = cm.new_cache(3, 20)
        first = cm.forward_cached(ids, cache, torch.zeros(3, dtype=torch.long), logits_at_B=lens - 1)
        second = cm.forward_cached(more, cache, lens)  # every token's logits
        return first, second, cache

    with cpu_kernels.kernels_off():
        want = run()
    got = run()
    monkeypatch.setattr(llama_decode, "PREFILL_TOKENS", 5)  # 1-token time steps for 3 rows
    chunked = run()
    for out in (got, chunked):
        torch.testing.assert_close(out[0], want[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], want[1], atol=2e-5, rtol=1e-5)
        for t, s in zip((out[2].k_LBKSC, out[2].v_LBKSC), (want[2].k_LBKSC, want[2].v_LBKSC)):
            for b, n in enumerate(lens.tolist()):  # the written slots (a pad token's slot is scratch until overwritten)
                torch.testing.assert_close(t[:, b, :, :n + 4], s[:, b, :, :n + 4], atol=1e-5, rtol=1e-5)
    assert want[1].shape == (3, 4, 96) and want[0].std() > 0.1


@needs_kernel
@torch.no_grad()
def test_a_view_of_a_cache_decodes_through_torch():
    """A static cache's first rows (graphs.py) are a strided view the C call cannot write in place:
    prefill and step take the torch path on it, with the same values."""
    model = dense()
    cm = LlamaCachedModel(model)
    big, ref = cm.new_cache(4, 16), cm.new_cache(2, 16)
    view = big.first_rows(2)
    assert not view.k_LBKSC.is_contiguous()
    ids = torch.randint(0, 96, (2, 5))
    zeros = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(cm.forward_cached(ids, view, zeros), cm.forward_cached(ids, ref, zeros), atol=2e-5, rtol=1e-5)
    lens, tok = torch.tensor([5, 5]), torch.tensor([1, 2])
    torch.testing.assert_close(cm.step(tok, view, lens, cm.step_weights()), cm.step(tok, ref, lens, cm.step_weights()),
                               atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(big.k_LBKSC[:, :2, :, :6], ref.k_LBKSC[:, :, :, :6], atol=1e-5, rtol=1e-5)


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen3-moe", "qwen3-moe-unnormalised"])
def test_qwen3_moe_prefill_equals_torch_and_a_routing_tape_takes_the_torch_path(family):
    """Qwen3-MoE through the C forward: a ragged prefill's logits at every position equal the torch
    path's (kernels off), and with a routing tape recording (RL's routing replay) the step goes through
    torch, where the tape sees the router."""
    from sputnik.model.routing_replay import recording

    model = dense(**FAMILIES[family])
    cm = LlamaCachedModel(model)
    assert decode_weights(model) is not None
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=g)
    seq0 = torch.tensor([0, 2, 5])
    got = cm.forward_cached(ids, cm.new_cache(3, 24), seq0)
    with cpu_kernels.kernels_off():
        want = cm.forward_cached(ids, cm.new_cache(3, 24), seq0)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    cache = cm.new_cache(3, 24)
    cm.forward_cached(ids, cache, seq0)
    with recording(model) as tape:
        step = cm.step(ids[:, 0], cache, seq0 + 9, cm.step_weights())
        assert tape.take() is not None  # the router ran in Python: the torch path
    assert step.shape == (3, model.config.vocab_size)
