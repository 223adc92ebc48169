"""The report card: markdown + PNG plots built only from the ledger and the stages' metrics files
(never from strings formatted inside training loops; STYLE.md §12).

Inputs: `<project>/ledger.jsonl` (one row per run, with the stage's resolved config, cost and
summary metrics such as `heldout_accuracy`, `params_total`, `params_active`) and each run's
`<out_dir>/metrics.jsonl` (per-step records). Output: `<project>/report/report.md` and PNGs.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

from sputnik.accounting import ledger
from sputnik.common import atomic_write_text
from sputnik.metrics import wilson_interval

STAGE_ORDER = ["tokenizer", "pretrain", "sft", "rl", "distill", "distill-sft", "distill-kd", "distill-eval", "eval"]


def read_metrics(out_dir: str | None) -> list[dict]:
    """Per-step records of a stage; tolerant of a torn last line (a killed writer)."""
    if not out_dir:
        return []
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _series(records: list[dict], key: str, x: str = "step"):
    pts = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float)) and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(path: Path, panels: list[tuple[str, list[tuple[str, list, list]]]], xlabel: str = "step") -> str | None:
    """panels: [(title, [(label, xs, ys), ...]), ...] -> one PNG with a subplot per panel."""
    panels = [(t, [s for s in series if s[1]]) for t, series in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, xs, ys in series:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 20 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    save_figure(fig, path)
    return path.name


def _fmt(v, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def _params(r: dict) -> tuple[int | None, int | None]:
    """(total, active) from the run's metrics, else from the model settings in its config."""
    m = r.get("metrics") or {}
    if m.get("params_total"):
        return m["params_total"], m.get("params_active")
    model = (r.get("config") or {}).get("model")
    if not isinstance(model, dict):
        return None, None
    from sputnik.config import build
    from sputnik.model.accounting import param_counts
    from sputnik.model.config import ModelConfig

    try:
        pc = param_counts(build(ModelConfig, model))
    except ValueError:
        return None, None
    return pc["total"], pc["active"]


def _accuracy(r: dict) -> float | None:
    m = r.get("metrics") or {}
    return m.get("heldout_accuracy", m.get("accuracy"))


def stage_rows(rows: list[dict]) -> list[dict]:
    """The latest ok run of each command, in pipeline order, plus any later commands (a study's
    many runs are summarised in its own section instead)."""
    latest: dict[str, dict] = {}
    for r in rows:
        if r.get("status") == "ok" and not r["command"].startswith("study:"):
            latest[r["command"]] = r
    order = [c for c in STAGE_ORDER if c in latest] + [c for c in latest if c not in STAGE_ORDER]
    return [latest[c] for c in order]


