"""The engine on our real models (DeepSeek-V3 Transformer with MLA cache, dense Llama twin):
batch == one by one, engine log-probs == the full forward's, forked group == separate prefill."""
import pytest
import torch

from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams
from sputnik.model import build_model
from sputnik.model.config import tiny, tiny_dense

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64, initializer_range=0.1)  # wide init: peaked logits, no argmax near-ties
CONFIGS = {
    "deepseek_v3": lambda: tiny(**SMALL, moe_intermediate_size=16, n_routed_experts=4, q_lora_rank=16,
                                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
    "llama": lambda: tiny_dense(**SMALL),
    # Abacus places (ids 2-11 as digits: the prompts hold runs), cached per position by the decode
    "deepseek_v3_abacus": lambda: tiny(**SMALL, moe_intermediate_size=16, n_routed_experts=4, q_lora_rank=16,
                                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                       abacus_max_index=12, abacus_train_offset=4, abacus_digit_ids=list(range(2, 12))),
}
PROMPTS = [[1], [2, 3, 4, 5, 6, 7], [8, 9, 10]]


@pytest.fixture(params=list(CONFIGS))
def model(request):
    torch.manual_seed(0)
    return build_model(CONFIGS[request.param]()).eval()


def test_greedy_batch_equals_one_by_one(model):
    eng = Engine(model)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    batched = [r[0].token_ids for r in eng.generate(PROMPTS, params)]
    single = [eng.generate([p], params)[0][0].token_ids for p in PROMPTS]
    assert batched == single


def test_logprobs_equal_full_forward(model):
    eng = Engine(model)
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.7, seed=1))
    worst = 0.0
    for p, row in zip(PROMPTS, out):
        c = row[0]
        with torch.no_grad():
            logits_TV = model(torch.tensor([p + c.token_ids])).logits[0].float() / 0.7
        ref = torch.log_softmax(logits_TV, -1)[len(p) - 1: -1].gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        worst = max(worst, float((torch.tensor(c.logprobs) - ref).abs().max()))
    print(f"max |engine logprob - full forward| = {worst:.2e}")
    assert worst < 1e-4


def test_forked_group_equals_separate_prefill(model):
    eng = Engine(model)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=4)
    forked = eng.generate([[5, 6, 7], [3]], params, num_samples=3)
    repeated = eng.generate([[5, 6, 7]] * 3 + [[3]] * 3, params)
    assert [c.token_ids for g in forked for c in g] == [r[0].token_ids for r in repeated]
