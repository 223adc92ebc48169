"""Distillation: rejection sampling keeps exactly the verified traces; logit KD refuses mismatched
vocabularies, resumes bit for bit and guards against non-finite steps; both modes run end to end on
tiny models, as a chain of ledger runs (traces -> student -> evaluation)."""
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
    cfg = build(distill.Config, dict(teacher="t", num_prompts=6, samples_per_prompt=4, max_new_tokens=8, teacher_temperature=1.0))
    task = EvenLengthTask()
    kept = distill.sample_traces(teacher, tok, [task], cfg, teacher_id="t")
    assert kept and all(len(t["completion"]) % 2 == 0 for t in kept)
    assert all(t["verdict"]["correct"] and t["teacher"] == "t" and t["sampling"]["k"] == 4 for t in kept)
    # exactly: re-generate the same samples and count the distinct verified ones per prompt
    from sputnik.inference.engine import Engine
    from sputnik.inference.sampling import SamplingParams
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
    cfg = build(distill.Config, dict(teacher="t", num_prompts=6, samples_per_prompt=4, max_new_tokens=8, teacher_temperature=0.0))
    assert len(distill.sample_traces(teacher, tok, [AlwaysRightTask()], cfg, teacher_id="t")) == 6


def test_kd_mask_marks_positions_whose_next_token_is_the_answer(tok):
    ids, mask = tok.render_chat("What is 12+34?", "<answer>46</answer>")
    ids_BT, m_BT = distill.batch_from_pairs(tok, [("What is 12+34?", "<answer>46</answer>")], 64, torch.device("cpu"))
    assert ids_BT[0, :len(ids)].tolist() == ids and 0 < m_BT.sum() < len(ids)
    assert m_BT[0, :len(ids) - 1].tolist() == [float(x) for x in mask[1:]] and m_BT[0, len(ids) - 1:].sum() == 0


def test_divergence_and_temperature_reach_the_loss(tok):
    """kd_loss = mean over completion positions of the configured divergence at τ (here 2, and
    JSD at β = 0.3, not the defaults), from the student's and teacher's full logits."""
    import functools
    from sputnik.train import losses

    expected = {"forward_kl": losses.forward_kl_per_token, "reverse_kl": losses.reverse_kl_per_token,
                "jsd": functools.partial(losses.generalized_jsd_per_token, beta=0.3)}
    torch.manual_seed(0)
    teacher, student = build_model(tiny(**MICRO)).eval(), build_model(tiny(**MICRO))
    ids, mask = distill.batch_from_pairs(tok, [("What is 12+34?", "<answer>46</answer>")] * 2, 64, torch.device("cpu"))
    m = mask.bool()
    with torch.no_grad():
        z_s = student.lm_head(student.hidden_states(ids).hidden[m])
        z_t = teacher.lm_head(teacher.hidden_states(ids).hidden[m])
    for name, fn in expected.items():
        cfg = build(distill.Config, dict(teacher="t", mode="logit", divergence=name, jsd_beta=0.3, kd_temperature=2.0))
        got, load = distill.kd_loss(student, teacher, ids, mask, cfg, tok.pad_id)
        torch.testing.assert_close(got.detach(), fn(z_s, z_t, 2.0).mean(), rtol=1e-4, atol=1e-6, msg=name)
        assert load["model.layers.1.mlp"].sum() == 2 * int((ids != tok.pad_id).sum())  # padding is not load


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
    cfg = build(distill.Config, dict(teacher="t", mode="logit", divergence="jsd", jsd_beta=0.5))
    ids, mask = distill.batch_from_pairs(tok, [("What is 12+34?", "<think>2+4=6</think><answer>46</answer>")] * 4,
                                         64, torch.device("cpu"))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _ = distill.kd_loss(student, teacher, ids, mask, cfg, tok.pad_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())


def _teacher(tok, tmp_path, monkeypatch):
    import sputnik.tasks
    from sputnik.train.loading import save_model

    monkeypatch.setattr(sputnik.tasks, "get_task", lambda name, **kw: EvenLengthTask())
    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(0)
    save_model(build_model(tiny(**MICRO)), teacher_dir, tok, build(distill.Config, {"teacher": "x"}))
    return teacher_dir


def _cfg(teacher_dir, out, **kw):
    return build(distill.Config, {**dict(
        teacher=str(teacher_dir), out_dir=str(out), project_dir=str(out.parent), tasks=["even"], num_prompts=12,
        samples_per_prompt=2, max_new_tokens=6, teacher_temperature=1.0, student={**MICRO, "hidden_size": 16},
        steps=2, batch_size=2, max_len=64, eval_examples=4, num_threads=1, progress=False), **kw})


