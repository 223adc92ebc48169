"""Studies: the statistics and equal-compute checks they rest on, answer-only RL prompts, and (slow)
a small cold_start study end to end."""
import json
import math

import pytest

from sputnik.studies import runner as R
from sputnik.tasks import get_task


def test_rl_prompts_carry_answers_only():
    from sputnik.rl.prompts import sample_prompts

    task = get_task("multiplication", trace="digits")
    assert all(ex.solution for ex in task.generate(8))  # the task has traces to leak
    examples = sample_prompts([task, get_task("addition")], step=3, n=16, seed=1)
    assert len(examples) == 16 and all(ex.solution == "" for ex in examples)
    assert all(ex.answer and ex.prompt for ex in examples)


def test_mean_interval_is_the_student_t_interval():
    m, lo, hi = R.mean_interval([0.4, 0.5, 0.6])
    half = 4.303 * 0.1 / math.sqrt(3)
    assert m == pytest.approx(0.5) and lo == pytest.approx(0.5 - half) and hi == pytest.approx(0.5 + half)
    m, lo, hi = R.mean_interval([0.7])
    assert m == 0.7 and math.isnan(lo) and math.isnan(hi)


def test_equal_compute_is_asserted():
    assert R.assert_equal_compute("x", 1.04e12, 1e12) == pytest.approx(1.04)
    with pytest.raises(ValueError, match="not at equal compute"):
        R.assert_equal_compute("x", 1.06e12, 1e12)
    with pytest.raises(ValueError, match="recorded no FLOPs"):
        R.assert_equal_compute("x", 1e12, 0.0)


def test_aggregate_and_cells():
    rows = [dict(arm="a", traces=64, seed=s, greedy=g, flops=10.0, wall_s=2.0) for s, g in [(0, 0.2), (1, 0.4), (2, 0.3)]]
    rows += [dict(arm="b", traces=64, seed=0, greedy=0.9, flops=20.0, wall_s=1.0)]
    table = R.aggregate(rows, ("traces", "arm"), ("greedy",))
    assert [(e["arm"], e["n"], e["seeds"]) for e in table] == [("a", 3, [0, 1, 2]), ("b", 1, [0])]
    assert table[0]["greedy"]["mean"] == pytest.approx(0.3) and table[0]["greedy"]["per_seed"] == [0.2, 0.4, 0.3]
    assert R.cell(table[0]["greedy"]) == "0.30 [0.05, 0.55] (0.20/0.40/0.30)"
    assert R.cell(table[1]["greedy"]) == "0.90 (0.90)" and R.cell(None) == "—"


def test_paired_differences_follow_the_seeds():
    rows = [dict(arm="rl", traces=64, seed=s, greedy=g) for s, g in [(0, 0.5), (1, 0.7), (2, 0.6)]]
    rows += [dict(arm="sft", traces=64, seed=s, greedy=g) for s, g in [(2, 0.3), (0, 0.4), (3, 0.9)]]  # seed 1 missing
    rows += [dict(arm="rl", traces=256, seed=0, greedy=0.0)]  # another K: not selected
    d = R.paired(rows, "greedy", dict(arm="rl", traces=64), dict(arm="sft", traces=64), 100)
    assert d["per_seed"] == pytest.approx([10.0, 30.0])  # seeds 0 and 2 only, in a's order
    m, lo, hi = R.mean_interval([10.0, 30.0])
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((20.0, lo, hi)) and lo < 0 < 20 < hi
    assert math.isnan(R.paired(rows, "greedy", dict(arm="rl"), dict(arm="none"))["mean"])