def build(project_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """<out>/report.md (default <project>/report) with its plots, from the ledger and metrics files only."""
    project = Path(project_dir)
    rows = ledger.load(project)
    if not rows:
        raise ValueError(f"no runs in {ledger.ledger_path(project)}: nothing to report")
    out = Path(out_dir) if out_dir else project / "report"
    stages = stage_rows(rows)
    lines = markdown(project, rows, stages) + figures(out, stages)
    cmp_md = project / "compare" / "compare.md"  # written by `sputnik compare` from the same ledger
    if cmp_md.is_file():
        body = cmp_md.read_text(encoding="utf-8").splitlines()[1:]
        lines += ["", "## Recipes at equal compute (`sputnik compare`)",
                  *[line.replace("](compare.png)", "](../compare/compare.png)") for line in body]]
    lines += studies_section(project, out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def studies_section(project: Path, out: Path) -> list[str]:
    """One line per study: the headline (with its interval) of each finished `sputnik study` of the
    project with a link to its table; for one not run here, its published headline (the last
    measurement, studies/published.json, dated, its table in docs/benchmarks.md) and the command that
    runs it in this project."""
    from sputnik.studies import STUDIES, published_headlines

    published = published_headlines()
    lines = []
    for name in STUDIES:  # a study's variants (other options, beyond_the_data_abacus_lsb_none say) follow it
        for path in [project / "studies" / name / "study.json",
                     *sorted((project / "studies").glob(f"{name}_*/study.json"))]:
            label = path.parent.name
            try:
                summary = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):  # not run (or being written: the next report picks it up)
                if label == name:
                    pub = published.get(name)
                    measured = (f"; measured {pub['measured']} (docs/benchmarks.md): {pub['headline']}"
                                if pub else "")
                    command = (pub or {}).get("command") or f"sputnik study {name}"  # the published setting's
                    lines.append(f"- **{name}**: not run in this project{measured} "
                                 f"(`{command} --project {project}` runs it here)")
                continue
            rel = Path("..") / path.parent.relative_to(project) / "study.md" if out == project / "report" else path.with_name("study.md")
            lines.append(f"- **{label}**: {summary.get('headline') or 'no headline (incomplete study)'} ([table]({rel}))")
    return ["", "## Studies (`sputnik study`)", "", *lines]


def figures(out: Path, stages: list[dict]) -> list[str]:
    """The plots (loss curves, RL, expert load, accuracy against cumulative FLOPs) -> markdown lines."""
    figs = []
    loss_series, eval_series = [], []
    for r in stages:
        m = read_metrics((r.get("config") or {}).get("out_dir"))
        loss_series.append((r["command"], *_series(m, "loss")))
        eval_series.append((r["command"], *_series(m, "eval_loss")))
    figs.append(("Loss curves", _plot(out / "loss.png", [("train loss", loss_series), ("held-out loss", eval_series)])))
    for r in stages:
        m = read_metrics((r.get("config") or {}).get("out_dir"))
        if r["command"] == "rl":
            figs.append(("Reinforcement learning", _plot(out / "rl.png", [
                ("reward", [("mean reward", *_series(m, "reward_mean"))]),
                ("accuracy", [("rollout accuracy", *_series(m, "accuracy")),
                              ("held-out (greedy)", *_series(m, "heldout_accuracy"))]),
                ("response length", [("mean", *_series(m, "length_mean")), ("max", *_series(m, "length_max"))]),
            ])))
        if r["command"] == "pretrain":
            figs.append(("Expert load (max/mean tokens per expert; 1 = perfectly balanced)", _plot(
                out / "expert_load.png", [("expert load max/mean", [("pretrain", *_series(m, "moe_max_over_mean"))])])))
    cum, xs, ys, labels = 0.0, [], [], []
    for r in stages:
        if r["command"].startswith("compare:"):  # side branches of `sputnik compare`, not this lineage
            continue
        cum += r.get("flops") or 0.0
        acc = _accuracy(r)
        if acc is not None:
            xs.append(cum)
            ys.append(acc)
            labels.append(r["command"])
    if xs:
        figs.append(("Held-out accuracy against cumulative training FLOPs",
                     _plot(out / "accuracy_vs_flops.png", [("accuracy vs FLOPs", [(" → ".join(labels), xs, ys)])],
                           xlabel="cumulative FLOPs")))
    return [line for title, name in figs if name for line in ("", f"## {title}", "", f"![{title}]({name})")]


def markdown(project: Path, rows: list[dict], stages: list[dict]) -> list[str]:
    """The tables: one row a stage, the final lineage against everything spent, hardware and software."""
    tot = ledger.totals(rows)
    lines = [f"# Sputnik report card — {project.resolve().name}", ""]
    lines += ["| stage | status | held-out accuracy | params total | params active | FLOPs | time (s) | device-hours | money (USD) | energy (kWh) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in stages:
        total, active = _params(r)
        lines.append(f"| {r['command']} | {r['status']} | {_fmt(_accuracy(r), '.3f')} | "
                     f"{_fmt(total, ',')} | {_fmt(active, ',')} | "
                     f"{_fmt(r.get('flops'), '.3g')} | {_fmt(r.get('wall_s'), '.0f')} | {_fmt(r.get('device_hours'), '.4f')} | "
                     f"{_fmt(r.get('money_usd'), '.4f')} | {_fmt((r.get('energy_j') or 0) / 3.6e6, '.4f')} |")
    lines += by_task_table(stages)
    for r in stages:  # per-stage extra numbers, e.g. the distillation comparison
        extra = (r.get("metrics") or {}).get("report_table")
        if extra:
            lines += ["", f"### {r['command']}", "", *extra]
    lines += ["", "## Cost: the final model vs everything spent", "",
              "| | runs | device-hours | FLOPs | money (USD) | energy (kWh) |", "|---|---|---|---|---|---|"]
    for name, t in [("final model's lineage", tot["final"]), ("all runs (failed, aborted, killed included)", tot["all"])] + \
            [(f"of which {s}", v) for s, v in tot["by_status"].items()]:
        lines.append(f"| {name} | {t['runs']} | {t['device_hours']:.4f} | {t['flops']:.3g} | {t['money_usd']:.4f} | "
                     f"{t['energy_j'] / 3.6e6:.4f} |")
    if tot["overhead"]:
        lines += ["", f"Everything spent cost {tot['overhead']:.2f}× the final lineage alone."]
    first = rows[0]
    lines += ["", "## Hardware and software", "",
              f"- device: {first.get('device_count')}× {first.get('device_name') or first.get('device_key')} "
              f"(CPU: {first.get('cpu_model')})",
              f"- python {platform.python_version()}, torch {(first.get('versions') or {}).get('torch')}, "
              f"git {str((first.get('git') or {}).get('revision') or '?')[:12]}{' (dirty)' if (first.get('git') or {}).get('dirty') else ''}",
              f"- prices: {first.get('price_usd_per_hour')} USD/device-hour, power {first.get('power_w')} W (override with --prices)"]
    return lines


def by_task_table(stages: list[dict]) -> list[str]:
    """Held-out accuracy per task of the stages that measured it (metrics heldout_by_task; the
    distillation's teacher too), each with its 95% Wilson interval and number of problems."""
    rows = []
    for r in stages:
        m = r.get("metrics") or {}
        rows += [(r["command"], m.get("heldout_by_task")), (f"{r['command']} (teacher)", m.get("teacher_by_task"))]
    rows = [(name, tasks) for name, tasks in rows if tasks]
    if not rows:
        return []
    names = list(dict.fromkeys(task for _, tasks in rows for task in tasks))
    lines = ["", "### Held-out accuracy by task (greedy; 95% Wilson interval; problems)", "",
             "| stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for stage, tasks in rows:
        cells = []
        for task in names:
            if task not in tasks:
                cells.append("—")
                continue
            acc, n = tasks[task]["accuracy"], tasks[task]["n"]
            lo, hi = wilson_interval(acc * n, n)
            cells.append(f"{acc:.3f} [{lo:.2f}, {hi:.2f}] n={n}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines


def register(sub) -> None:
    p = sub.add_parser("report", help="build the report card (markdown + plots) from a project's ledger and metrics")
    p.add_argument("--project", default="runs/speedrun", metavar="DIR", help="project directory holding ledger.jsonl")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default PROJECT/report)")
    p.set_defaults(func=lambda a: print(build(a.project, a.out)) or 0)


def save_figure(fig, path: Path) -> None:
    """fig as a PNG at path (tight layout, 110 dpi), written to a temp file and renamed, then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
