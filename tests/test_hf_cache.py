"""The engine driving a transformers causal LM through its own DynamicCache (inference/hf_cache.py):
ragged batches and forked samples must give what the plain HF full forward gives, for a bare
transformers model and for one wrapped for training (model/hf_wrapper.HFCausalLM)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from sputnik.inference.engine import Engine  # noqa: E402
from sputnik.inference.sampling import SamplingParams  # noqa: E402
from sputnik.inference.decoders import cached_model  # noqa: E402
from sputnik.inference.hf_cache import HFCachedModel  # noqa: E402
from sputnik.model.hf_wrapper import HFCausalLM  # noqa: E402


def bare(hf):
    return hf


def tiny_llama(vocab=97):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.3)  # wide init: peaked logits, no argmax near-ties
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def full_forward_greedy(hf, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("wrap", [bare, HFCausalLM])
def test_ragged_greedy_batch_equals_full_forward(wrap):
    hf = tiny_llama()
    eng = Engine(wrap(hf))
    assert isinstance(cached_model(wrap(hf)), HFCachedModel) and eng.decoder.name == "eager (transformers)"
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    out = eng.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    for p, row in zip(prompts, out):
        assert row[0].token_ids == full_forward_greedy(hf, p, 6)


def test_logprobs_match_full_forward():
    hf = tiny_llama()
    eng = Engine(hf)
    prompts = [[3, 1, 4, 1, 5], [2, 7]]
    out = eng.generate(prompts, SamplingParams(max_new_tokens=5, temperature=1.0, seed=3))
    for p, row in zip(prompts, out):
        c = row[0]
        with torch.no_grad():
            logp = torch.log_softmax(hf(input_ids=torch.tensor([p + c.token_ids])).logits[0].float(), -1)
        ref = logp[len(p) - 1: -1].gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)


def test_forked_samples_equal_separate_prefill():
    hf = tiny_llama()
    eng = Engine(hf)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)
    forked = eng.generate([[4, 2, 6], [1]], params, num_samples=3)
    repeated = eng.generate([[4, 2, 6]] * 3 + [[1]] * 3, params)
    assert [c.token_ids for group in forked for c in group] == [r[0].token_ids for r in repeated]


def test_rollback_forgets_stale_slots():
    """Writing position p again after rolling back (speculative rejection) must not leave the old
    token visible: result == a cache that never saw it."""
    hf = tiny_llama()
    m = HFCachedModel(hf)
    prompt = torch.tensor([[3, 1, 4]])
    a = m.new_cache(1, 16)
    m.forward_cached(prompt, a, torch.tensor([0]))
    m.forward_cached(torch.tensor([[50, 60]]), a, torch.tensor([3]))  # two drafts, both rejected
    got = m.forward_cached(torch.tensor([[7]]), a, torch.tensor([3]))
    b = m.new_cache(1, 16)
    m.forward_cached(prompt, b, torch.tensor([0]))
    want = m.forward_cached(torch.tensor([[7]]), b, torch.tensor([3]))
    assert torch.allclose(got, want, atol=1e-5)
