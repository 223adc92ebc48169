"""Shared-prompt training forward (sputnik/rl/shared_prompts.py, rollout.policy_logprobs_shared):
each distinct prompt computed once for all its completions gives the plain forward's log-probs,
entropies and gradients, and the GRPO update the same step."""
import pytest
import torch

from sputnik.model import build_model
from sputnik.model.config import tiny, tiny_dense
from sputnik.rl.shared_prompts import supports_shared_prompts
from sputnik.rl.rollout import build_rollout_batch, policy_logprobs, policy_logprobs_shared, shared_prompt_rows

BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
            moe_intermediate_size=16, n_routed_experts=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64, initializer_range=0.1)


def _model(**kw):
    torch.manual_seed(0)
    if kw.pop("dense", False):  # the dense families: GQA, and Qwen2's biases / Qwen3's q/k norms as asked
        return build_model(tiny_dense(**{**DENSE, **kw})).train()
    return build_model(tiny(**{**BASE, **kw})).train()


DENSE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64, initializer_range=0.1)


def _groups(seed=1, lengths=None):
    """3 prompts of different lengths x 3 completions of 1-8 tokens (a 1-token completion is
    predicted from the prompt alone), rows in group order but one group split around another."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for p in ([1, 2, 3, 4, 5], [6, 7], [9, 10, 11]):
        for i in range(3):
            n = lengths[len(completions)] if lengths else int(torch.randint(1, 9, (1,), generator=g))
            prompts.append(p)
            completions.append(torch.randint(0, 64, (n,), generator=g).tolist())
    order = [0, 1, 3, 4, 2, 5, 6, 7, 8]  # group 0's third row after group 1's first two
    prompts, completions = [prompts[i] for i in order], [completions[i] for i in order]
    return build_rollout_batch(prompts, completions, [[0.0] * len(c) for c in completions], pad_id=0)


def _logprobs_and_grads(model, fn, batch, weights_BT):
    model.zero_grad()
    logp_BT, ent_BT, _ = fn(model, batch)
    ((logp_BT * weights_BT).sum() + 0.5 * ent_BT.sum()).backward()
    return logp_BT.detach(), ent_BT.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", [{}, dict(q_lora_rank=0), dict(first_k_dense_replace=0), dict(dense=True),
                                dict(dense=True, family="qwen2", qkv_bias=True),
                                dict(dense=True, family="qwen3", qk_norm=True, head_dim=12),
                                dict(abacus_max_index=16, abacus_train_offset=4, abacus_digit_ids=list(range(1, 11)))],
                         ids=["mla-moe", "mla-no-q-lora", "all-moe", "llama-gqa", "qwen2", "qwen3", "abacus"])
def test_shared_prompt_logprobs_and_gradients_equal_the_plain_forward(kw):
    model = _model(**kw)
    batch = _groups(lengths=[3, 1, 8, 5, 2, 7, 4, 4, 6])
    w_BT = torch.randn(batch.targets_BT.shape, generator=torch.Generator().manual_seed(2))
    lp1, e1, g1 = _logprobs_and_grads(model, policy_logprobs, batch, w_BT)
    lp2, e2, g2 = _logprobs_and_grads(model, policy_logprobs_shared, batch, w_BT)
    assert (lp1 != 0).sum() == (batch.targets_BT != -100).sum()
    torch.testing.assert_close(lp2, lp1, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(e2, e1, atol=2e-6, rtol=1e-5)
    assert set(g1) == set(g2) and len(g1) > 25
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-5, rtol=1e-4, msg=name)


def test_prompts_are_deduplicated_and_completions_packed():
    batch = _groups(lengths=[3, 1, 8, 5, 2, 7, 4, 4, 6])
    assert batch.prompt_groups() == [([0, 1, 4], 5), ([2, 3, 5], 2), ([6, 7, 8], 3)]
    prompt_ids, prompt_lens, comp_ids, pack, rows = shared_prompt_rows(batch)
    assert prompt_lens.tolist() == [5, 2, 3] and prompt_ids[1, :2].tolist() == [6, 7]
    assert rows.tolist() == [0, 1, 4, 2, 3, 5, 6, 7, 8] and pack.group_C.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    lens = [2, 0, 7, 4, 1, 6, 3, 3, 5]  # per completion row: n targets - 1 (the first comes from the prompt)
    assert torch.bincount(pack.row_N, minlength=9).tolist() == lens and pack.length == 7
    assert comp_ids[2:9].tolist() == batch.input_ids_BT[4, 5:12].tolist()  # row 4: prompt of 5, 8 targets
    x = torch.randn(len(comp_ids), 3)
    assert torch.equal(pack.unpad(pack.pad(x)), x) and pack.pad(x)[1].abs().sum() == 0


def test_rows_without_targets_and_distinct_prompts():
    """A row with an empty completion adds nothing; all-distinct prompts degrade to one prompt each."""
    model = _model()
    batch = build_rollout_batch([[1, 2], [3, 4, 5], [6]], [[7, 8, 9], [], [10, 11]], [[0.0] * 3, [], [0.0] * 2], 0)
    with torch.no_grad():
        lp1, e1, _ = policy_logprobs(model, batch)
        lp2, e2, _ = policy_logprobs_shared(model, batch)
    torch.testing.assert_close(lp2, lp1, atol=2e-6, rtol=1e-5)
    assert lp2[1].abs().sum() == 0


def test_expert_load_counts_each_prompt_token_once():
    model = _model()
    batch = _groups(lengths=[2] * 9)
    _, _, load = policy_logprobs_shared(model, batch)
    # prompts 5 + 2 + 3 tokens once (their padding not), completions 9 rows x 1 input token; top-2 routing
    assert list(load) == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert [float(v.sum()) for v in load.values()] == [2 * (10 + 9)] * 2
    _, _, plain = policy_logprobs(model, batch)  # the plain forward: each row's prompt (not its padding) again
    assert [float(v.sum()) for v in plain.values()] == [2 * (3 * (5 + 2 + 3) + 9)] * 2


def test_other_models_take_the_plain_path():
    from transformers import LlamaConfig, LlamaForCausalLM

    from sputnik.model.hf_wrapper import HFCausalLM

    mistral = _model(dense=True, family="mistral", sliding_window=4)  # a window reaching into the prompt
    hf = HFCausalLM(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=64)))
    assert supports_shared_prompts(_model()) and supports_shared_prompts(_model(dense=True))
    assert not supports_shared_prompts(mistral) and not supports_shared_prompts(hf)


def test_grpo_update_is_the_same_step_either_way():
    """One DAPO update with and without shared prompts: same loss, gradient norm and new weights."""
    from sputnik.common import DeviceChoice
    from sputnik.train.optim import OptimConfig, build_optimizer
    from sputnik.rl.update import update
    from sputnik.stages.rl import Config as RLConfig

    batch = _groups(lengths=[3, 1, 8, 5, 2, 7, 4, 4, 6])
    batch.sampler_logp_BT = torch.where(batch.targets_BT != -100, -1.0, 0.0)
    adv_B = torch.linspace(-1, 1, batch.targets_BT.shape[0])
    out = []
    for share in ("never", "always"):
        model = _model()
        cfg = RLConfig(init="<test>", share_prompts=share, micro_batch=4,
                       optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.0))
        opt = build_optimizer(model, cfg.optim)
        m = update(model, None, opt, batch, adv_B, cfg, DeviceChoice(torch.device("cpu"), torch.float32, "test"))
        out.append((m, [p.detach().clone() for p in model.parameters()]))
    (m1, w1), (m2, w2) = out
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-7)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    assert m1["grad_norm"] > 0 and (m1["shared_prompts"], m2["shared_prompts"]) == (0, 1)
    # AdamW's first step moves each weight by ~lr·sign(g): where g is ~0 a rounding difference can flip
    # it, so allow a few such elements (at most 2·lr apart) and nothing else
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(w1, w2)])
    assert diff.max() <= 2 * cfg.optim.lr and (diff > 1e-6).float().mean() < 1e-3


def test_auto_shares_prompts_only_when_it_saves_a_third_of_the_tokens():
    from sputnik.rl.rollout import prompt_token_saving, shares_prompts

    model = _model()
    short = build_rollout_batch([[1, 2]] * 4, [[3] * 9] * 4, [[0.0] * 9] * 4, 0)  # 2 + 9: saves 6 of 40 tokens
    long = build_rollout_batch([list(range(1, 21))] * 4, [[3] * 5] * 4, [[0.0] * 5] * 4, 0)  # 20 + 5: 60 of 96
    assert prompt_token_saving(short) == pytest.approx(6 / 40) and prompt_token_saving(long) == pytest.approx(60 / 96)
    assert not shares_prompts(model, short) and shares_prompts(model, long)
    assert shares_prompts(model, short, "always") and not shares_prompts(model, long, "never")


@pytest.mark.gpu
def test_shared_prompts_on_cuda_in_bf16_autocast():
    """The GPU path (bf16 autocast over fp32 weights, SDPA with a boolean mask on CUDA): the same
    log-probs as the plain forward within bf16 rounding, finite gradients."""
    model = _model().cuda()
    batch = _groups(lengths=[3, 1, 8, 5, 2, 7, 4, 4, 6]).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain, _, _ = policy_logprobs(model, batch)
        shared, ent, _ = policy_logprobs_shared(model, batch)
        (shared.sum() + ent.sum()).backward()
    assert (plain - shared).abs().max() <= 5e-2 * max(1.0, plain.abs().max().item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
