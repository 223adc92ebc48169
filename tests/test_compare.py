"""`sputnik compare`: the dense twin, the curves, compute-to-target, and (slow) a whole run."""
import json
import math

import pytest

from sputnik.accounting import compare
from sputnik.accounting import ledger
from sputnik.config import build
from sputnik.model.accounting import param_counts
from sputnik.model.config import ModelConfig
from sputnik.pipeline import SpeedrunConfig, stage_settings


def test_dense_twin_has_the_moe_active_parameters():
    moe = stage_settings(build(SpeedrunConfig, {}))["pretrain"]["model"]
    dense = compare.dense_twin(moe)
    assert dense["architecture"] == "llama" and dense["hidden_size"] == moe["hidden_size"]
    assert dense["num_hidden_layers"] == moe["num_hidden_layers"] and dense["vocab_size"] == moe["vocab_size"]
    want = param_counts(build(ModelConfig, dict(moe, num_nextn_predict_layers=0)))["active"]
    got = param_counts(build(ModelConfig, dense))["active"]
    # the SwiGLU width moves in steps of 8: one step is 3·d·8·L parameters
    assert abs(got - want) <= 3 * moe["hidden_size"] * 8 * moe["num_hidden_layers"] / 2
    assert abs(got - want) / want < 0.02


def test_mla_twin_differs_from_the_moe_in_the_ffn_only():
    from sputnik.studies.moe_vs_dense import moe_model

    moe = moe_model("144x4", 2048, 256)
    twin = compare.dense_twin(moe, attention="mla")
    assert {k for k in moe if moe[k] != twin[k]} == {"first_k_dense_replace", "intermediate_size"}
    assert twin["first_k_dense_replace"] == twin["num_hidden_layers"] == 4
    counts = param_counts(build(ModelConfig, twin))
    want = param_counts(build(ModelConfig, moe))["active"]
    assert counts["total"] == counts["active"]  # no experts left
    assert abs(counts["active"] - want) <= 3 * 144 * 8 * 4 / 2
    # the Llama twin's multi-head attention is larger than MLA, so its FFN is narrower
    assert compare.dense_twin(moe)["intermediate_size"] < twin["intermediate_size"]
    with pytest.raises(ValueError, match="attention='gqa'"):
        compare.dense_twin(moe, attention="gqa")


def test_compute_to_reach_interpolates_and_says_never():
    curve = [(10.0, 0.0), (20.0, 0.4), (30.0, 0.8)]
    assert compare.compute_to_reach(curve, 0.6) == pytest.approx(25.0)
    assert compare.compute_to_reach(curve, 0.4) == pytest.approx(20.0)
    assert compare.compute_to_reach(curve, 0.0) == 10.0
    assert compare.compute_to_reach(curve, 0.81) is None
    assert compare.compute_to_reach([], 0.1) is None
    # a dip after the first crossing does not matter: the first crossing counts
    assert compare.compute_to_reach([(1.0, 0.5), (2.0, 0.9), (3.0, 0.1)], 0.7) == pytest.approx(1.5)


def test_summarize_ratios_against_the_dense_baseline():
    curves = {"dense-sft": [(100.0, 0.0), (200.0, 0.5), (400.0, 0.6)],
              "moe-sft": [(100.0, 0.0), (150.0, 0.6), (400.0, 0.7)],
              "moe-sft-grpo": [(100.0, 0.0), (300.0, 0.5)],
              "distilled": [(500.0, 0.65)]}
    s = compare.summarize(curves, 0.0, 400.0)
    assert s["target_accuracy"] == 0.6  # the dense baseline's final accuracy
    assert s["dense_flops_to_target"] == pytest.approx(400.0)
    r = s["recipes"]
    assert r["moe-sft"]["ratio_to_dense"] == pytest.approx(150.0 / 400.0)
    assert r["moe-sft-grpo"]["flops_to_target"] is None and r["moe-sft-grpo"]["ratio_to_dense"] is None
    assert r["distilled"]["ratio_to_dense"] == pytest.approx(500.0 / 400.0)
    assert r["moe-sft"]["best_accuracy"] == 0.7 and r["moe-sft"]["final_flops"] == 400.0
    md = compare.markdown(s)
    assert "not reached" in md and "0.38×" in md
    s2 = compare.summarize(curves, 0.5, 400.0)  # an explicit target
    assert s2["recipes"]["moe-sft"]["flops_to_target"] == pytest.approx(100.0 + 50.0 * 0.5 / 0.6)


