"""What every study shares: its arms' runs under the ledger, their evaluation, and the table, JSON and
plots built from the ledger.

A study is a plain function that reads top to bottom: it calls `Runner.stage(...)` for each run of
each arm (a normal pipeline run: the stage's own Config, checkpoints, resume and ledger entry),
`Runner.evaluate(...)` for each model it compares, and `Runner.add(...)` for each row of its table.
`Runner.stage` skips a run whose `DONE.json` exists (so a killed study continues where it stopped,
and a finished one is rebuilt from its records), and reads the run's FLOPs and wall-clock back from
the ledger: a study's compute is what the ledger says was spent, never a number it assumes.

Statistics: every accuracy is over a held-out set of stated size (the test split of the study's
tasks, hash-disjoint from every training split; tasks/base.py) with its 95% Wilson interval per
seed; across seeds the table shows the mean, each seed's value, and a 95% Student-t interval of the
mean over seeds (with three seeds t = 4.30: wide, and honest about how much a seed moves a result).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from sputnik.common import atomic_write_json, atomic_write_text, print0
from sputnik.config import DeviceConfig, build, knob

# Two-sided 95% Student-t quantiles by degrees of freedom (scipy is not a dependency).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
EQUAL_COMPUTE_TOLERANCE = 0.05  # arms compared "at equal compute" differ by at most this fraction of FLOPs


@dataclass
class StageRun:
    """One finished run of an arm: what the ledger recorded for it."""
    name: str
    out_dir: str
    result: dict
    run_ids: list[str]
    flops: float
    wall_s: float

    @property
    def model(self) -> str:
        return str(Path(self.out_dir) / "model")


@dataclass
class Runner:
    project: Path
    study: str
    device: DeviceConfig
    force: set[str] = field(default_factory=set)
    rows: list[dict] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.project / "studies" / self.study

    def command(self, stage: str) -> str:
        return f"study:{self.study}:{stage}"

    # --- runs -----------------------------------------------------------------------------------
    def stage(self, name: str, stage: str, settings: dict, parents=()) -> StageRun:
        """Run (or reuse) one pipeline run `<study dir>/<name>` of `stage` ("pretrain", "sft", "rl", "distill")
        with `settings` (the stage's Config keys; out_dir, project_dir, device keys and resume are
        filled in here)."""
        from sputnik.stages import distill, pretrain, rl, sft

        stages = {"pretrain": (pretrain.Config, pretrain.run), "sft": (sft.Config, sft.run), "rl": (rl.Config, rl.run),
                  "distill": (distill.Config, distill.run)}
        cls, fn = stages[stage]
        out_dir = self.out / name
        settings = dict(settings, out_dir=str(out_dir), project_dir=str(self.project), resume="auto",
                        **{f.name: getattr(self.device, f.name) for f in fields(DeviceConfig)})
        cfg = build(cls, settings)
        done, marker = out_dir / "DONE.json", out_dir / "study_run.json"
        from sputnik.config import to_dict

        study_runs = self._study_runs()
        recipe, parents = _recipe(to_dict(cfg)), study_runs(parents)
        recorded = _recorded_recipe(out_dir) if out_dir.exists() else None
        # made with other settings, or from another parent run of the study (a redone SFT under the same
        # init path): never reused or resumed. Markers from before parents were recorded: settings only.
        before = _recorded_parents(out_dir)
        stale = recorded is not None and (recorded != recipe or (before is not None and study_runs(before) != parents))
        if done.is_file() and not self._forced(name) and not stale:
            result = json.loads(done.read_text())
        else:
            if out_dir.exists() and (self._forced(name) or stale):
                from sputnik import pipeline

                why = f"study --force {name}" if self._forced(name) else "its settings changed"
                pipeline.set_aside(out_dir.parent, out_dir.name, why=f"study {self.study}: {why}")
            print0(f"\n=== study {self.study}: {name} ({stage}) ===")
            atomic_write_json(marker, {"recipe": recipe, "stage": stage, "parents": parents})
            extra = dict(command=self.command(stage)) if stage != "distill" else {}
            result = fn(cfg, parents=list(parents), **extra)
            atomic_write_json(done, result)
        run_ids = list(result.get("run_ids", []))
        flops, wall = self.spent(out_dir, run_ids)
        return StageRun(name, str(out_dir), result, run_ids, flops, wall)

    def stage_at_flops(self, name: str, stage: str, settings: dict, target: float, per_step: float, parents=(),
                       steps_key: str = "steps", own_flops=lambda run: run.flops) -> tuple[StageRun, float]:
        """A run given `target` FLOPs: its step count from `per_step` (an estimate: FLOPs per step
        depend on the lengths of the sequences drawn), then checked against the ledger; a run off
        by more than the tolerance is redone once, as `<name>_redo`, with the count corrected by the
        measured rate (the first attempt stays, in the ledger and on disk: it was spent). Returns
        the run and its FLOPs / target ratio, asserted within EQUAL_COMPUTE_TOLERANCE (or one step,
        for budgets of a few steps)."""
        steps = max(1, round(target / per_step))
        run = self.stage(name, stage, _with_steps(settings, steps_key, steps), parents)
        flops = own_flops(run)
        # a budget of a few steps cannot be met closer than one step (smoke runs)
        tolerance = max(EQUAL_COMPUTE_TOLERANCE, flops / steps / target)
        if abs(flops / target - 1) > tolerance and flops > 0:
            steps = max(1, round(steps * target / flops))
            print0(f"study {self.study}: {name} spent {flops / target:.3f}x its budget; redone with {steps} steps")
            run = self.stage(f"{name}_redo", stage, _with_steps(settings, steps_key, steps), parents)
            flops = own_flops(run)
        return run, assert_equal_compute(f"{self.study} {name}", flops, target, tolerance)

    def _study_runs(self):
        """run_ids -> those that are runs of a study, sorted: not the shared base or data, whose
        preparation (`data generate`, `data tokenize`, ...) records a new run each time it finds its
        output made. Reads the ledger once."""
        from sputnik.accounting import ledger

        command = {r["run_id"]: r.get("command", "") for r in ledger.load(self.project)}
        return lambda run_ids: sorted(p for p in run_ids if command.get(p, "study:").startswith("study:"))

    def _forced(self, name: str) -> bool:
        return "all" in self.force or any(name == f or name.startswith(f.rstrip("/") + "/") for f in self.force)

    def lineage(self, out_dir: Path, run_ids) -> list[dict]:
        """The ledger rows of the runs into `out_dir` that produced the output named by `run_ids`:
        those runs and, through their parents, the earlier runs of a resumed stage (each resumed
        run names the runs that wrote its checkpoints). An attempt whose output was discarded (a
        study run redone from scratch) is not in the lineage, though it stays in the ledger."""
        from sputnik.accounting import ledger

        want = str(Path(out_dir).resolve())
        by_id = {r["run_id"]: r for r in ledger.load(self.project)}
        todo, seen, rows = list(run_ids), set(), []
        while todo:
            rid = todo.pop()
            if rid in seen or rid not in by_id:
                continue
            seen.add(rid)
            row = by_id[rid]
            todo.extend(row.get("parents") or [])
            where = (row.get("config") or {}).get("out_dir")
            if where and str(Path(where).resolve()) == want:
                rows.append(row)
        return rows

    def spent(self, out_dir: Path, run_ids) -> tuple[float, float]:
        """(FLOPs, wall-clock seconds) the ledger records for the lineage of `run_ids` in out_dir."""
        rows = self.lineage(out_dir, run_ids)
        return sum(r.get("flops") or 0.0 for r in rows), sum(r.get("wall_s") or 0.0 for r in rows)

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self, run: StageRun, task: str, *, problems: int, samples: int, temperature: float,
                 max_new_tokens: int, greedy_problems: int) -> dict:
        """Greedy pass@1 on `greedy_problems` held-out problems, and pass@1 / pass@k / maj@k of
        `samples` samples at `temperature` on the first `problems` of them; cached in the run's
        directory, recorded in the ledger as study:<name>:eval."""
        out = Path(run.out_dir) / "study_eval" / _slug(task)
        done = out / "DONE.json"
        request = dict(run_ids=list(run.run_ids), problems=problems, samples=samples, temperature=temperature,
                       max_new_tokens=max_new_tokens, greedy_problems=greedy_problems)
        if done.is_file() and not self._forced(run.name):
            cached = json.loads(done.read_text())
            if cached.pop("request", request) == request:  # results cached before requests were recorded: trusted
                return cached
        from sputnik.accounting.ledger import record_run
        from sputnik.evaluate import EvalConfig, run as eval_run

        device = {f.name: getattr(self.device, f.name) for f in fields(DeviceConfig)}
        res = {}
        with record_run(self.project, self.command("eval"), dict(model=run.model, task=task), parents=run.run_ids) as led:
            greedy = eval_run(build(EvalConfig, dict(model=run.model, task=task, num_problems=greedy_problems,
                                                     max_new_tokens=max_new_tokens, out=str(out / "greedy"), **device)))
            res.update(greedy=greedy["pass@1"], greedy_ci=greedy["pass@1_ci"], greedy_problems=greedy_problems,
                       greedy_strict=greedy.get("pass@1_strict"), format_rate=greedy["format_rate"])
            if samples > 1:
                sampled = eval_run(build(EvalConfig, dict(model=run.model, task=task, num_problems=problems,
                                                          samples=samples, temperature=temperature,
                                                          max_new_tokens=max_new_tokens, out=str(out / "sampled"),
                                                          **device)))
                res.update({k: sampled[k] for k in sampled if k.startswith(("pass@", "maj@"))},
                           sampled_problems=problems, samples=samples, temperature=temperature)
            led.metrics.update(heldout_accuracy=res["greedy"], task=task)
        atomic_write_json(done, dict(res, request=request))
        return res

    # --- the table ------------------------------------------------------------------------------
    def add(self, **row) -> None:
        self.rows.append(row)


_WHERE = {"out_dir", "project_dir", "resume", "config_class", *(f.name for f in fields(DeviceConfig))}


def _recipe(config: dict) -> str:
    """What a run computes: its resolved config without where it runs (device, threads, kernels)
    and where it writes."""
    import hashlib

    blob = json.dumps({k: v for k, v in config.items() if k not in _WHERE}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _recorded_recipe(out_dir: Path) -> str | None:
    """The recipe of the run in out_dir: its study marker, else the stage config it saved (runs made
    before the marker existed); None when neither exists (nothing to compare: trusted)."""
    marker, saved = out_dir / "study_run.json", out_dir / "stage_config.json"
    if marker.is_file():
        return json.loads(marker.read_text()).get("recipe")
    return _recipe(json.loads(saved.read_text())) if saved.is_file() else None


def _recorded_parents(out_dir: Path) -> list[str] | None:
    marker = out_dir / "study_run.json"
    return json.loads(marker.read_text()).get("parents") if marker.is_file() else None


def _with_steps(settings: dict, key: str, steps: int) -> dict:
    """settings with `key` = steps, evaluation and checkpoints at the end only (a study evaluates
    its models itself)."""
    extra = dict(checkpoint_every=steps) if "checkpoint_every" in settings or key == "steps" else {}
    return dict(settings, **{key: steps}, **extra)


def _slug(task: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in task)[:80]


def assert_equal_compute(what: str, flops: float, target: float, tolerance: float = EQUAL_COMPUTE_TOLERANCE) -> float:
    """The ratio flops / target; ValueError when it is off by more than `tolerance` (a study that
    says "at equal compute" must have spent it)."""
    if target <= 0:
        raise ValueError(f"{what}: the reference arm recorded no FLOPs in the ledger")
    ratio = flops / target
    if abs(ratio - 1) > tolerance:
        raise ValueError(f"{what}: {flops:.3g} FLOPs against the reference arm's {target:.3g} (ratio {ratio:.3f}; "
                         f"allowed ±{tolerance:.0%}): the arms are not at equal compute")
    return ratio


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean over seeds (one seed: no interval)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan, math.nan
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def paired(rows: list[dict], metric: str, a: dict, b: dict, scale: float = 1.0) -> dict:
    """Mean and t-interval over seeds of scale · (a − b) in `metric`, seed by seed: a and b select rows
    by their values (arm="SFT alone", traces=256, say); seeds present in both only."""
    def by_seed(where: dict) -> dict:
        return {x["seed"]: x[metric] for x in rows if all(x.get(k) == v for k, v in where.items())}

    va, vb = by_seed(a), by_seed(b)
    diffs = [scale * (va[s] - vb[s]) for s in va if s in vb]
    mean, lo, hi = mean_interval(diffs) if diffs else (math.nan, math.nan, math.nan)
    return dict(mean=mean, low=lo, high=hi, per_seed=diffs)


def aggregate(rows: list[dict], group: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """One entry per distinct `group` key, in first-seen order: each metric's mean, t-interval over
    seeds and per-seed values, and the mean FLOPs / wall-clock."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[g] for g in group), []).append(r)
    out = []
    for key, members in groups.items():
        entry = dict(zip(group, key), seeds=[m["seed"] for m in members], n=len(members))
        for metric in metrics + ("flops", "wall_s"):
            vals = [m[metric] for m in members if isinstance(m.get(metric), (int, float))]
            if vals:
                mean, lo, hi = mean_interval(vals)
                entry[metric] = dict(mean=mean, low=lo, high=hi, per_seed=vals)
        out.append(entry)
    return out


