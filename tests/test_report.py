"""The report card: built only from the ledger and the metrics files."""
import json

import pytest

from sputnik.accounting import ledger
from sputnik.accounting import report


def _run(project, command, out_dir, *, flops, metrics=None, status="ok", final=False, parents=()):
    try:
        with ledger.record_run(project, command, {"out_dir": str(out_dir)}, final_model=final, parents=parents,
                               energy_method="table") as run:
            run.add(flops=flops, tokens=100)
            run.metrics.update(metrics or {})
            if status == "failed":
                raise RuntimeError("boom")
            if status == "stopped":
                raise ledger.RunStopped("stopped by a health check at step 2: entropy collapse")
    except (RuntimeError, ledger.RunStopped):
        pass
    return run.run_id


def _metrics(out_dir, rows):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def project(tmp_path):
    p = tmp_path / "proj"
    _metrics(p / "pretrain", [{"step": 10, "loss": 2.0, "moe_max_over_mean": 1.5}, {"step": 10, "eval_loss": 2.5},
                              {"step": 20, "loss": 1.0, "moe_max_over_mean": 1.1}])
    _metrics(p / "rl", [{"step": 1, "reward_mean": 0.2, "accuracy": 0.3, "length_mean": 40, "length_max": 60},
                        {"step": 2, "reward_mean": 0.6, "accuracy": 0.7, "length_mean": 30, "length_max": 50,
                         "heldout_accuracy": 0.65}])
    a = _run(p, "pretrain", p / "pretrain", flops=1e12)
    _run(p, "rl", p / "rl", flops=5e11, status="failed")
    b = _run(p, "rl", p / "rl", flops=2e11, metrics={"heldout_accuracy": 0.65})
    _run(p, "compare:dense-sft", p / "dense_sft", flops=9e12, metrics={"accuracy": 0.5})
    _run(p, "distill-eval", p / "distill", flops=0.0, final=True, parents=[a, b],
         metrics={"heldout_accuracy": 0.6, "params_total": 1000, "params_active": 250})
    return p


def test_report_tables_plots_and_cost_split(project):
    md = report.build(project).read_text()
    out = project / "report"
    for png in ("loss.png", "rl.png", "expert_load.png", "accuracy_vs_flops.png"):
        assert (out / png).stat().st_size > 1000, png
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "0.650" in rows["rl"] and "2e+11" in rows["rl"]  # the latest ok rl run, not the failed one
    assert "1,000" in rows["distill-eval"] and "250" in rows["distill-eval"]
    # final lineage: pretrain + ok rl + eval = 1.2e12 FLOPs; everything: + failed rl + compare run
    assert "| final model's lineage | 3 |" in md and "1.2e+12" in md
    assert "| all runs (failed, aborted, killed included) | 5 |" in md and "1.07e+13" in md
    assert "| of which failed | 1 |" in md


@pytest.fixture
def plotted(monkeypatch):
    """The panels each plot of report.build was drawn from, by file name (the plots are still drawn)."""
    seen = {}
    real = report._plot

    def spy(path, panels, xlabel="step"):
        seen[path.name] = panels
        return real(path, panels, xlabel)

    monkeypatch.setattr(report, "_plot", spy)
    return seen


def test_report_keeps_compare_branches_out_of_the_lineage_curve(project, plotted):
    report.build(project)
    (label, xs, ys), = plotted["accuracy_vs_flops.png"][0][1]
    assert "compare:" not in label
    assert xs == [1.2e12, 1.2e12] and ys == [0.65, 0.6]  # pretrain + rl, then the student (0 FLOPs of its own)


def test_report_includes_the_compare_table_when_present(project):
    (project / "compare").mkdir()
    (project / "compare" / "compare.md").write_text("# Recipes\n\n| recipe | x |\n|---|---|\n| moe-sft | 1 |\n\n"
                                                    "![accuracy vs compute](compare.png)\n")
    md = report.build(project).read_text()
    assert "## Recipes at equal compute" in md and "| moe-sft | 1 |" in md
    assert "(../compare/compare.png)" in md


def test_report_refuses_an_empty_project(tmp_path):
    with pytest.raises(ValueError, match="no runs"):
        report.build(tmp_path)


