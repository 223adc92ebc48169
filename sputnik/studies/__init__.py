"""`sputnik study NAME`: named, reproducible experiments whose arms are normal pipeline runs under
the ledger, each writing <project>/studies/<name>/{study.md, study.json, <name>.png}.

    cold_start   R1's recipe: K gold traces, then GRPO on answers only, against SFT alone at equal FLOPs
    beyond_the_data  SFT on short additions, GRPO on longer ones (answers only): length generalisation
    distill_vs_rl  a small student: the RL recipe itself vs distillation from the RL teacher, equal student FLOPs
    moe_vs_dense   DeepSeekMoE vs a dense twin of equal active parameters: sizes x token budgets, iso-FLOP, crossover
    mtp            MTP depth 0 vs 1 vs 2 at equal FLOPs: loss, downstream accuracy, speculative speed-up

The machinery every study shares (runs, equal-compute checks, evaluation, statistics, plots) is in
studies/runner.py; each study is one file that reads top to bottom. published.json holds each
study's headline as last measured for docs/benchmarks.md (the report card quotes it, dated, for a
study not run in the project).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

STUDIES = ["cold_start", "beyond_the_data", "distill_vs_rl", "moe_vs_dense", "mtp"]


def published_headlines() -> dict[str, dict]:
    """study -> {headline, measured, command} from published.json ({} if it is missing or unreadable:
    the report card then names only the command)."""
    try:
        data = json.loads((Path(__file__).parent / "published.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in data.items() if k in STUDIES and isinstance(v, dict) and {"headline", "measured"} <= v.keys()}


def register(sub) -> None:
    parser = sub.add_parser("study", help="named experiments: arms at equal compute, three seeds, intervals, plots",
                            description=__doc__.split("\n\n")[0])
    studies = parser.add_subparsers(dest="study", metavar="{" + ",".join(STUDIES) + "}")
    for name in STUDIES:
        importlib.import_module(f"sputnik.studies.{name}").register(studies)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