def test_stage_curve_reads_cumulative_flops_and_falls_back_to_the_ledger(tmp_path):
    out = tmp_path / "sft"
    out.mkdir()
    rows = [{"step": 0, "eval_loss": 2.0, "accuracy": 0.0, "flops": 0.0},
            {"step": 10, "loss": 1.0, "flops": 50.0},
            {"step": 10, "eval_loss": 1.0, "accuracy": 0.5, "flops": 50.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    c = compare.stage_curve(out)
    assert c == {"points": [(0.0, 0.0), (50.0, 0.5)], "flops": 50.0, "steps": 10}
    # older metrics without "flops": the ledger's ok runs into that directory, spread by step
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text(json.dumps({"step": 0, "accuracy": 0.1}) + "\n"
                                       + json.dumps({"step": 4, "accuracy": 0.3}) + "\n")
    ledger_rows = [{"status": "ok", "flops": 80.0, "config": {"out_dir": str(old)}},
                   {"status": "failed", "flops": 1e9, "config": {"out_dir": str(old)}},
                   {"status": "ok", "flops": 1e9, "config": {"out_dir": str(out)}}]
    c = compare.stage_curve(old, ledger_rows)
    assert c["flops"] == 80.0 and c["points"] == [(0.0, 0.1), (80.0, 0.3)]


def test_compare_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="force"):
        build(compare.CompareConfig, {"force": ["dense_sft", "pretrain"]})
    with pytest.raises(ValueError, match="eval_points=0"):
        build(compare.CompareConfig, {"eval_points": 0})
    assert build(compare.CompareConfig, {"force": ["all"]}).force == ["all"]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~3 minutes on a quiet 2-core machine, 5+ when it is shared
def test_compare_end_to_end_small(tmp_path, monkeypatch):
    """The speedrun's stages at 3% scale (distillation marked done: a 24-step teacher solves
    nothing, so there are no traces), then the three budgeted runs, the plot and the tables."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p" / "distill").mkdir(parents=True)
    (tmp_path / "p" / "distill" / "DONE.json").write_text("{}")
    cfg = build(compare.CompareConfig, dict(project="p", scale=0.03, num_threads=2, eval_points=2))
    s = compare.run(cfg)
    r = s["recipes"]
    budget = s["budget_flops"]
    for name in ("dense-sft", "moe-sft"):  # each within a few % of the moe-sft-grpo budget
        assert r[name]["final_flops"] == pytest.approx(budget, rel=0.1)
        assert len(r[name]["points"]) >= 3  # step 0 + eval_points
    assert r["moe-sft-grpo"]["final_flops"] == pytest.approx(budget, rel=1e-6)
    assert (tmp_path / "p" / "compare" / "compare.png").stat().st_size > 1000
    assert "dense-sft" in (tmp_path / "p" / "compare" / "compare.md").read_text()
    cmds = [r["command"] for r in ledger.load(tmp_path / "p")]
    assert {"compare:dense-pretrain", "compare:dense-sft", "compare:moe-sft"} <= set(cmds)
    assert not math.isnan(s["target_accuracy"])
    # a rerun skips the finished compare stages (nothing new in the ledger but the report)
    n = len(cmds)
    compare.run(cfg)
    cmds2 = [r["command"] for r in ledger.load(tmp_path / "p")]
    assert not [c for c in cmds2[n:] if c.startswith("compare:")]


def test_a_budgeted_run_for_another_budget_is_stale(tmp_path):
    """After the speedrun's RL is rerun the budget B moves; a dense/MoE SFT run trained to the old
    B must rerun (accuracy at unequal compute is no comparison). Runs recorded without a budget
    (older projects) are kept."""
    done = tmp_path / "DONE.json"
    assert not compare._budget_changed(done, 1e13)  # not run yet: nothing stale
    done.write_text(json.dumps({"accuracy": 0.9, "budget_flops": 2.0e13}))
    assert not compare._budget_changed(done, 2.01e13)  # within 1%
    assert compare._budget_changed(done, 2.66e13)
    done.write_text(json.dumps({"accuracy": 0.9}))
    assert not compare._budget_changed(done, 2.66e13)


def test_budgeted_runs_get_their_parents_and_commands_as_arguments(tmp_path, monkeypatch):
    """compare.run hands each budgeted run its lineage and its ledger command (nothing re-reads the
    ledger for them): dense-pretrain descends from the tokenizer run, dense-sft from dense-pretrain,
    moe-sft from the speedrun's pretrain run; each gets the FLOPs the budget leaves. A rerun that finds
    dense-pretrain done passes the run ids of its DONE.json on."""
    from sputnik import pipeline
    from sputnik.accounting import report
    from sputnik.stages import pretrain, sft

    p = tmp_path / "p"
    speedrun = stage_settings(build(SpeedrunConfig, dict(project=str(p), scale=0.03)))
    for stage, ids in (("tokenizer", ["tok-1"]), ("pretrain", ["pre-1"])):  # the speedrun's finished stages
        (p / stage).mkdir(parents=True)
        (p / stage / "DONE.json").write_text(json.dumps({"run_ids": ids}))
    (p / "pretrain" / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 2.0, "flops": 1000.0}) + "\n")
    (p / "sft").mkdir()
    (p / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 0, "accuracy": 0.0, "flops": 0.0}) + "\n"
                                             + json.dumps({"step": 10, "accuracy": 0.5, "flops": 100.0}) + "\n")
    with ledger.record_run(p, "rl", {"out_dir": speedrun["rl"]["out_dir"]}, devices="cpu", energy_method="table") as rl:
        rl.add(flops=50.0)
    calls = []

    def fake_stage(cfg, parents=(), command=""):
        calls.append((command, list(parents), cfg))
        out = tmp_path / "p" / cfg.out_dir.rsplit("/", 1)[-1]
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "accuracy": 0.0, "flops": 0.0}) + "\n"
                                           + json.dumps({"step": cfg.steps, "accuracy": 0.4, "flops": 600.0}) + "\n")
        return {"run_ids": [f"{command}-id"], "model_dir": str(out / "model")}

    monkeypatch.setattr(pipeline, "run", lambda cfg: {})  # the speedrun's stages are done
    monkeypatch.setattr(pretrain, "run", fake_stage)
    monkeypatch.setattr(sft, "run", fake_stage)
    monkeypatch.setattr(report, "build", lambda project: None)
    s = compare.run(build(compare.CompareConfig, dict(project=str(p), scale=0.03, eval_points=2)))
    assert [(c, parents) for c, parents, _ in calls] == [
        ("compare:dense-pretrain", ["tok-1"]), ("compare:dense-sft", ["compare:dense-pretrain-id"]),
        ("compare:moe-sft", ["pre-1"])]
    dense_pre, dense_sft, moe_sft = (cfg for _, _, cfg in calls)
    assert dense_pre.model.architecture == "llama" and dense_pre.out_dir == str(p / "dense_pretrain")
    assert dense_sft.init == str(p / "dense_pretrain" / "model") and moe_sft.init == str(p / "pretrain" / "model")
    # budget B = pretrain 1000 + SFT 100 + RL 50; moe-sft gets B - 1000 at the SFT's 10 FLOPs a step
    assert s["budget_flops"] == 1150.0
    assert (moe_sft.steps, moe_sft.eval_every, moe_sft.checkpoint_every) == (15, 7, 7)
    assert s["recipes"]["moe-sft"]["points"] == [(1000.0, 0.0), (1600.0, 0.4)]
    assert s["recipes"]["dense-sft"]["points"] == [(600.0, 0.0), (1200.0, 0.4)]  # after its own pretraining
    done = json.loads((p / "moe_sft" / "DONE.json").read_text())
    assert done["run_ids"] == ["compare:moe-sft-id"] and done["budget_flops"] == 1150.0
    calls.clear()
    compare.run(build(compare.CompareConfig, dict(project=str(p), scale=0.03, eval_points=2, force=["dense_sft"])))
    assert [(c, parents) for c, parents, _ in calls] == [("compare:dense-sft", ["compare:dense-pretrain-id"])]
    assert (p / "dense_sft.superseded-1" / "DONE.json").is_file()  # the old run set aside, not resumed


@pytest.mark.parametrize("student", ["distill-sft", "distill-kd"])
def test_the_distilled_point_costs_the_teacher_the_traces_and_the_student(tmp_path, student):
    """distilled = the teacher's lineage (pretrain + SFT + RL) + the run that sampled the traces (a
    rerun that reuses them records 0) + the student's own training, in either mode."""
    p = tmp_path / "p"
    speedrun = stage_settings(build(SpeedrunConfig, dict(project=str(p))))
    (p / "pretrain").mkdir(parents=True)
    (p / "pretrain" / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 2.0, "flops": 1000.0}) + "\n")
    (p / "sft").mkdir()
    (p / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 10, "accuracy": 0.5, "flops": 100.0}) + "\n")

    def run(command, flops, out_dir="", **metrics):
        with ledger.record_run(p, command, {"out_dir": out_dir}, devices="cpu", energy_method="table") as r:
            r.add(flops=flops)
            r.metrics.update(metrics)

    run("rl", 50.0, speedrun["rl"]["out_dir"], accuracy_curve=[(0, 0.5), (2, 0.8)])
    run("distill", 20.0)
    run("distill", 0.0)  # the rerun that reused the traces
    run(student, 30.0)
    run("distill-eval", 0.0, heldout_accuracy=0.6)
    curves = compare.recipe_curves(p, speedrun)
    assert curves["moe-sft-grpo"] == [(1100.0, 0.5), (1150.0, 0.8)]
    assert curves["distilled"] == [(1150.0 + 20.0 + 30.0, 0.6)]
