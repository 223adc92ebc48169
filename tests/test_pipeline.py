"""The speedrun's stage bookkeeping: finished stages are skipped, --force reruns a stage and every
stage after it from scratch (the old output set aside, never resumed from). The stages themselves
are replaced by recorders here; the slow compare test runs the real ones."""
import json

import pytest

from sputnik import pipeline
from sputnik.accounting import report
from sputnik.config import build
from sputnik.stages import distill, pretrain, sft
from sputnik.stages import rl as grpo
from sputnik.stages import tokenizer as train_tokenizer


def test_rerun_from_includes_every_later_stage():
    assert pipeline.rerun_from(set()) == []
    assert pipeline.rerun_from({"rl"}) == ["rl", "distill"]
    assert pipeline.rerun_from({"distill", "pretrain"}) == ["pretrain", "sft", "rl", "distill"]
    assert pipeline.rerun_from({"report"}) == []  # the report is rebuilt on every run anyway
    assert pipeline.rerun_from(set(pipeline.STAGES)) == ["tokenizer", "pretrain", "sft", "rl", "distill"]


@pytest.fixture
def recorded(monkeypatch):
    """Replace each stage by a recorder that notes whether it found an old file in its out_dir."""
    calls = []

    def fake(name):
        def run(cfg, **kw):
            out = pipeline.Path(cfg.out_dir)
            calls.append((name, (out / "old.txt").exists()))
            out.mkdir(parents=True, exist_ok=True)
            (out / "old.txt").write_text(name)
            return {"stage": name}
        return run

    for mod, name in ((train_tokenizer, "tokenizer"), (pretrain, "pretrain"), (sft, "sft"), (grpo, "rl"),
                      (distill, "distill")):
        monkeypatch.setattr(mod, "run", fake(name))
    monkeypatch.setattr(report, "build", lambda project: project / "report" / "report.md")
    return calls


def test_rerun_skips_done_stages_and_force_reruns_downstream_from_scratch(tmp_path, recorded):
    project = tmp_path / "p"
    cfg = lambda **kw: build(pipeline.SpeedrunConfig, dict(project=str(project), **kw))  # noqa: E731
    pipeline.run(cfg())
    assert recorded == [(s, False) for s in ("tokenizer", "pretrain", "sft", "rl", "distill")]
    assert json.loads((project / "rl" / "DONE.json").read_text()) == {"stage": "rl"}

    recorded.clear()
    pipeline.run(cfg())
    assert recorded == []  # everything done: nothing reruns

    pipeline.run(cfg(force=["rl"]))
    # rl and distill rerun, each in an empty directory (no stale checkpoint to resume from)
    assert recorded == [("rl", False), ("distill", False)]
    assert (project / "rl.superseded-1" / "old.txt").read_text() == "rl"
    assert (project / "rl.superseded-1" / "DONE.json").is_file()
    assert (project / "distill.superseded-1").is_dir() and (project / "sft" / "old.txt").is_file()

    recorded.clear()
    pipeline.run(cfg(force=["distill"]))
    assert recorded == [("distill", False)]
    assert (project / "distill.superseded-2").is_dir()


def test_every_stage_gets_the_run_settings_the_same_way(tmp_path):
    """One dialect: every stage after the tokenizer gets the same run keys, and each stage's init is
    the previous stage's model directory; the settings validate against the stages' Configs."""
    p = tmp_path / "p"
    cfg = build(pipeline.SpeedrunConfig, dict(project=str(p), seed=3, num_threads=1, device="cpu"))
    settings = pipeline.stage_settings(cfg)
    for name in ("pretrain", "sft", "rl", "distill"):
        run = {k: settings[name][k] for k in ("out_dir", "project_dir", "seed", "device", "num_threads", "resume")}
        assert run == dict(out_dir=str(p / name), project_dir=str(p), seed=3, device="cpu", num_threads=1,
                           resume="auto"), name
    # the teacher's stages share the speedrun's tokenizer; the student's '' means the teacher's
    assert [settings[n]["tokenizer"] for n in ("pretrain", "sft", "rl", "distill")] == [str(p / "tokenizer")] * 3 + [""]
    assert settings["tokenizer"]["out_dir"] == str(p / "tokenizer") and settings["tokenizer"]["project_dir"] == str(p)
    assert settings["tokenizer"]["seed"] == 3
    assert settings["pretrain"]["init"] == ""
    assert settings["sft"]["init"] == str(tmp_path / "p" / "pretrain" / "model")
    assert settings["rl"]["init"] == str(tmp_path / "p" / "sft" / "model")
    assert settings["distill"]["teacher"] == str(tmp_path / "p" / "rl" / "model")
    assert settings["distill"]["init"] == ""  # a fresh student
    build(train_tokenizer.Config, settings["tokenizer"])
    for name, cls in (("pretrain", pretrain.Config), ("sft", sft.Config), ("rl", grpo.Config),
                      ("distill", distill.Config)):
        assert build(cls, settings[name]).ledger_dir == str(p), name  # one ledger for the project