def test_spent_follows_the_lineage_of_a_directory(tmp_path):
    """A killed-and-resumed stage: both runs count (the resumed one names the first as its parent);
    a discarded earlier attempt into the same directory, and other directories, do not."""
    from sputnik.accounting.ledger import record_run

    arm = tmp_path / "studies" / "s" / "K64" / "grpo"
    ids = []
    for flops, parents in ((2e9, []), (3e9, []), (5e9, "previous")):  # discarded, first part, resumed part
        with record_run(tmp_path, "study:s:rl", dict(out_dir=str(arm)), energy_method="table",
                        parents=ids[-1:] if parents else []) as run:
            run.add(flops=flops)
        ids.append(run.run_id)
    with record_run(tmp_path, "study:s:sft", dict(out_dir=str(tmp_path / "other")), energy_method="table",
                    parents=ids[-1:]) as run:
        run.add(flops=7e9)
    runner = R.Runner(tmp_path, "s", device=None)
    flops, wall = runner.spent(arm, [ids[-1]])
    assert flops == pytest.approx(8e9) and wall >= 0
    assert runner.spent(arm, [run.run_id])[0] == pytest.approx(8e9)  # reached through a child in another directory
    assert runner.spent(tmp_path / "other", [run.run_id])[0] == pytest.approx(7e9)


