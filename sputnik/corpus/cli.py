"""`sputnik data generate | tokenize`: make a corpus, turn a corpus into token shards."""
from __future__ import annotations

from sputnik.config import add_config_args, config_from_args
from sputnik.corpus import generate, tokenize


def register(sub) -> None:
    parser = sub.add_parser("data", help="pretraining corpora: generate a diverse one, tokenize any into shards")
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION")
    for name, module, help_text in (
            ("generate", generate, "write a diverse procedural corpus of any size (JSONL; parallel, resumable)"),
            ("tokenize", tokenize, "tokenize corpora of any size into on-disk token shards (parallel, resumable)")):
        p = actions.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0])
        add_config_args(p, module.Config)
        p.set_defaults(func=lambda args, module=module: module.run(config_from_args(args, module.Config)) and 0)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
