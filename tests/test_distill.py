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
    from sputnik.inference.engine import Engine, SamplingParams
    import random
    rng = random.Random(cfg.seed)
    exs = [task.generate(1, split="train", seed=rng.randrange(2**31))[0] for _ in range(6)]
    outs = Engine(teacher, tok).generate([tok.render_prompt(e.prompt) for e in exs], SamplingParams(
        max_new_tokens=8, temperature=1.0, stop_token_ids=(tok.eot_id,), seed=cfg.seed), num_samples=4)
    expected = sum(len({c.text for c in o if len(c.text) % 2 == 0}) for o in outs)
    assert len(kept) == expected


class AlwaysRightTask(EvenLengthTask):
    """Every completion verifies: what is dropped is then exactly the duplicates."""

    def verify(self, ex, text):
        return V(True)


def test_rejection_sampling_drops_duplicate_traces(tok):
    """Greedy teacher: the 4 samples of each of 6 prompts are identical, so one trace per prompt."""
    teacher = build_model(tiny(**MICRO)).eval()
    cfg = build(distill.DistillConfig, dict(num_prompts=6, samples_per_prompt=4, max_new_tokens=8, teacher_temperature=0.0))
    assert len(distill.sample_traces(teacher, tok, [AlwaysRightTask()], cfg, teacher_id="t")) == 6


def test_kd_mask_marks_positions_whose_next_token_is_the_answer(tok):
    ids, mask = tok.render_chat("What is 12+34?", "<answer>46</answer>")
    ids_BT, m_BT = distill.batch_from_pairs(tok, [("What is 12+34?", "<answer>46</answer>")], 64, torch.device("cpu"))
    assert ids_BT[0, :len(ids)].tolist() == ids and 0 < m_BT.sum() < len(ids)
    assert m_BT[0, :len(ids) - 1].tolist() == [float(x) for x in mask[1:]] and m_BT[0, len(ids) - 1:].sum() == 0


def test_divergence_and_temperature_reach_the_loss(tok):
    """kd_step_loss = mean over completion positions of the configured divergence at τ (here 2, and
    JSD at β = 0.3, not the defaults), from the student's and teacher's full logits."""
    import functools
    from sputnik.train import losses
    from sputnik.common import pick_device

    expected = {"forward_kl": losses.forward_kl_per_token, "reverse_kl": losses.reverse_kl_per_token,
                "jsd": functools.partial(losses.generalized_jsd_per_token, beta=0.3)}
    torch.manual_seed(0)
    teacher, student = build_model(tiny(**MICRO)).eval(), build_model(tiny(**MICRO))
    ids, mask = distill.batch_from_pairs(tok, [("What is 12+34?", "<answer>46</answer>")] * 2, 64, torch.device("cpu"))
    m = mask.bool()
    with torch.no_grad():
        z_s, z_t = student.lm_head(student.hidden_states(ids)[m]), teacher.lm_head(teacher.hidden_states(ids)[m])
    for name, fn in expected.items():
        cfg = build(distill.DistillConfig, dict(mode="logit", divergence=name, jsd_beta=0.3, kd_temperature=2.0))
        got = distill.kd_step_loss(student, teacher, ids, mask, cfg, pick_device("cpu"))
        torch.testing.assert_close(got.detach(), fn(z_s, z_t, 2.0).mean(), rtol=1e-4, atol=1e-6, msg=name)


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


@pytest.mark.parametrize("mode", ["sequence", "logit"])
def test_distill_runs_end_to_end_and_a_rerun_reuses_the_traces_with_their_lineage(tok, tmp_path, monkeypatch, mode):
    """Both modes through run(): traces, student training, evaluation, ledger. A rerun with the
    same settings reuses the traces: its distill run records no FLOPs, and the run that sampled
    them stays in the final model's lineage."""
    import sputnik.tasks
    from sputnik.accounting import ledger
    from sputnik.train import session as tc

    monkeypatch.setattr(sputnik.tasks, "get_task", lambda name, **kw: EvenLengthTask())
    teacher_dir = tmp_path / "teacher"
    tc.save_model(build_model(tiny(**MICRO)), teacher_dir, tok, build(distill.DistillConfig, {}))
    cfg = build(distill.DistillConfig, dict(
        teacher=str(teacher_dir), out_dir=str(tmp_path / "distill"), ledger_dir=str(tmp_path), mode=mode,
        tasks=["even"], num_prompts=12, samples_per_prompt=2, max_new_tokens=6, teacher_temperature=1.0,
        student={**MICRO, "hidden_size": 16}, steps=2, batch_size=2, max_len=64, eval_examples=4, num_threads=1))
    first = distill.run(cfg, parents=["pre"], final_model=True)
    assert first["num_traces"] > 0 and 0.0 <= first["student_accuracy"] <= 1.0
    if mode == "logit":  # on_policy_fraction 0: KD on the teacher's traces only, never the student's samples
        recs = [json.loads(l) for l in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
        assert recs and not any(r["on_policy"] for r in recs)
    assert first["student_params_active"] < first["teacher_params_active"]
    distill.run(cfg, parents=["pre"], final_model=True)
    runs = ledger.load(tmp_path)
    sampled = [r for r in runs if r["command"] == "distill"]
    assert len(sampled) == 2 and sampled[0]["flops"] > 0
    if mode == "sequence":  # the student trains in its own distill-sft run
        assert sampled[1]["flops"] == 0.0
    else:  # KD trains inside the distill run: only the sampling is missing from the rerun
        assert 0 < sampled[1]["flops"] < sampled[0]["flops"]
    evals = [r for r in runs if r["command"] == "distill-eval"]
    assert all(r["status"] == "ok" for r in runs)
    assert evals[-1]["parents"][0] == "pre" and sampled[0]["run_id"] in evals[-1]["parents"]
    assert sampled[0]["run_id"] in ledger.final_lineage(runs)
