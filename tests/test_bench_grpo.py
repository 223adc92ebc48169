"""Smoke test of benchmarks/bench_grpo_step.py, our side only (TRL is not needed): one GRPO step
on a micro DeepSeek-V3 config runs, generates exactly the requested number of tokens per
completion, and changes the weights."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_grpo_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_grpo_step", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def micro_setup():
    from sputnik.model import build_model
    from sputnik.model.config import tiny
    from sputnik.tokenizer import train_tokenizer

    tok = train_tokenizer([f"What is {a}+{b}? Answer: {a + b}" for a in range(10, 40) for b in range(10, 40)], 300)
    cfg = tiny(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
               moe_intermediate_size=16, n_routed_experts=4, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
               qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_nextn_predict_layers=0)
    return build_model(cfg), tok


def test_reward(bench):
    assert bench.addition_reward("57", "57") == pytest.approx(1.1)
    assert bench.addition_reward("ab", "57") == 0.0
    assert bench.addition_reward("5a", "57") == pytest.approx(0.05)


@pytest.mark.parametrize("amp", [False, True])
def test_ours_step_runs(bench, amp):
    model, tok = micro_setup()
    st = bench.make_ours(model, tok, "cpu", tokens=4, amp=amp)  # amp: the GPU path's autocast, on CPU
    before = [p.detach().clone() for p in model.parameters()]
    rec = bench.ours_step(st, bench.make_prompts(bench.PROMPTS_PER_STEP))
    assert rec["completion_tokens"] == bench.PROMPTS_PER_STEP * bench.GROUP * 4
    assert rec["step"] >= rec["rollout"] + rec["update"]
    assert torch.isfinite(torch.tensor(rec["loss"]))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
