"""Distillation: rejection sampling keeps exactly the verified traces; logit KD refuses mismatched
vocabularies; both modes run end to end on tiny models."""
import json
from dataclasses import dataclass

import pytest
import torch

from sputnik.config import build
from sputnik.model import build_model
from sputnik.model.config import tiny
from sputnik.stages import distill
from sputnik.tasks import Example
from sputnik.tokenizer import train_tokenizer

MICRO = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=64,
             moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, num_attention_heads=2,
             q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
             num_nextn_predict_layers=0, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["What is 12+34? <think>2+4=6</think><answer>46</answer>"] * 20 + ["hello world"] * 5, 300)


@dataclass
class V:
    correct: bool
    well_formatted: bool = True
    extracted: str | None = None


class EvenLengthTask:
    """Verifier: correct iff the completion text has an even number of characters."""
    name = "even"

    def generate(self, n, split="train", seed=0):
        return [Example("even", f"q{seed % 97}", "0", "") for _ in range(n)]

    def verify(self, ex, text):
        return V(len(text) % 2 == 0)


def test_rejection_sampling_keeps_exactly_the_verified_traces(tok):
    teacher = build_model(tiny(**MICRO)).eval()
    cfg = build(distill.DistillConfig, dict(num_prompts=6, samples_per_prompt=4, max_new_tokens=8, teacher_temperature=1.0))
    task = EvenLengthTask()
    kept = distill.sample_traces(teacher, tok, [task], cfg, teacher_id="t")
    assert kept and all(len(t["completion"]) % 2 == 0 for t in kept)
    assert all(t["verdict"]["correct"] and t["teacher"] == "t" and t["sampling"]["k"] == 4 for t in kept)
    # exactly: re-generate the same samples and count the distinct verified ones per prompt
    from sputnik.engine import Engine, SamplingParams
    import random
    rng = random.Random(cfg.seed)
    exs = [task.generate(1, split="train", seed=rng.randrange(2**31))[0] for _ in range(6)]
    outs = Engine(teacher, tok).generate([tok.render_prompt(e.prompt) for e in exs], SamplingParams(
        max_new_tokens=8, temperature=1.0, stop_token_ids=(tok.eot_id,), seed=cfg.seed), num_samples=4)
    expected = sum(len({c.text for c in o if len(c.text) % 2 == 0}) for o in outs)
    assert len(kept) == expected


def test_logit_kd_refuses_mismatched_vocabularies(tok):
    other = train_tokenizer(["completely different text corpus, other merges"] * 10, 280)
    t, s = build_model(tiny(**MICRO)), build_model(tiny(**MICRO))
    with pytest.raises(ValueError, match="shared vocabulary"):
        distill.check_shared_vocab(tok, other, t, s)
    s2 = build_model(tiny(**{**MICRO, "vocab_size": 320}))
    with pytest.raises(ValueError, match="equal output vocabularies"):
        distill.check_shared_vocab(tok, tok, t, s2)


def test_logit_kd_step_lowers_the_divergence(tok):
    teacher, student = build_model(tiny(**MICRO)).eval(), build_model(tiny(**{**MICRO, "hidden_size": 16}))
    cfg = build(distill.DistillConfig, dict(mode="logit", divergence="jsd", jsd_beta=0.5))
    ids, mask = distill.batch_from_pairs(tok, [("What is 12+34?", "<think>2+4=6</think><answer>46</answer>")] * 4,
                                         64, torch.device("cpu"))
    from sputnik.common import pick_device
    dc = pick_device("cpu")
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = distill.kd_step_loss(student, teacher, ids, mask, cfg, dc)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())