@pytest.mark.parametrize("mode", ["sequence", "logit"])
def test_distill_runs_end_to_end_and_a_rerun_reuses_the_traces_with_their_lineage(tok, tmp_path, monkeypatch, mode):
    """Both modes through run(): traces ("distill"), student training ("distill-sft" / "distill-kd"),
    evaluation ("distill-eval"), each run naming the one before as its parent. A rerun with the same
    settings reuses the traces: its distill run records no FLOPs and names the run that sampled them,
    which so stays in the final model's lineage."""
    from sputnik.accounting import ledger
    from sputnik.evaluate import greedy_eval
    from sputnik.inference.engine import Engine
    from sputnik.train.loading import load_model, load_tokenizer

    cfg = _cfg(_teacher(tok, tmp_path, monkeypatch), tmp_path / "distill", mode=mode)
    first = distill.run(cfg, parents=["pre"], final_model=True)
    student = load_model(first["student_dir"]).eval()
    s_tok = load_tokenizer("", first["student_dir"])
    recomputed = greedy_eval(Engine(student, s_tok), s_tok, [EvenLengthTask()], 4, cfg.seed, cfg.max_new_tokens)["accuracy"]
    assert first["num_traces"] > 0 and first["student_accuracy"] == recomputed
    metrics = [r for r in ledger.load(tmp_path) if r["command"] == "distill-eval"][-1]["metrics"]
    assert metrics["heldout_by_task"] == {"even": {"accuracy": recomputed, "n": 4}}
    assert metrics["teacher_by_task"]["even"] == {"accuracy": first["teacher_accuracy"], "n": 4}
    if mode == "logit":  # on_policy_fraction 0: KD on the teacher's traces only, never the student's samples
        recs = [json.loads(l) for l in (tmp_path / "distill" / "student_kd" / "metrics.jsonl").read_text().splitlines()]
        assert recs and not any(r.get("on_policy") for r in recs)
    assert first["student_params_active"] < first["teacher_params_active"]
    distill.run(cfg, parents=["pre"], final_model=True)
    runs = ledger.load(tmp_path)
    assert all(r["status"] == "ok" for r in runs)
    trained = "distill-sft" if mode == "sequence" else "distill-kd"
    sampled = [r for r in runs if r["command"] == "distill"]
    students = [r for r in runs if r["command"] == trained]
    evals = [r for r in runs if r["command"] == "distill-eval"]
    assert len(sampled) == len(students) == len(evals) == 2
    assert sampled[0]["flops"] > 0 and sampled[1]["flops"] == 0.0
    assert sampled[0]["parents"] == ["pre"] and sampled[1]["parents"] == ["pre", sampled[0]["run_id"]]
    assert students[0]["parents"] == [sampled[0]["run_id"]] and evals[0]["parents"] == [students[0]["run_id"]]
    assert first["run_ids"] == [evals[0]["run_id"]]
    # the rerun's student finds its finished checkpoint (resume auto): no step, no FLOPs, and it names
    # the run that wrote that checkpoint; so the final lineage is both chains but the superseded
    # first evaluation
    assert students[1]["parents"] == [sampled[1]["run_id"], students[0]["run_id"]]
    assert students[0]["flops"] > 0 and students[1]["flops"] == 0.0
    assert evals[1]["parents"] == [students[1]["run_id"]]
    assert ledger.final_lineage(runs) == {r["run_id"] for r in runs} - {evals[0]["run_id"]}


def test_the_student_starts_from_init(tok, tmp_path, monkeypatch):
    """`init` (was student_init) is the student's starting point: its architecture (the `student`
    settings are then ignored, with a warning), weights and tokenizer. One KD step at lr 0 leaves
    every weight as loaded; only the router bias, which no learning rate scales, moves."""
    from sputnik.train.loading import load_model, save_model

    teacher = _teacher(tok, tmp_path, monkeypatch)
    torch.manual_seed(5)
    init = save_model(build_model(tiny(**{**MICRO, "hidden_size": 24})), tmp_path / "init", tok, tiny(**MICRO))
    cfg = _cfg(teacher, tmp_path / "d", mode="logit", init=str(init), steps=1,
               optim=dict(lr=0.0, warmup_steps=0, schedule="constant"))
    assert cfg.student_tokenizer == ""  # the init's own
    with pytest.warns(UserWarning, match="model settings ignored"):
        res = distill.run(cfg)
    student = load_model(res["student_dir"])
    assert student.config.hidden_size == 24
    want = load_model(str(init)).state_dict()
    got = student.state_dict()
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert all(torch.equal(got[k], v) for k, v in want.items() if k != bias)
    assert not torch.equal(got[bias], want[bias])