def test_the_base_reads_its_own_tasks_and_the_recipe_adds_a_harder_one(tmp_path):
    """The base pretrains on pretrain_tasks only (the studies start from it); SFT, RL and distillation
    share `tasks`, which by default add long multiplication, a task the base never read."""
    from sputnik.tasks import parse_tasks

    settings = pipeline.stage_settings(build(pipeline.SpeedrunConfig, dict(project=str(tmp_path / "p"))))
    assert settings["pretrain"]["tasks"] == ["addition", "subtraction"]
    recipe = [settings[n]["tasks"] for n in ("sft", "rl", "distill")]
    assert recipe == [["addition", "subtraction", "@long_multiplication"]] * 3
    assert {t.name for t in parse_tasks(recipe[0])} == {"addition", "subtraction", "multiplication"}
    own = pipeline.stage_settings(build(pipeline.SpeedrunConfig, dict(project=str(tmp_path / "q"), tasks=["addition"],
                                                                      pretrain_tasks=["addition", "multiplication"])))
    assert own["pretrain"]["tasks"] == ["addition", "multiplication"] and own["sft"]["tasks"] == ["addition"]


def test_each_stage_names_the_previous_stages_runs_as_parents(tmp_path, monkeypatch):
    """Explicit lineage: every stage gets the run ids the stage before returned (from its DONE.json when
    it was finished earlier), and only the student's evaluation is the final model; the pipeline
    never reads the ledger to find out what ran."""
    from sputnik.accounting import ledger

    seen = {}

    def fake(name):
        def run(cfg, parents=(), **kw):
            seen[name] = (list(parents), kw)
            return {"stage": name, "run_ids": [f"{name}-run"]}
        return run

    for mod, name in ((train_tokenizer, "tokenizer"), (pretrain, "pretrain"), (sft, "sft"), (grpo, "rl"),
                      (distill, "distill")):
        monkeypatch.setattr(mod, "run", fake(name))
    monkeypatch.setattr(report, "build", lambda project: project / "report" / "report.md")
    monkeypatch.setattr(ledger, "load", lambda *a, **k: pytest.fail("the pipeline re-read the ledger"))
    cfg = build(pipeline.SpeedrunConfig, dict(project=str(tmp_path / "p")))
    pipeline.run(cfg)
    assert seen == {"tokenizer": ([], {}), "pretrain": (["tokenizer-run"], {}), "sft": (["pretrain-run"], {}),
                    "rl": (["sft-run"], {}), "distill": (["rl-run"], {"final_model": True})}
    seen.clear()
    pipeline.run(build(pipeline.SpeedrunConfig, dict(project=str(tmp_path / "p"), force=["rl"])))
    assert seen == {"rl": (["sft-run"], {}), "distill": (["rl-run"], {"final_model": True})}  # sft's ids from DONE.json


def test_final_lineage_is_the_chain_of_parents(tmp_path):
    """The ledger's final lineage follows the parents each run named: a real chain of record_run calls
    (tokenizer -> pretrain -> a killed and a resumed SFT run -> the final model) against an unrelated run."""
    from sputnik.accounting import ledger

    ids = {}
    for name, parents, final in (("tokenizer", [], False), ("pretrain", ["tokenizer"], False),
                                 ("sft-1", ["pretrain"], False), ("sft-2", ["pretrain", "sft-1"], False),
                                 ("side", [], False), ("eval", ["sft-2"], True)):
        with ledger.record_run(tmp_path, name, parents=[ids[p] for p in parents], final_model=final,
                               energy_method="table") as run:
            ids[name] = run.run_id
    lineage = ledger.final_lineage(ledger.load(tmp_path))
    assert lineage == {ids[n] for n in ("tokenizer", "pretrain", "sft-1", "sft-2", "eval")}