def cell(stat: dict | None, spec: str = ".2f") -> str:
    """'0.42 [0.31, 0.53] (0.40/0.45/0.41)': mean, 95% interval over seeds, each seed."""
    if not stat:
        return "—"
    s = format(stat["mean"], spec)
    if not math.isnan(stat["low"]):
        s += f" [{format(stat['low'], spec)}, {format(stat['high'], spec)}]"
    return s + " (" + "/".join(format(v, spec) for v in stat["per_seed"]) + ")"


def plot(path: Path, series: list[tuple[str, list[dict]]], metric: str, ylabel: str) -> None:
    """Two panels: `metric` against FLOPs and against wall-clock; each series a line through its
    aggregated points (mean over seeds, error bars the t-interval)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x, xlabel in ((axes[0], "flops", "training FLOPs (ledger)"), (axes[1], "wall_s", "training wall-clock (s, ledger)")):
        spread = [p[x]["mean"] for _, points in series for p in points if p.get(x) and p[x]["mean"] > 0]
        if spread and max(spread) > 10 * min(spread):  # a log axis only where it spans decades
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for label, points in series:
            pts = [p for p in points if p.get(metric) and p.get(x)]
            if not pts:
                continue
            xs = [p[x]["mean"] for p in pts]
            ys = [p[metric]["mean"] for p in pts]
            err = [[max(0.0, p[metric]["mean"] - p[metric]["low"]) if not math.isnan(p[metric]["low"]) else 0.0 for p in pts],
                   [max(0.0, p[metric]["high"] - p[metric]["mean"]) if not math.isnan(p[metric]["high"]) else 0.0 for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", markersize=4, capsize=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    from sputnik.accounting.report import save_figure

    save_figure(fig, path)


def write(runner: Runner, summary: dict, markdown: str) -> Path:
    """<project>/studies/<name>/{study.json, study.md} (the plot is written by the study), then the
    project's report card again, whose studies section states each study's headline."""
    from sputnik.accounting import report

    out = runner.out
    atomic_write_json(out / "study.json", dict(summary, rows=runner.rows))
    atomic_write_text(out / "study.md", markdown)
    report.build(runner.project)
    return out / "study.md"


# ---------------------------------------------------------------------------------------------
# What every study's config has
@dataclass
class StudyConfig(DeviceConfig):
    project: str = knob("runs/speedrun", "project directory: the study shares its speedrun's tokenizer and pretrained "
                                         "base (run first if missing) and ledger, and writes <project>/studies/<name>/")
    preset: Literal["cpu", "gpu", "gpus"] = knob("cpu", "the speedrun preset whose base model and stage settings the arms start from")
    seeds: list[int] = knob(default_factory=lambda: [0, 1, 2], help="seeds of every arm (data sample, initialisation order, sampling)")
    scale: float = knob(1.0, "multiply every step count, the base's too when the study pretrains it (0.1 = a smoke "
                             "run in its own --project; not the study's published setting)",
                        min=0.01, max=100.0)
    force: list[str] = knob(default_factory=list, help="runs to redo: a run name or a prefix such as K256 or K256/seed1 "
                                                       "('all' = every run of the study; the shared base is kept)")
    eval_problems: int = knob(200, "held-out problems for greedy accuracy (the same problems for every arm)", min=1)
    sampled_problems: int = knob(100, "held-out problems for pass@k / maj@k (the first of the greedy ones)", min=1)
    samples: int = knob(16, "k: samples per problem for pass@k and maj@k (1 = greedy only)", min=1)
    temperature: float = knob(1.0, "sampling temperature of pass@k / maj@k", min=0.01)

    def runner(self, study: str) -> Runner:
        return Runner(Path(self.project), study, build(DeviceConfig, {f.name: getattr(self, f.name) for f in fields(DeviceConfig)}),
                      force=set(self.force))

    def base(self) -> tuple[dict, list[str]]:
        """(the speedrun's stage settings, the run ids of its pretrained base), running the tokenizer
        and pretraining stages first when the project has not."""
        from sputnik import pipeline

        sr = build(pipeline.SpeedrunConfig, dict(project=self.project, preset=self.preset, scale=self.scale,
                                                 **{f.name: getattr(self, f.name) for f in fields(DeviceConfig)}))
        results = pipeline.run(sr, until="pretrain")
        return pipeline.stage_settings(sr), list(results["pretrain"].get("run_ids", []))


def own_settings(settings: dict) -> dict:
    """A speedrun stage's settings without what Runner.stage fills in (paths, device, resume)."""
    drop = {"out_dir", "project_dir", "resume", *(f.name for f in fields(DeviceConfig))}
    return {k: v for k, v in settings.items() if k not in drop}
