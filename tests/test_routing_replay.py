"""Routing replay for MoE in RL (model/routing_replay.py): the engine records the experts every token
was routed to, exactly as a training forward routes it; replaying a routing makes a forward use those
experts with its own gates; and in RL, when the sampler routed differently from the trainer (here:
another expert-selection bias, the same weights otherwise), replay makes the update's log-probs the
sampler's again, in the plain and the shared-prompt forward, and the RL stage reports the mismatch."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from sputnik.config import build
from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams
from sputnik.model import build_model
from sputnik.model.config import tiny, tiny_dense
from sputnik.model.moe import routed_experts_loop
from sputnik.model.routing_replay import recording, replaying, routed_layers
from sputnik.rl.rollout import build_rollout_batch, logprobs, replay_layout, shares_prompts
from sputnik.stages import rl

DEEPSEEK = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2,
                intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                num_nextn_predict_layers=0, max_position_embeddings=128, initializer_range=0.1)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]


def deepseek():
    torch.manual_seed(0)
    return build_model(tiny(**DEEPSEEK)).eval()


def qwen3_moe(tmp_path):
    from sputnik.model.hf_llama import load_hf_llama

    hc = Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=16, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                        norm_topk_prob=True, max_position_embeddings=128, initializer_range=0.1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hc).save_pretrained(tmp_path / "qwen3_moe")
    return load_hf_llama(tmp_path / "qwen3_moe").eval()


def training_routing(model, seq):
    with recording(model) as tape:
        model.hidden_states(torch.tensor([seq]))
        return tape.take()


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_recorded_rollout_routing_is_the_training_forwards(arch, tmp_path):
    model = deepseek() if arch == "deepseek_v3" else qwen3_moe(tmp_path)
    L = len(routed_layers(model))
    assert L == (2 if arch == "deepseek_v3" else 2)
    # stop tokens end rows at different steps: compaction reorders the live rows under the recorder
    params = SamplingParams(max_new_tokens=9, temperature=1.0, seed=2, stop_token_ids=list(range(0, 64, 5)))
    out = Engine(model).generate(PROMPTS, params, num_samples=3, record_routing=True)
    lengths = {len(c.token_ids) for row in out for c in row}
    assert len(lengths) > 2 and any(c.finish_reason == "stop" for row in out for c in row)
    for prompt, row in zip(PROMPTS, out):
        for c in row:  # every token the model read: the prompt and all but the last sampled token
            assert c.routing.shape == (len(prompt) + len(c.token_ids) - 1, L, 2) and c.routing.dtype == torch.int16
            own = training_routing(model, prompt + c.token_ids[:-1])
            assert torch.equal(c.routing.sort(-1).values, own.sort(-1).values)
    # without recording nothing is attached, and the samples are the same
    plain = Engine(model).generate(PROMPTS, params, num_samples=3)
    assert [[c.token_ids for c in r] for r in plain] == [[c.token_ids for c in r] for r in out]
    assert all(c.routing is None for r in plain for c in r)


def test_replay_uses_the_given_experts_with_the_routers_own_gates():
    model = deepseek()
    moe = model.model.layers[1].mlp
    torch.manual_seed(1)
    x_ND = torch.randn(12, 32)
    own_idx, own_w, scores_NE = moe.gate(x_ND)
    y_own = moe(x_ND[None])[0][0]
    # replaying the router's own choice changes nothing
    replay = torch.full((12, 2, 2), -1, dtype=torch.int16)
    replay[:, 0] = own_idx
    with replaying(model, replay) as tape:
        assert torch.equal(moe(x_ND[None])[0][0], y_own)
    assert tape.compared == 12 and tape.differed == 0
    # another choice for half the rows (−1 keeps the router's own for the rest)
    other = (own_idx + 3) % 8
    replay[:6, 0] = other[:6]
    with replaying(model, replay) as tape:
        y = moe(x_ND[None])[0][0]
    assert tape.compared == 12 and tape.differed == 6
    idx = torch.cat([other[:6], own_idx[6:]])
    w = scores_NE.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * moe.gate.routed_scaling_factor
    ref = routed_experts_loop(x_ND, idx, w, moe.experts.gate_up_proj, moe.experts.down_proj) + moe.shared_experts(x_ND)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # measuring only: the router's own experts, the disagreement counted
    with replaying(model, replay, apply=False) as tape:
        assert torch.equal(moe(x_ND[None])[0][0], y_own)
    assert tape.differed == 6
    with pytest.raises(ValueError, match="covers 12 token rows, layer 0 routes 5"):
        with replaying(model, replay):
            moe(x_ND[None, :5])


def test_replay_refuses_models_without_experts_and_nested_tapes():
    with pytest.raises(ValueError, match="no routed MoE layers"):
        recording(build_model(tiny_dense(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64))).__enter__()
    model = deepseek()
    with recording(model):
        with pytest.raises(RuntimeError, match="already active"):
            with recording(model):
                pass


def rollouts_under_another_bias(model, shift: float):
    """Rollouts sampled while the routers' selection bias was shifted (the sampler's routing), then the
    bias restored: the trainer now routes some tokens elsewhere with the very same weights."""
    gates = routed_layers(model)
    torch.manual_seed(3)
    saved = [g.e_score_correction_bias.clone() for g in gates]
    for g in gates:
        g.e_score_correction_bias.copy_(shift * torch.randn(8))
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    out = Engine(model).generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=5), num_samples=4,
                                 record_routing=True)
    for g, b in zip(gates, saved):
        g.e_score_correction_bias.copy_(b)
    rows = [(p, c) for p, row in zip(prompts, out) for c in row]
    return build_rollout_batch([p for p, _ in rows], [c.token_ids for _, c in rows], [c.logprobs for _, c in rows],
                               pad_id=0, routing=[c.routing for _, c in rows])


@pytest.mark.parametrize("shared", [False, True])
def test_replay_makes_the_update_logprobs_the_samplers(shared):
    model = deepseek()
    batch = rollouts_under_another_bias(model, shift=0.05)
    assert not shared or shares_prompts(model, batch, "always")
    mask = batch.completion_mask_BT
    gap = lambda lp: float(((lp - batch.sampler_logp_BT).abs() * mask).sum() / mask.sum())  # noqa: E731
    with torch.no_grad():
        free, _, _ = logprobs(model, batch, shared=shared)
        with replaying(model, replay_layout(batch, shared), apply=False) as measured:
            logprobs(model, batch, shared=shared)
        with replaying(model, replay_layout(batch, shared)) as tape:
            replayed, _, _ = logprobs(model, batch, shared=shared)
    # under replay the later layers see the sampler's hidden states, so their own choices differ less
    assert 0.02 < measured.mismatch < 0.9 and 0.02 < tape.mismatch <= measured.mismatch
    assert gap(free) > 1e-3  # the trainer's own routing scores the samples under another network
    assert gap(replayed) < 1e-5  # the sampler's experts: the sampler's log-probs
    # replayed gates still carry gradients to the router
    model.train()
    with replaying(model, replay_layout(batch, shared)):
        lp, _, _ = logprobs(model, batch, shared=shared)
    (lp * mask).sum().backward()
    assert routed_layers(model)[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
def test_rl_stage_reports_routing_mismatch_and_replays(tmp_path):
    from test_rl_stage import _cfg, make_policy

    policy = make_policy(tmp_path / "policy")
    for mode in ("measure", "on"):
        rl.run(_cfg(policy, tmp_path / mode, steps=1, group_size=4, routing_replay=mode))
        rec = [json.loads(x) for x in (tmp_path / mode / "rl" / "metrics.jsonl").read_text().splitlines()][1]
        assert rec["routing_mismatch"] == 0.0  # fp32, same weights: the same experts here
        assert rec["logp_mismatch"] < 1e-4
        assert ("logp_mismatch_free_routing" in rec) == (mode == "on")
    dense = tmp_path / "dense"
    from sputnik.tasks import corpus_text
    from sputnik.tokenizer import train_tokenizer
    from sputnik.train.loading import save_model

    cfg = tiny_dense(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    save_model(build_model(cfg), dense / "model", train_tokenizer(corpus_text(["addition"], 300, seed=0), 320), cfg)
    with pytest.raises(ValueError, match="routing_replay=on: the model .* has no routed MoE layers"):
        rl.run(_cfg(dense / "model", tmp_path / "d", steps=1, routing_replay="on"))
    assert build(rl.Config, dict(init="x", routing_replay="off")).routing_replay == "off"
