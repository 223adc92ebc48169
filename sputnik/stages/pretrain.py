"""`sputnik pretrain`: next-token (+ MTP) pretraining on packed sequences.

Documents (text files, one per file, and/or the built-in task corpora) are split train/held-out
by document hash, tokenized into one stream with <|endoftext|> after each document and cut into
windows of seq_len + 1 tokens (sputnik.data.PackedDataset). Each step is one global batch of
batch_size x grad_accum x world_size windows; the loss is the token mean over it (CE + λ·MTP +
balance loss, see model/transformer.py), after which the MoE router biases take their
aux-loss-free step (DeepSeek-V3 §2.1.2). A NaN/inf loss or gradient skips the step.

    sputnik pretrain --out_dir runs/pretrain --tokenizer runs/tok --tasks addition,subtraction --max_steps 300
    torchrun --nproc_per_node 2 -m sputnik pretrain ...   # same command, data sharded per rank
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sputnik.train import session as tc
from sputnik.train.progress import Progress, Throughput
from sputnik.common import print0
from sputnik.config import add_config_args, config_from_args, knob
from sputnik.train.optim import clip_grad_norm, guarded_step, lr_multiplier, set_lr


@dataclass
class Config(tc.LoopConfig):
    out_dir: str = knob("runs/pretrain", "output directory: metrics.jsonl, checkpoints/, model/, stage_config.json")
    texts: list[str] = knob(default_factory=list, help="UTF-8 text files or directories of *.txt (one document per file)")
    tasks: list[str] = knob(default_factory=lambda: ["addition", "subtraction", "multiplication"],
                            help="built-in task corpora mixed in: name or name:knob=value:... (comma-separated; '' for none)")
    task_docs: int = knob(20000, "worked problems drawn from the task corpora", min=0)
    eval_fraction: float = knob(0.05, "share of documents held out for the eval loss", min=0.0, max=0.5)
    seq_len: int = knob(256, "tokens per packed window", min=2)

    def __post_init__(self):
        super().__post_init__()
        if not self.texts and (not self.tasks or self.task_docs == 0):
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
        from sputnik.tasks import corpus_text

        corpus = corpus_text(tc.parse_tasks(cfg.tasks), cfg.task_docs, seed=cfg.seed)
        docs.extend([corpus] if isinstance(corpus, str) else list(corpus))
    if not any(d.strip() for d in docs):
        raise ValueError("pretraining data is empty (all documents are blank)")
    return docs


def make_data(cfg: Config):
    """(train loader, fixed held-out batches) for this rank; ValueError on empty or tiny data."""
    from sputnik.data import PackedDataset, train_eval_tokens

    def check(tokenizer, dist):
        train_ids, eval_ids = train_eval_tokens(read_documents(cfg), tokenizer, cfg.eval_fraction)
        train = PackedDataset(train_ids, cfg.batch_size, cfg.seq_len, rank=dist.rank, world_size=dist.world_size,
                              seed=cfg.seed, name="pretraining data (train split)")
        held = PackedDataset(eval_ids, cfg.batch_size, cfg.seq_len, rank=dist.rank, world_size=dist.world_size,
                             shuffle=False, num_epochs=1, name="pretraining data (held-out split)")
        eval_batches = [b for _, b in zip(range(cfg.eval_batches), held)]
        return train, eval_batches, len(train_ids)
    return check


# ---------------------------------------------------------------------------------------------
def run(cfg: Config) -> dict:
    """Pretrain; returns the summary (final eval loss, tokens, time, paths)."""
    return tc.run_stage(cfg, make_data(cfg), "pretrain", _loop)


def _loop(s: tc.Session, cfg: Config, train, eval_batches, num_train_tokens: int, ledger_run) -> dict:
    tokens_per_step = cfg.batch_size * cfg.grad_accum * s.dist.world_size * cfg.seq_len
    fpt = tc.flops_per_token(s.model, cfg.seq_len)
    speed = Throughput(tc.peak_flops(s.device, s.dist.world_size))
    state = tc.new_loop_state(s.loop_state)
    progress = Progress(cfg.max_steps, s.start_step, s.rank0 and cfg.progress, "pretrain")
    print0(f"pretrain: {num_train_tokens:,} train tokens, {tokens_per_step:,} tokens/step, {fpt:.3g} FLOPs/token")
    step, eval_loss, eval_step, t_start, m = s.start_step, None, -1, time.time(), {"loss": float("nan")}
    while True:
        last = step == cfg.max_steps
        # --- every eval_every steps (and first and last): held-out loss ------------------------
        if last or (cfg.eval_every and step % cfg.eval_every == 0 and (step == 0 or step != s.start_step)):
            eval_loss, eval_step = tc.eval_loss(s, eval_batches), step
            state["best_eval"] = min(eval_loss, state["best_eval"] or float("inf"))
            tc.log_metrics(s, {"step": step, "eval_loss": eval_loss, "flops": fpt * tokens_per_step * step})
        # --- every checkpoint_every steps (and the last): checkpoint, never mid non-finite streak -
        if step != s.start_step and ((step % cfg.checkpoint_every == 0 and not state["nonfinite_streak"]) or last):
            tc.save_checkpoint(s, step, {**state, "loader": train.state_dict()}, eval_loss if eval_step == step else None)
        if last:
            break
        # --- training step ---------------------------------------------------------------------
        batches = [next(train) for _ in range(cfg.grad_accum)]
        lr = set_lr(s.optimizer, lr_multiplier(step, cfg.max_steps, cfg.optim))
        m = tc.forward_backward(s, batches, poison=step in cfg.poison_steps)
        grad_norm = clip_grad_norm(s.model, cfg.optim.grad_clip)
        balance = tc.moe_balance(s.raw)  # before after_step() consumes the counts
        stepped = guarded_step(s.optimizer, m["loss"], grad_norm)
        tc.after_step(s.raw, stepped)
        step += 1
        speed.add(tokens_per_step, fpt * tokens_per_step)
        ledger_run.add(flops=fpt * tokens_per_step, tokens=tokens_per_step)
        if not tc.nonfinite_guard(s, state, stepped, step, m, grad_norm, "pretrain"):
            continue
        # --- every log_every steps: metrics line; every step: progress -------------------------
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            tok_s, mfu = speed.read()
            tc.log_metrics(s, {"step": step, "loss": m["loss"], "ce": m["ce"], "mtp": m["mtp"], "aux": m["aux"],
                               "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s, "mfu": mfu,
                               "moe_max_over_mean": balance, "tokens": step * tokens_per_step,
                               "flops": fpt * tokens_per_step * step})
            progress.update(step, m["loss"], (tok_s, mfu))
        else:
            progress.update(step, m["loss"])
    progress.close()
    # --- summary -----------------------------------------------------------------------------------
    return tc.finish(s, cfg, ledger_run, {
        "final_eval_loss": eval_loss, "best_eval_loss": state["best_eval"], "final_train_loss": m["loss"],
        "steps": cfg.max_steps, "tokens": cfg.max_steps * tokens_per_step, "wall_s": time.time() - t_start,
        "nonfinite_steps": state["nonfinite_total"]}, "pretrain")


# ---------------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model on packed text / task corpora",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, Config)
    p.set_defaults(func=main)


def main(args) -> int:
    try:
        run(config_from_args(args, Config))
    except tc.TrainingDiverged as e:
        print(f"sputnik pretrain: {e}", file=sys.stderr, flush=True)
        return 3
    return 0

