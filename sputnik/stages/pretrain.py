"""`sputnik pretrain`: next-token (+ MTP) pretraining on packed sequences.

Documents (text files, one per file, and/or the built-in task corpora) are split train/held-out
by document hash, tokenized into one stream with <|endoftext|> after each document and cut into
windows of seq_len + 1 tokens (sputnik.data.PackedDataset). A corpus too large for memory is
tokenized once into shards (`sputnik data tokenize`) and read here window by window (`--data DIR`):
the same stream, split and windows, with no corpus held in memory. Each step is one global batch of
batch_size x grad_accum x world_size windows; the loss is the token mean over it (CE + λ·MTP +
balance loss, see model/transformer.py), after which the MoE router biases take their
aux-loss-free step (DeepSeek-V3 §2.1.2). A NaN/inf loss or gradient skips the step.

    sputnik pretrain --out_dir runs/pretrain --tokenizer runs/tok --tasks addition,subtraction --steps 300
    sputnik pretrain --out_dir runs/pretrain --tokenizer runs/tok --data runs/corpus --steps 300
    torchrun --nproc_per_node 2 -m sputnik pretrain ...   # same command, data sharded per rank
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from sputnik.common import print0
from sputnik.config import add_config_args, config_from_args, knob
from sputnik.train.evaluation import eval_loss
from sputnik.train.loading import flops_per_token, peak_flops
from sputnik.train.progress import Progress, Throughput
from sputnik.train.session import TrainConfig, every, open_session
from sputnik.train.step import train_step


@dataclass
class Config(TrainConfig):
    out_dir: str = knob("runs/pretrain", "output directory: metrics.jsonl, checkpoints/, model/, stage_config.json")
    data: str = knob("", "token shards from `sputnik data tokenize` (read window by window, any size; replaces --texts and --tasks)")
    texts: list[str] = knob(default_factory=list, help="UTF-8 text files or directories of *.txt (one document per file), "
                                                       "read into memory: for a small corpus")
    tasks: list[str] = knob(default_factory=lambda: ["addition", "subtraction", "multiplication"],
                            help="built-in task corpora mixed in: task specs name[:knob=value...] (comma-separated; '' for none)")
    task_docs: int = knob(20000, "worked problems drawn from the task corpora", min=0)
    eval_fraction: float = knob(0.05, "share of documents held out for the eval loss", min=0.0, max=0.5)
    seq_len: int = knob(256, "tokens per packed window", min=2)
    document_mask: bool = knob(False, "attention stays within each document of a packed window (documents end at "
                                      "the end-of-text token; model/documents.py); off: nanoGPT-style, across them")

    def __post_init__(self):
        super().__post_init__()
        if self.data and self.texts:
            raise ValueError("data and texts: give one (--data DIR reads token shards; --texts reads files into memory)")
        if not self.data and not self.texts and (not self.tasks or self.task_docs == 0):
            raise ValueError("no pretraining data: give --texts FILES and/or --tasks NAMES with --task_docs > 0")


# ---------------------------------------------------------------------------------------------
# Data
def read_documents(cfg: Config) -> list[str]:
    from sputnik.data import read_text_files

    files = []
    for entry in cfg.texts:
        p = Path(entry)
        files.extend(sorted(p.glob("**/*.txt")) if p.is_dir() else [p])
        if p.is_dir() and not files:
            raise ValueError(f"text directory {p} holds no *.txt files")
    docs = read_text_files(files)
    if cfg.tasks and cfg.task_docs:
        from sputnik.tasks import corpus_text, parse_tasks

        corpus = corpus_text(parse_tasks(cfg.tasks), cfg.task_docs, seed=cfg.seed)
        docs.extend([corpus] if isinstance(corpus, str) else list(corpus))
    if not any(d.strip() for d in docs):
        raise ValueError("pretraining data is empty (all documents are blank)")
    return docs


def load_data(cfg: Config, tokenizer, dist):
    """(train loader, fixed held-out batches, train tokens) for this rank; ValueError on empty or tiny data."""
    from sputnik.data import PackedDataset, train_eval_tokens

    if cfg.data:
        train_ids, eval_ids = open_shards(cfg.data, tokenizer)
    else:
        train_ids, eval_ids = train_eval_tokens(read_documents(cfg), tokenizer, cfg.eval_fraction)
    train = PackedDataset(train_ids, cfg.batch_size, cfg.seq_len, rank=dist.rank, world_size=dist.world_size,
                          seed=cfg.seed, name="pretraining data (train split)")
    held = PackedDataset(eval_ids, cfg.batch_size, cfg.seq_len, rank=dist.rank, world_size=dist.world_size,
                         shuffle=False, num_epochs=1, name="pretraining data (held-out split)")
    return train, [b for _, b in zip(range(cfg.eval_batches), held)], len(train_ids)


def open_shards(directory: str, tokenizer):
    """(train, held-out) token streams of a shard directory, read from disk; the shards must come
    from this very tokenizer (its fingerprint is in the manifest), else ids would mean other text."""
    from sputnik.corpus.shards import TokenShards, read_manifest, tokenizer_fingerprint

    manifest = read_manifest(Path(directory))
    if manifest["tokenizer"]["sha256"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{directory}: its shards were tokenized with another tokenizer "
                         f"({manifest.get('tokenizer_path', '?')}, vocab {manifest['tokenizer']['vocab_size']}) than this run's "
                         f"({tokenizer.source}, vocab {tokenizer.vocab_size}): tokenize again or pass that --tokenizer")
    return (TokenShards(directory, "train", tokenizer.vocab_size),
            TokenShards(directory, "heldout", tokenizer.vocab_size))


# ---------------------------------------------------------------------------------------------
def run(cfg: Config, parents=(), command: str = "pretrain") -> dict:
    """Pretrain; returns the summary (eval losses, tokens, time, the model directory, this run's id).
    `parents`: the ledger runs whose outputs this one consumes (the tokenizer's); `command`: the
    run's name in the ledger."""
    with open_session(cfg, model_cfg=cfg.model, optim=cfg.optim, parallel=cfg.parallel) as s:
        train, held, num_train_tokens = load_data(cfg, s.tokenizer, s.dist)
        s.restore_loader(train)
        with s.recording(command, parents) as run:
            speed, state = Throughput(peak_flops(s.device, s.dist.world_size)), s.new_loop_state()
            progress = Progress(cfg.steps, s.start_step, s.rank0 and cfg.progress, "pretrain")
            print0(f"pretrain: {num_train_tokens:,} train tokens, {flops_per_token(s.model, cfg.seq_len):.3g} FLOPs/token")
            step, eval_loss_now, eval_step, t_start, m = s.start_step, None, -1, time.time(), {"loss": float("nan")}
            while True:
                last = step == cfg.steps
                # --- every eval_every steps (and first and last): held-out loss -------------------
                if every(step, cfg.eval_every, s.start_step, last):
                    eval_loss_now, eval_step = eval_loss(s, held, cfg.document_mask), step
                    state["best_eval"] = min(eval_loss_now, state["best_eval"] or float("inf"))
                    s.log({"step": step, "eval_loss": eval_loss_now, "flops": state["flops"]})
                # --- every checkpoint_every steps (and the last) ---------------------------------
                if s.checkpoint_due(step, state, last):
                    s.save_checkpoint(step, {**state, "loader": train.state_dict()}, run,
                                      eval_loss_now if eval_step == step else None)
                if last:
                    break
                # --- training step -------------------------------------------------------------
                m = train_step(s, cfg, step, [next(train) for _ in range(cfg.grad_accum)])
                step += 1
                s.count_step(state, m, run, speed)
                if s.nonfinite_guard(state, m["stepped"], step, m["loss"], m["grad_norm"], "pretrain"):
                    s.log_step(step, m, state, speed, progress, cfg.log_every, step == cfg.steps)
            progress.close()
            # --- summary -------------------------------------------------------------------------
            return s.finish(run, {"final_eval_loss": eval_loss_now, "best_eval_loss": state["best_eval"],
                                  "final_train_loss": m["loss"], "steps": cfg.steps, "tokens": state["tokens"],
                                  "wall_s": time.time() - t_start, "nonfinite_steps": state["nonfinite_total"]},
                            "pretrain")


# ---------------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model on packed text / task corpora",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, Config)
    p.set_defaults(func=lambda args: run(config_from_args(args, Config)) and 0)