def test_force_matches_run_names_and_prefixes(tmp_path):
    r = R.Runner(tmp_path, "s", device=None, force={"K256/seed1"})
    assert r._forced("K256/seed1/grpo") and r._forced("K256/seed1")
    assert not r._forced("K256/seed10/grpo") and not r._forced("K64/seed1/grpo")
    assert R.Runner(tmp_path, "s", device=None, force={"all"})._forced("anything")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cold_start_study_end_to_end(tmp_path):
    """A tiny cold_start study (smoke-scale base and arms, two seeds): every arm runs under the
    ledger, SFT alone is at the GRPO arm's FLOPs, the table has every cell, a rerun reuses it."""
    from sputnik.studies import cold_start

    cfg = cold_start.Config(project=str(tmp_path), seeds=[0, 1], scale=0.02, traces=[16], rl_steps=100,
                            rl_prompts_per_step=4, rl_group_size=2, eval_problems=8, sampled_problems=4, samples=2,
                            max_new_tokens=48, min_cold_start_steps=200, num_threads=1)
    summary = cold_start.run(cfg)
    table = {(e["traces"], e["arm"]): e for e in summary["table"]}
    assert set(table) == {(16, arm) for arm in cold_start.ARMS}
    for e in table.values():
        assert e["seeds"] == [0, 1] and 0 <= e["greedy"]["mean"] <= 1 and "pass@2" in e and "maj@2" in e
    rows = json.loads((tmp_path / "studies" / "cold_start" / "study.json").read_text())["rows"]
    for seed in (0, 1):
        by = {r["arm"]: r for r in rows if r["seed"] == seed}
        assert by["SFT alone"]["flops"] == pytest.approx(by["cold start + GRPO"]["flops"], rel=R.EQUAL_COMPUTE_TOLERANCE)
        assert by["cold start + GRPO"]["flops"] > by["cold start"]["flops"] > 0
    assert (tmp_path / "studies" / "cold_start" / "cold_start.png").is_file()
    md = (tmp_path / "studies" / "cold_start" / "study.md").read_text()
    assert "| 16 | cold start + GRPO |" in md and "8 test-split problems" in md
    assert "Cold start: 20 passes over the K traces, 200-1000 steps of 16 (K = 16: 4); GRPO: 2 steps of 4 prompts x 2" in md
    assert "(K = 16 traces, 20-pass cold start, 2 GRPO steps, 2 seeds, 8 held-out)" in summary["headline"] and "equal FLOPs [" in summary["headline"]
    from sputnik.accounting import ledger

    commands = [r["command"] for r in ledger.load(tmp_path)]
    assert commands.count("study:cold_start:rl") == 2 and commands.count("study:cold_start:eval") == 6
    again = cold_start.run(cfg)  # everything reused: same table, no new runs
    assert again["table"] == summary["table"] and len(ledger.load(tmp_path)) == len(commands)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_beyond_the_data_study_end_to_end(tmp_path):
    """Smoke scale: every length is evaluated for every arm on held-out problems; GRPO's prompts are
    longer than any trace; SFT alone is at the GRPO arm's FLOPs."""
    from sputnik.studies import beyond_the_data

    with pytest.raises(ValueError, match="must exceed trained_length"):
        beyond_the_data.Config(trained_length=4, rl_lengths=[4, 5])
    cfg = beyond_the_data.Config(project=str(tmp_path), seeds=[0], scale=0.02, sft_steps=300, rl_steps=150,
                                 rl_prompts_per_step=4, rl_group_size=2, eval_problems=6, eval_lengths=[2, 5],
                                 trained_length=2, rl_lengths=[3], max_new_tokens=40, num_threads=1)
    summary = beyond_the_data.run(cfg)
    table = {e["arm"]: e for e in summary["table"]}
    assert set(table) == set(beyond_the_data.ARMS)
    for e in table.values():
        assert set(e) >= {"length_2", "length_5", "flops", "wall_s"}
    assert table["SFT alone"]["flops"]["mean"] == pytest.approx(table["SFT + GRPO"]["flops"]["mean"], rel=0.5)
    rl_cfg = json.loads((tmp_path / "studies" / "beyond_the_data" / "seed0" / "grpo" / "stage_config.json").read_text())
    assert rl_cfg["tasks"] == ["addition:min_digits=3:max_digits=3"]
    sft_cfg = json.loads((tmp_path / "studies" / "beyond_the_data" / "seed0" / "sft" / "stage_config.json").read_text())
    assert sft_cfg["tasks"] == ["addition:min_digits=1:max_digits=1", "addition:min_digits=2:max_digits=2"]
    assert "5 digits" in (tmp_path / "studies" / "beyond_the_data" / "study.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_distill_vs_rl_study_end_to_end(tmp_path):
    """Smoke scale: one teacher, one student base, the RL student and three distillation arms at the
    RL student's FLOPs (teacher forwards taken out of the KD arms and shown as the teacher's)."""
    from sputnik.studies import distill_vs_rl

    # a teacher that gets some one-digit sums right (300 SFT steps) so that it has verified traces to give
    cfg = distill_vs_rl.Config(project=str(tmp_path), seeds=[0], scale=0.02, task="addition:max_digits=1",
                               cold_start_steps=15000, rl_steps=100, student_pretrain_steps=600, distill_prompts=32,
                               teacher_samples=2, traces=64, eval_problems=6, sampled_problems=3, samples=2,
                               max_new_tokens=40, num_threads=1)
    summary = distill_vs_rl.run(cfg)
    table = {e["arm"]: e for e in summary["table"]}
    assert set(table) == set(distill_vs_rl.ARMS)
    rows = json.loads((tmp_path / "studies" / "distill_vs_rl" / "study.json").read_text())["rows"]
    by = {r["arm"]: r for r in rows}
    for arm in distill_vs_rl.ARMS[1:]:
        # the study asserted equality (to one step at this smoke scale): the ratio is what it measured
        assert by[arm]["student_flops"] == pytest.approx(by["student RL"]["student_flops"] * by[arm]["compute_ratio"])
        assert by[arm]["teacher_flops"] > 0  # its traces (and KD's forwards) cost the teacher
    assert by["distill (logit)"]["teacher_flops"] > by["distill (sequence)"]["teacher_flops"]  # + KD forwards
    assert "teacher" in summary and 0 <= summary["teacher"]["greedy"] <= 1
    assert "points paired by seed (teacher" in summary["headline"]  # one seed: no interval, the difference stated


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_moe_vs_dense_study_end_to_end(tmp_path):
    """Smoke scale: a generated corpus, its tokenizer and shards; two sizes x two budgets of MoE and
    dense twin at equal FLOPs, the granularity arms, the crossover table and both plots."""
    from sputnik.studies import moe_vs_dense

    cfg = moe_vs_dense.Config(project=str(tmp_path), seeds=[0], scale=0.02, sizes=["32x2", "48x2"], tokens=[2e6, 4e6],
                              granularity_size="32x2", corpus_mb=4, vocab_size=400, seq_len=64, batch_size=8,
                              eval_tasks=["addition:max_digits=2", "rg:chain_sum"], eval_per_task=4, evals=4,
                              num_threads=1)
    summary = moe_vs_dense.run(cfg)
    arms = {(e["size"], e["budget"], e["arch"]) for e in summary["table"]}
    assert {(s, b, a) for s in cfg.sizes for b in cfg.tokens for a in moe_vs_dense.ARCHS} <= arms
    assert {a for (s, b, a) in arms if s == "32x2" and b == 4e6} == {
        "moe", "dense", "moe 8 experts", "moe 32 experts", "moe no shared expert"}
    rows = json.loads((tmp_path / "studies" / "moe_vs_dense" / "study.json").read_text())["rows"]
    for r in rows:
        assert r["compute_ratio"] == pytest.approx(1.0, abs=0.34)  # equal FLOPs to a step at this scale
        assert 0 < r["heldout_loss"] < 10 and 0 <= r["downstream"] <= 1 and r["active"] <= r["params"]
    moe = [r for r in rows if r["arch"] == "moe"]
    assert all(r["active"] < r["params"] for r in moe)
    # the default twin is the MoE's own model with dense FFNs: no experts, the MoE's active parameters
    assert all(r["active"] == r["params"] for r in rows if r["arch"] == "dense")
    assert (tmp_path / "studies" / "moe_vs_dense" / "48x2" / "2e+06" / "seed0" / "dense_mla" / "model").is_dir()
    points = summary["crossover"]["points"]
    assert [p["size"] for p in points] == cfg.sizes
    assert all(p["flops_ratio"] or p["flops_ratio_at_least"] for p in points)
    out = tmp_path / "studies" / "moe_vs_dense"
    assert (out / "moe_vs_dense.png").is_file() and (out / "moe_vs_dense_crossover.png").is_file()
    assert summary["headline"].startswith("moe_vs_dense:")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mtp_study_end_to_end(tmp_path):
    """Smoke scale: depths 0/1/2 at depth 0's FLOPs (deeper arms take fewer steps), downstream accuracy,
    and the depth-1 module as a draft that gives plain greedy's output exactly."""
    from sputnik.studies import mtp

    cfg = mtp.Config(project=str(tmp_path), seeds=[0], scale=0.02, size="32x2", tokens=4e6, corpus_mb=4, vocab_size=400,
                     seq_len=64, batch_size=8, eval_tasks=["addition:max_digits=2"], eval_per_task=4, evals=4,
                     spec_prompts=3, num_threads=1)
    summary = mtp.run(cfg)
    rows = json.loads((tmp_path / "studies" / "mtp" / "study.json").read_text())["rows"]
    by = {r["depth"]: r for r in rows}
    assert set(by) == {0, 1, 2}
    assert by[0]["steps"] > by[1]["steps"] > by[2]["steps"]  # an MTP module costs FLOPs: fewer steps
    for d in (1, 2):
        assert by[d]["flops"] == pytest.approx(by[0]["flops"], rel=0.34)
        assert by[d]["same_output"] == 1.0 and 0 <= by[d]["acceptance"] <= 1 and by[d]["tokens_per_forward"] >= 1
    assert "acceptance" not in by[0]
    assert summary["headline"].startswith("mtp (32x2, equal FLOPs, 1 seed)")


def test_flops_to_reach_interpolates_the_curve():
    from sputnik.studies.moe_vs_dense import crossover, flops_to_reach

    curve = [(1e9, 5.0), (2e9, 4.0), (4e9, 3.0)]
    assert flops_to_reach(curve, 5.5) == 1e9
    assert flops_to_reach(curve, 3.5) == pytest.approx(math.sqrt(2e9 * 4e9))  # halfway in log FLOPs
    assert flops_to_reach(curve, 2.0) is None
    # a crossover fit through two sizes: ratio 1.0 at 1M active, 0.5 at 4M -> 0.7 at 4^(log(0.7)/log(0.5)) M
    rows = []
    for size, active, ratio in (("a", 1e6, 1.0), ("b", 4e6, 0.5)):
        rows.append(dict(size=size, budget=1.0, arch="dense", heldout_loss=3.0, flops=1e10, wall_s=10.0, active=active))
        rows.append(dict(size=size, budget=1.0, arch="moe", heldout_loss=2.9, flops=1e10, wall_s=10.0, active=active,
                         curve=[(ratio * 1e10, 3.0), (1e10, 2.9)]))
    cfg = type("C", (), dict(tokens=[1.0], sizes=["a", "b"]))
    cross = crossover(cfg, rows)
    assert [p["flops_ratio"] for p in cross["points"]] == pytest.approx([1.0, 0.5])
    assert cross["fit"]["crossover_active"] == pytest.approx(1e6 * 4 ** (math.log(0.7) / math.log(0.5)))


def test_heldout_problems_are_disjoint_from_every_training_split():
    """The problems a study evaluates (test split, every length) never occur in what its SFT and
    GRPO runs draw (train split), the longer lengths included: the hash split decides, per problem."""
    from sputnik.studies import beyond_the_data, cold_start
    from sputnik.tasks import parse_task, split_of

    cfg = beyond_the_data.Config(trained_length=2, rl_lengths=[3], eval_lengths=[2, 3, 4])
    train = {ex.meta["key"] for spec in [cfg.task(n) for n in (1, 2, 3)] + [cold_start.TASK]
             for ex in parse_task(spec).generate(3000, split="train", seed=0)}
    for spec in [cfg.task(n) for n in cfg.eval_lengths] + [cold_start.TASK]:
        held = [ex.meta["key"] for ex in parse_task(spec).generate(200, split="test", seed=0)]
        assert held and all(split_of(k) == "test" for k in held) and not set(held) & train


def test_beyond_the_data_index_hints_variant_writes_hinted_tasks_to_its_own_directory():
    from sputnik.studies import beyond_the_data
    from sputnik.tasks import parse_task

    cfg = beyond_the_data.Config(digit_order="lsb", index_hints=True)
    assert cfg.name == "beyond_the_data_rope_lsb_columns_hints"
    ex = parse_task(cfg.task(6)).generate(1, split="test")[0]
    assert ex.prompt.startswith("What is (") and len(ex.answer) == 2 * 7  # six digits and the padding place, lettered
    assert beyond_the_data.Config().name == "beyond_the_data"
    assert beyond_the_data.Config(digit_order="lsb", index_hints=True, position_gaps=8).name == \
        "beyond_the_data_rope_lsb_columns_hints_gaps8"
    assert beyond_the_data.Config(digit_order="lsb", index_hints=True, rl_reward="places").name == \
        "beyond_the_data_rope_lsb_columns_hints_places"
    padded = beyond_the_data.Config(digit_order="lsb", index_hints=True, pad_places=8, position_gaps=8)
    assert padded.name == "beyond_the_data_rope_lsb_columns_hints_pad8_gaps8"
    assert parse_task(padded.task(4)).generate(1)[0].answer.count("0") >= 3  # four digits, eight places
    with pytest.raises(ValueError, match="must exceed every GRPO and evaluated length"):
        beyond_the_data.Config(digit_order="lsb", index_hints=True, pad_places=7)
    with pytest.raises(ValueError, match="index_hints true"):
        beyond_the_data.Config(rl_reward="places")
    with pytest.raises(ValueError, match="index_hints true"):
        beyond_the_data.Config(pad_places=8)
    with pytest.raises(ValueError, match="digit_order lsb"):
        beyond_the_data.Config(index_hints=True)
    with pytest.raises(ValueError, match="addition's knobs"):
        beyond_the_data.Config(family="word_problems", index_hints=True)


def test_beyond_the_data_replay_round_follows_the_first_and_sft_alone_pays_for_both(tmp_path, monkeypatch):
    """--rl_replay_steps: a second GRPO stage from the first one's model, its prompts split evenly over
    the longest trained length and the GRPO lengths; SFT alone is given all three stages' FLOPs; the
    table has the first round's row beside the final one."""
    from sputnik import pipeline
    from sputnik.accounting import report
    from sputnik.config import build
    from sputnik.studies import beyond_the_data

    speedrun = pipeline.stage_settings(build(pipeline.SpeedrunConfig, dict(project=str(tmp_path))))
    monkeypatch.setattr(beyond_the_data.Config, "base", lambda self: (speedrun, ["base-run"]))
    stages, flops = {}, {"seed0/sft": 1e12, "seed0/grpo": 2e12, "seed0/grpo_replay": 0.5e12}

    def stage(self, name, kind, settings, parents=()):
        stages[name] = dict(settings, parents=list(parents))
        return R.StageRun(name, str(tmp_path / name), {"steps": settings["steps"]}, [name], flops[name], 1.0)

    def stage_at_flops(self, name, kind, settings, target, per_step, parents=()):
        stages[name] = dict(settings, target=target)
        return R.StageRun(name, str(tmp_path / name), {"steps": 1}, [name], target, 1.0), 1.0

    monkeypatch.setattr(R.Runner, "stage", stage)
    monkeypatch.setattr(R.Runner, "stage_at_flops", stage_at_flops)
    monkeypatch.setattr(R.Runner, "evaluate", lambda self, run, task, **kw: {"greedy": 0.5})
    monkeypatch.setattr(report, "build", lambda project: None)  # no ledger here: the stages are faked
    cfg = beyond_the_data.Config(project=str(tmp_path), seeds=[0], digit_order="lsb", index_hints=True,
                                 rl_reward="places", rl_steps=40, rl_replay_steps=30, trained_length=4,
                                 rl_lengths=[5, 6], eval_lengths=[4, 6])
    assert cfg.name == "beyond_the_data_rope_lsb_columns_hints_places_replay30"
    summary = beyond_the_data.run(cfg)
    first, replay = stages["seed0/grpo"], stages["seed0/grpo_replay"]
    assert first["task_sampling"] == "learnability" and first["tasks"] == [cfg.task(5), cfg.task(6)]
    assert replay["tasks"] == [cfg.task(4), cfg.task(5), cfg.task(6)] and replay["task_sampling"] == "round_robin"
    assert replay["init"] == str(tmp_path / "seed0/grpo" / "model") and replay["parents"] == ["seed0/grpo"]
    assert replay["steps"] == 30 and replay["reward_fn"] == first["reward_fn"] == "sputnik.tasks.arithmetic:place_credit"
    assert stages["seed0/sft_alone"]["target"] == pytest.approx(3.5e12)
    table = {e["arm"]: e for e in summary["table"]}
    assert list(table) == ["SFT", beyond_the_data.ROUND_1, "SFT + GRPO", "SFT alone"]
    assert table[beyond_the_data.ROUND_1]["flops"]["mean"] == pytest.approx(3e12)
    assert table["SFT + GRPO"]["flops"]["mean"] == pytest.approx(3.5e12)
    assert "replays 4 digits" in (tmp_path / "studies" / cfg.name / "study.md").read_text()


def test_a_finished_run_is_reused_only_with_the_same_recipe(tmp_path, monkeypatch):
    """Same settings: the finished run is reused (threads may differ); other settings: the old
    output is set aside and the run made anew; an unfinished run of the same settings resumes in place."""
    from sputnik.config import DeviceConfig
    from sputnik.stages import sft

    calls = []

    def fake_run(cfg, parents=(), command="sft"):
        calls.append(cfg.steps)
        return {"run_ids": [], "steps": cfg.steps}

    monkeypatch.setattr(sft, "run", fake_run)
    settings = dict(init=str(tmp_path / "base"), tasks=["addition"], steps=2)
    r = R.Runner(tmp_path, "s", device=DeviceConfig(num_threads=1))
    assert r.stage("a", "sft", settings).result["steps"] == 2 and calls == [2]
    r.device = DeviceConfig(num_threads=2)
    r.stage("a", "sft", settings)
    assert calls == [2]  # reused
    assert r.stage("a", "sft", dict(settings, steps=3)).result["steps"] == 3 and calls == [2, 3]
    assert (tmp_path / "studies" / "s" / "a.superseded-1" / "DONE.json").is_file()
    (tmp_path / "studies" / "s" / "a" / "DONE.json").unlink()  # killed before it finished
    r.stage("a", "sft", dict(settings, steps=3))
    assert calls == [2, 3, 3] and not (tmp_path / "studies" / "s" / "a.superseded-2").exists()


def test_a_run_made_from_another_parent_run_is_redone(tmp_path, monkeypatch):
    """Same settings, but its parent was redone (an SFT rerun under the same init path): the child run
    (GRPO from that SFT) is made anew, not reused."""
    from sputnik.config import DeviceConfig
    from sputnik.stages import rl

    calls = []

    def fake_run(cfg, parents=(), command="rl"):
        calls.append(list(parents))
        return {"run_ids": [f"rl-{len(calls)}"]}

    monkeypatch.setattr(rl, "run", fake_run)
    settings = dict(init=str(tmp_path / "sft" / "model"), tasks=["addition"], steps=2)
    r = R.Runner(tmp_path, "s", device=DeviceConfig(num_threads=1))
    r.stage("grpo", "rl", settings, parents=["sft-1"])
    r.stage("grpo", "rl", settings, parents=["sft-1"])
    assert calls == [["sft-1"]]
    r.stage("grpo", "rl", settings, parents=["sft-2"])
    assert calls == [["sft-1"], ["sft-2"]]
    # the shared data's preparation records a new run each time it finds its output made: not a new parent
    from sputnik.accounting.ledger import record_run

    ids = []
    for _ in range(2):
        with record_run(tmp_path, "data tokenize", {}) as led:
            ids.append(led.run_id)
    r.stage("pre", "rl", settings, parents=[ids[0]])
    r.stage("pre", "rl", settings, parents=[ids[1]])
    assert len(calls) == 3


def test_the_crossover_takes_each_arm_at_its_best_learning_rate():
    """Two learning rates per arm: the dense twin is better at the lower one, the MoE at the higher;
    the crossover compares the two best (first-seed losses decide, the extra seeds of a rate follow)."""
    from sputnik.studies.moe_vs_dense import best_lr, crossover

    rows = [dict(size="a", budget=1.0, arch="dense", lr=1e-3, seed=0, heldout_loss=2.8, flops=1e10, wall_s=10.0, active=1e6),
            dict(size="a", budget=1.0, arch="dense", lr=3e-3, seed=0, heldout_loss=3.0, flops=1e10, wall_s=10.0, active=1e6),
            dict(size="a", budget=1.0, arch="dense", lr=3e-3, seed=1, heldout_loss=2.0, flops=1e10, wall_s=10.0, active=1e6),
            dict(size="a", budget=1.0, arch="moe", lr=1e-3, seed=0, heldout_loss=3.1, flops=1e10, wall_s=10.0, active=1e6,
                 curve=[(1e10, 3.1)]),
            dict(size="a", budget=1.0, arch="moe", lr=3e-3, seed=0, heldout_loss=2.7, flops=1e10, wall_s=10.0, active=1e6,
                 curve=[(2e9, 3.0), (5e9, 2.8), (1e10, 2.7)])]
    assert best_lr([x for x in rows if x["arch"] == "dense"]) == 1e-3  # seed 1's 2.0 does not count
    (point,) = crossover(type("C", (), dict(tokens=[1.0], sizes=["a"])), rows)["points"]
    assert (point["moe_lr"], point["dense_lr"], point["dense_loss"]) == (3e-3, 1e-3, 2.8)
    assert point["flops_ratio"] == pytest.approx(0.5)


def test_the_moe_headline_states_the_losses_behind_it_with_intervals():
    from sputnik.studies.moe_vs_dense import _largest_losses

    rows = [dict(size=size, budget=b, arch=arch, lr=3e-3, seed=s, heldout_loss=loss + 0.01 * s, flops=1.0, wall_s=1.0)
            for size in ("48x2", "144x4") for b in (5e5, 2e6) for arch, loss in (("moe", 1.0), ("dense", 1.2)) for s in range(3)]
    table = R.aggregate(rows, ("size", "budget", "arch", "lr"), ("heldout_loss",))
    cfg = type("C", (), dict(sizes=["48x2", "144x4"], tokens=[5e5, 2e6], lr=3e-3))
    lo, hi = R.mean_interval([1.0, 1.01, 1.02])[1:]
    assert _largest_losses(cfg, table) == (f"; at 144x4 (2e+06 tokens, lr 0.003, 3 seeds): MoE 1.010 [{lo:.3f}, {hi:.3f}] "
                                           f"vs dense 1.210 [{lo + 0.2:.3f}, {hi + 0.2:.3f}]")
    assert _largest_losses(cfg, [e for e in table if e["arch"] == "moe"]) == ""  # no twin measured there: nothing claimed