def test_speedrun_final_lineage_covers_every_stage_run(tmp_path, monkeypatch):
    """A speedrun-like chain through pipeline.run, each stage replaced by a stub that records real ledger
    runs under the parents the pipeline handed it (distillation as the real one does: traces ->
    student SFT -> evaluation, the last marked final). The ledger's final lineage is then exactly the
    stages' runs: an unrelated run in the same project stays out, and after --force rl the superseded
    rl/distill runs drop out while the earlier stages stay in. The pipeline never reads the ledger."""
    from sputnik.accounting import ledger

    project = tmp_path / "p"
    recorded = []  # (stage, run_id), in order

    def record(cfg, command, parents, final=False):
        with ledger.record_run(project, command, parents=list(parents), final_model=final,
                               energy_method="table") as run:
            assert cfg.project_dir == str(project)  # every stage writes to the project's ledger
        recorded.append((command, run.run_id))
        return [run.run_id]

    def fake(name):
        def run(cfg, parents=(), final_model=False):
            if name != "distill":
                return {"stage": name, "run_ids": record(cfg, name, parents)}
            traces = record(cfg, "distill", parents)
            student = record(cfg, "distill-sft", traces)
            return {"stage": name, "run_ids": record(cfg, "distill-eval", student, final=final_model)}
        return run

    for mod, name in ((train_tokenizer, "tokenizer"), (pretrain, "pretrain"), (sft, "sft"), (grpo, "rl"),
                      (distill, "distill")):
        monkeypatch.setattr(mod, "run", fake(name))
    monkeypatch.setattr(report, "build", lambda project: project / "report" / "report.md")
    with ledger.record_run(project, "eval", energy_method="table") as side:  # a run outside the chain
        pass

    def speedrun(**kw):
        with monkeypatch.context() as m:
            for reader in ("load", "merge_runs", "final_lineage"):
                m.setattr(ledger, reader, lambda *a, **k: pytest.fail("the pipeline re-read the ledger"))
            pipeline.run(build(pipeline.SpeedrunConfig, dict(project=str(project), **kw)))

    speedrun()
    first = dict(recorded)
    assert list(first) == ["tokenizer", "pretrain", "sft", "rl", "distill", "distill-sft", "distill-eval"]
    rows = ledger.load(project)
    assert ledger.final_lineage(rows) == set(first.values()) and side.run_id not in ledger.final_lineage(rows)
    by_id = {r["run_id"]: r for r in rows}
    assert [by_id[first[n]]["parents"] for n in ("pretrain", "sft", "rl", "distill")] == [
        [first["tokenizer"]], [first["pretrain"]], [first["sft"]], [first["rl"]]]
    assert [r["run_id"] for r in rows if r.get("final_model")] == [first["distill-eval"]]

    recorded.clear()
    speedrun(force=["rl"])
    second = dict(recorded)
    assert list(second) == ["rl", "distill", "distill-sft", "distill-eval"]
    lineage = ledger.final_lineage(ledger.load(project))
    kept = {first[n] for n in ("tokenizer", "pretrain", "sft")}
    assert lineage == kept | set(second.values())  # the superseded rl and distillation runs are overhead
    assert first["rl"] not in lineage and first["distill-eval"] not in lineage


def test_environment_and_device_flags_reach_every_stage(monkeypatch):
    """SPUTNIK_COMPILE / SPUTNIK_CPU_KERNELS (config.ENVIRONMENT) set the speedrun's DeviceConfig
    fields, which every model stage of the recipe gets."""
    from sputnik.cli import build_parser
    from sputnik.config import config_from_args

    monkeypatch.setenv("SPUTNIK_CPU_KERNELS", "0")
    monkeypatch.setenv("SPUTNIK_COMPILE", "1")
    cfg = config_from_args(build_parser().parse_args(["speedrun", "--num_threads", "1"]), pipeline.SpeedrunConfig)
    settings = pipeline.stage_settings(cfg)
    for name in ("pretrain", "sft", "rl", "distill"):
        assert (settings[name]["cpu_kernels"], settings[name]["compile"], settings[name]["num_threads"]) == (False, True, 1)