def test_report_follows_the_distill_chain_and_counts_stopped_runs(tmp_path, plotted):
    """The distillation's runs ("distill" traces -> "distill-kd" student -> "distill-eval") each
    get a row and add their FLOPs to the accuracy curve, whose student point sits after all of them;
    a health-stopped RL run is spending ("of which stopped"), never the stage's row."""
    p = tmp_path / "proj"
    pre = _run(p, "pretrain", p / "pretrain", flops=1e12)
    sft = _run(p, "sft", p / "sft", flops=2e11, metrics={"accuracy": 0.5}, parents=[pre])
    _run(p, "rl", p / "rl", flops=3e11, status="stopped", parents=[sft])
    rl = _run(p, "rl", p / "rl", flops=1e11, metrics={"heldout_accuracy": 0.7}, parents=[sft])
    traces = _run(p, "distill", p / "distill", flops=5e10, metrics={"num_traces": 40}, parents=[rl])
    kd = _run(p, "distill-kd", p / "distill" / "student_kd", flops=4e10, metrics={"final_train_loss": 0.3},
              parents=[traces])
    _run(p, "distill-eval", p / "distill", flops=0.0, final=True, parents=[kd], metrics={"heldout_accuracy": 0.6})
    md = report.build(p).read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")}
    assert [c for c in rows if c in ("pretrain", "sft", "rl", "distill", "distill-kd", "distill-eval")] == \
        ["pretrain", "sft", "rl", "distill", "distill-kd", "distill-eval"]
    assert rows["rl"] == "ok" and "0.700" in next(l for l in md.splitlines() if l.startswith("| rl |"))
    assert "| final model's lineage | 6 |" in md and "| all runs (failed, aborted, killed included) | 7 |" in md
    assert "| of which stopped | 1 |" in md
    (label, xs, ys), = plotted["accuracy_vs_flops.png"][0][1]
    assert label == "sft → rl → distill-eval" and ys == [0.5, 0.7, 0.6]
    assert xs == pytest.approx([1.2e12, 1.3e12, 1.39e12])  # the student after its traces and its KD training


def test_report_states_each_study_headline_or_how_to_run_it(project):
    """A study's many runs stay out of the stage table; its headline (with its interval) and a link
    to its table are in the studies section, and a study not run names its command."""
    _run(project, "study:cold_start:rl", project / "studies" / "cold_start" / "K64" / "grpo", flops=3e12,
         metrics={"heldout_accuracy": 0.9})
    (project / "studies" / "cold_start").mkdir(parents=True, exist_ok=True)
    (project / "studies" / "cold_start" / "study.json").write_text(json.dumps(
        {"study": "cold_start", "headline": "cold_start (K = 256): +3.0 points [-1.0, +7.0]"}))
    md = report.build(project).read_text()
    rows = {line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")}
    assert not any(r.startswith("study:") for r in rows)
    assert "- **cold_start**: cold_start (K = 256): +3.0 points [-1.0, +7.0] ([table](../studies/cold_start/study.md))" in md
    # a study not run here: its published headline, dated, and the command that runs it here
    from sputnik.studies import published_headlines
    pub = published_headlines()["distill_vs_rl"]
    assert "paired by seed" in pub["headline"] and "[" in pub["headline"]  # its interval
    assert (f"- **distill_vs_rl**: not run in this project; measured {pub['measured']} (docs/benchmarks.md): "
            f"{pub['headline']} (`{pub['command']} --project {project}` runs it here)") in md
    assert pub["command"].startswith("sputnik study distill_vs_rl")
    assert set(published_headlines()) == {"beyond_the_data", "distill_vs_rl", "moe_vs_dense", "mtp", "cold_start"}
    # a variant of a study (another option, its own directory) follows it; a variant not run is not listed
    variant = project / "studies" / "beyond_the_data_abacus_lsb_none"
    variant.mkdir(parents=True)
    (variant / "study.json").write_text(json.dumps({"headline": "beyond_the_data_abacus_lsb_none: 0.00 at 6 digits"}))
    lines = report.build(project).read_text().splitlines()
    at = lines.index(next(x for x in lines if x.startswith("- **beyond_the_data**")))
    assert lines[at + 1] == ("- **beyond_the_data_abacus_lsb_none**: beyond_the_data_abacus_lsb_none: 0.00 at 6 digits "
                             "([table](../studies/beyond_the_data_abacus_lsb_none/study.md))")


def test_report_shows_held_out_accuracy_by_task_with_intervals(tmp_path):
    """Each stage's per-task held-out accuracy (and the distillation's teacher's), with the 95% Wilson
    interval and the number of problems; tasks a stage did not see are a dash."""
    from sputnik.metrics import wilson_interval

    p = tmp_path / "proj"
    sft = _run(p, "sft", p / "sft", flops=1e11, metrics={"accuracy": 0.8, "heldout_by_task": {
        "addition": {"accuracy": 0.9, "n": 40}, "subtraction": {"accuracy": 0.7, "n": 30}}})
    _run(p, "distill-eval", p / "distill", flops=0.0, parents=[sft], metrics={
        "heldout_accuracy": 0.5, "heldout_by_task": {"long_multiplication": {"accuracy": 0.5, "n": 30}},
        "teacher_by_task": {"long_multiplication": {"accuracy": 0.6, "n": 30}}})
    md = report.build(p).read_text()
    assert "| stage | addition | subtraction | long_multiplication |" in md
    lo, hi = wilson_interval(36, 40)
    assert f"| sft | 0.900 [{lo:.2f}, {hi:.2f}] n=40 | 0.700 [" in md and md.count("—") >= 3
    assert "| distill-eval (teacher) | — | — | 0.600 [" in md
