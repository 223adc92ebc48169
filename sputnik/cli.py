"""`sputnik` command line: argparse subcommands, each owned by the module that runs it.

Every command module exposes `register(subparsers)`, which adds its parser (flags built from its
Config dataclass by sputnik.config.add_config_args) and sets `func` to a callable taking the
parsed args and returning an exit code. Modules are listed here in pipeline order.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMAND_MODULES = [
    "sputnik.tasks.cli",             # tasks list | preview
    "sputnik.corpus.cli",            # data generate | tokenize
    "sputnik.stages.tokenizer",      # tokenizer train
    "sputnik.stages.pretrain",       # pretrain
    "sputnik.stages.sft",            # sft
    "sputnik.stages.rl",             # rl
    "sputnik.stages.distill",        # distill
    "sputnik.evaluate",              # eval
    "sputnik.inference.chat",        # chat
    "sputnik.inference.serve",       # serve
    "sputnik.pipeline",              # speedrun
    "sputnik.accounting.compare",    # compare
    "sputnik.studies",               # study cold_start | ...
    "sputnik.accounting.ledger",     # ledger
    "sputnik.accounting.cost",       # cost
    "sputnik.accounting.report",     # report
]


def build_parser() -> argparse.ArgumentParser:
    from sputnik import __version__

    parser = argparse.ArgumentParser(
        prog="sputnik",
        description="Train reasoning language models the frugal DeepSeek way: MoE pretraining, chain-of-thought "
                    "SFT, GRPO, distillation, evaluation, and a cost ledger that counts every run.",
    )
    parser.add_argument("--version", action="version", version=f"sputnik {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:  # a stage not built yet
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a command line (not a caller's main([...])): reproducible str hashing first
        from sputnik.common import fixed_hash_seed

        fixed_hash_seed()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from sputnik.common import keep_freed_memory

    keep_freed_memory()
    from sputnik.accounting.ledger import RunStopped
    from sputnik.train.session import TrainingDiverged

    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # user mistakes: bad config, bad data, mismatched files
        print(f"sputnik {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:  # the last good checkpoint is kept
        print(f"sputnik {args.command}: {e}", file=sys.stderr)
        return 3
    except RunStopped as e:  # a health check stopped the run on purpose (ledger status "stopped")
        print(f"sputnik {args.command}: stopped: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print(f"sputnik {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
