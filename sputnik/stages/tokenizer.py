"""Stage: fit the byte-level BPE tokenizer on task traces and user text, report compression.

    sputnik tokenizer train --out_dir runs/tok --vocab_size 4096 --text_files a.txt,b.txt

Corpus = rendered chats of the configured tasks (sputnik.tasks.corpus_text) + one document per
user text file + a sample of a large corpus (`--corpus`, spread evenly over its units so a corpus
of any size is never read whole). A hash-chosen 10% of the documents is held out (never trained on) to measure
compression, bytes per token, on text the merges were not fitted to.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sputnik.config import add_config_args, config_from_args, knob, save_config
from sputnik.common import print0
from sputnik.data import read_text_files, split_documents
from sputnik.tokenizer import MIN_VOCAB_SIZE, bytes_per_token, train_tokenizer

BUILTIN_TASKS = ["addition", "subtraction", "multiplication", "countdown", "word_problems"]
HELD_OUT_FRACTION = 0.1
CONFIG_FILE = "stage_config.json"  # not config.json: AutoTokenizer would read that as a model config


@dataclass
class Config:
    out_dir: str = knob("runs/tokenizer", "directory for tokenizer.json, tokenizer_config.json and the resolved config")
    vocab_size: int = knob(4096, "vocabulary size incl. 256 byte tokens and 8 special tokens (an upper bound)",
                           min=MIN_VOCAB_SIZE)
    tasks: list[str] = knob(default_factory=lambda: list(BUILTIN_TASKS),
                            help="tasks whose worked problems form the corpus: task specs name[:knob=value...] "
                                 "(comma separated; empty for none)")
    num_examples: int = knob(2000, "examples generated per task", min=0)
    text_files: list[str] = knob(default_factory=list, help="your UTF-8 text files, one document each (comma separated)")
    corpus: list[str] = knob(default_factory=list, help="corpus sources of any size, as `sputnik data tokenize` reads them "
                                                        "(txt directories, .jsonl, .parquet, saved datasets): a sample is read")
    corpus_sample_mb: int = knob(64, "MB of text sampled from --corpus, spread evenly over it", min=1)
    text_field: str = knob("text", "the text field of --corpus JSONL records and columns")
    seed: int = knob(0, "seed of the task generators", min=0)
    project_dir: str = knob("", "directory of the cost ledger ledger.jsonl ('' = the parent of out_dir)")

    def __post_init__(self):
        missing = [p for p in self.text_files if not Path(p).is_file()]
        if missing:
            raise ValueError(f"text_files: {missing[0]} does not exist")
        if not self.text_files and not self.corpus and (not self.tasks or self.num_examples == 0):
            raise ValueError("empty corpus: give text_files or corpus, or tasks with num_examples >= 1")


def build_corpus(config: Config) -> list[str]:
    docs = []
    if config.tasks and config.num_examples:
        from sputnik.tasks import corpus_text, parse_tasks  # tasks are optional for a text-only tokenizer

        docs += corpus_text(parse_tasks(config.tasks), config.num_examples, config.seed)
    docs += read_text_files(config.text_files)
    if config.corpus:
        from sputnik.corpus.sources import sample_documents

        docs += sample_documents(config.corpus, config.corpus_sample_mb << 20, config.text_field)
    return docs


def run(config: Config, parents=()) -> dict:
    """Train, save to out_dir, report bytes/token on held-out documents. Returns the summary and this
    run's ledger id (the parent of every stage that uses the tokenizer)."""
    from sputnik.accounting.ledger import record_run

    out_dir = Path(config.out_dir)
    with record_run(config.project_dir or out_dir.resolve().parent, "tokenizer", config, parents=parents) as led:
        result = _fit(config, out_dir)
        led.metrics.update({k: v for k, v in result.items() if isinstance(v, (int, float))})
        led.artifacts.append(str(out_dir))
    return {**result, "run_ids": [led.run_id]}


def _fit(config: Config, out_dir: Path) -> dict:
    t0 = time.perf_counter()
    docs = build_corpus(config)
    train_docs, held_docs = split_documents(docs, HELD_OUT_FRACTION)
    tok = train_tokenizer(train_docs, config.vocab_size)
    tok.save(out_dir)
    save_config(config, out_dir / CONFIG_FILE)
    # With one document nothing can be held out; compression on training text is then flagged.
    eval_docs = held_docs or train_docs
    result = {
        "out_dir": str(out_dir),
        "vocab_size": tok.vocab_size,
        "num_train_docs": len(train_docs),
        "num_held_out_docs": len(held_docs),
        "train_bytes": sum(len(d.encode("utf-8")) for d in train_docs),
        "bytes_per_token": round(bytes_per_token(tok, eval_docs), 4),
        "bytes_per_token_on": "held_out" if held_docs else "train",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if tok.vocab_size < config.vocab_size:
        print0(f"tokenizer: corpus exhausted merges at vocab_size {tok.vocab_size} < requested {config.vocab_size}")
    print0(f"tokenizer: vocab {tok.vocab_size}, {result['bytes_per_token']} bytes/token on "
           f"{result['bytes_per_token_on']} text -> {out_dir}")
    return result


# ---------------------------------------------------------------------------------------------
# CLI: sputnik tokenizer train [flags]
def register(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train the BPE tokenizer")
    actions = parser.add_subparsers(dest="tokenizer_action", metavar="ACTION")
    train = actions.add_parser("train", help="fit byte-level BPE on task traces and text files, report compression")
    add_config_args(train, Config)
    train.set_defaults(func=_train_main)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _train_main(args) -> int:
    result = run(config_from_args(args, Config))
    print(json.dumps(result, indent=2))
    return 0