def test_logit_kd_resumes_bit_exactly(tok, tmp_path, monkeypatch):
    """The KD loop checkpoints like every stage: a run interrupted after its step-2 checkpoint (Ctrl-C
    in step 4: "aborted" in the ledger) and rerun with the same settings resumes there (resume="auto")
    and ends with the weights of an uninterrupted run, on-policy batches (the student's own samples)
    included; the metrics hold each step once and the resumed run names the interrupted one."""
    from safetensors.torch import load_file

    from sputnik.accounting import ledger

    teacher = _teacher(tok, tmp_path, monkeypatch)
    kw = dict(mode="logit", steps=4, checkpoint_every=2, keep_last=5, on_policy_fraction=0.5, log_every=1)
    distill.run(_cfg(teacher, tmp_path / "full", **kw))
    full = [json.loads(l) for l in (tmp_path / "full" / "student_kd" / "metrics.jsonl").read_text().splitlines()]
    assert {r["on_policy"] for r in full} == {True, False}  # both kinds of batch in these 4 steps
    part = tmp_path / "part"
    real_batch = distill.kd_batch

    def interrupted(cfg, step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return real_batch(cfg, step, *args)

    monkeypatch.setattr(distill, "kd_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill.run(_cfg(teacher, part, **kw))
    monkeypatch.setattr(distill, "kd_batch", real_batch)
    ck = part / "student_kd" / "checkpoints"
    assert sorted(p.name for p in ck.glob("ckpt-*")) == ["ckpt-000002"] and not (part / "student_kd" / "model").exists()
    distill.run(_cfg(teacher, part, **kw))
    a = load_file(str(tmp_path / "full" / "student_kd" / "model" / "model.safetensors"))
    b = load_file(str(part / "student_kd" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = [json.loads(l) for l in (part / "student_kd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [(r["loss"], r["on_policy"]) for r in resumed] == [(r["loss"], r["on_policy"]) for r in full]
    kd = [r for r in ledger.load(tmp_path) if r["command"] == "distill-kd"
          and r["config"]["out_dir"] == str(part / "student_kd")]
    assert [r["status"] for r in kd] == ["aborted", "ok"] and kd[1]["parents"][-1] == kd[0]["run_id"]


def test_logit_kd_skips_nonfinite_steps_and_stops_a_streak(tok, tmp_path, monkeypatch):
    """The KD loop's non-finite guard: a poisoned step (poison_steps, 0-based) is skipped without a
    trace (weights, router biases: its expert load is discarded, Adam moments) and logged;
    max_nonfinite_steps in a row raise TrainingDiverged, the "distill-kd" run is failed in the ledger
    and the last good checkpoint is kept."""
    from safetensors.torch import load_file

    from sputnik.accounting import ledger
    from sputnik.train.session import TrainingDiverged

    teacher = _teacher(tok, tmp_path, monkeypatch)
    distill.run(_cfg(teacher, tmp_path / "a", mode="logit", steps=3, checkpoint_every=1, keep_last=5, poison_steps=[2],
                     log_every=1))
    ck = tmp_path / "a" / "student_kd" / "checkpoints"
    one, two, three = (load_file(str(ck / f"ckpt-00000{i}" / "model.safetensors")) for i in (1, 2, 3))
    assert all(torch.equal(two[k], three[k]) for k in two)  # the poisoned step changed nothing
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert not torch.equal(one[bias], two[bias])  # where a taken step moves the router bias
    opts = [torch.load(ck / f"ckpt-00000{i}" / "optimizer.pt", weights_only=False) for i in (2, 3)]
    moments = [[t for st in o["state"].values() for t in st.values() if torch.is_tensor(t)] for o in opts]
    assert moments[0] and all(torch.equal(a, b) for a, b in zip(*moments))
    recs = [json.loads(l) for l in (tmp_path / "a" / "student_kd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("nonfinite")] == [3]
    assert [r["step"] for r in recs if not r.get("nonfinite")] == [1, 2]  # no training line for the skipped step
    assert json.loads((ck / "ckpt-000003" / "state.json").read_text())["loop_state"]["nonfinite_total"] == 1
    with pytest.raises(TrainingDiverged, match="2 consecutive steps"):
        distill.run(_cfg(teacher, tmp_path / "b", mode="logit", steps=5, checkpoint_every=1, poison_steps=[1, 2],
                         max_nonfinite_steps=2))
    kept = sorted(p.name for p in (tmp_path / "b" / "student_kd" / "checkpoints").glob("ckpt-*"))
    assert kept == ["ckpt-000001"]  # none written during the streak
    runs = {r["command"]: r for r in ledger.load(tmp_path) if r["config"]["out_dir"] == str(tmp_path / "b")
            or r["command"] == "distill-kd" and r["config"]["out_dir"] == str(tmp_path / "b" / "student_kd")}
    assert runs["distill"]["status"] == "ok" and runs["distill-kd"]["status"] == "failed"
    assert "TrainingDiverged" in runs["distill-kd"]["error"]
