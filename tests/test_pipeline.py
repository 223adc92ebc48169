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
