"""`sputnik sft`: chain-of-thought supervised fine-tuning on conversations.

Each example renders as <|user|>{prompt}<|assistant|><think>{trace}</think><answer>{a}</answer>
<|endoftext|> and only the assistant tokens (and the closing eot) carry loss (docs/CONTRACTS.md).
Data: worked problems of the built-in tasks (train split) and/or JSONL files. Held out: the
test split of the same tasks (or a hash split of the JSONL records), scored two ways: the
token-mean CE on the reference completions, and exact-match accuracy of greedy completions
judged by the task verifier (never eval()).

    sputnik sft --init runs/pretrain/model --tasks addition --out_dir runs/sft
"""
from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field

from sputnik import distributed as dist_lib
from sputnik.common import append_jsonl, print0
from sputnik.config import add_config_args, config_from_args, knob
from sputnik.train.evaluation import eval_loss, greedy_generate
from sputnik.train.loading import peak_flops
from sputnik.train.optim import OptimConfig
from sputnik.train.progress import Progress, Throughput
from sputnik.train.session import TrainConfig, every, open_session
from sputnik.train.step import train_step


@dataclass
class Config(TrainConfig):
    out_dir: str = knob("runs/sft", "output directory: metrics.jsonl, samples.jsonl, checkpoints/, model/")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))
    data: list[str] = knob(default_factory=list,
                           help="JSONL files of {prompt, completion} / {prompt, answer, solution} / {messages}")
    skip_bad_lines: bool = knob(False, "skip (and count) malformed JSONL lines instead of stopping")
    tasks: list[str] = knob(default_factory=lambda: ["addition"],
                            help="built-in tasks whose worked train problems are SFT data: task specs "
                                 "name[:knob=value...] (comma-separated)")
    num_examples: int = knob(5000, "train examples drawn from the tasks", min=0)
    eval_examples: int = knob(64, "held-out test-split problems for accuracy and eval loss", min=0)
    eval_fraction: float = knob(0.05, "JSONL data only: share of records held out", min=0.0, max=0.5)
    max_len: int = knob(384, "longest rendered conversation (tokens); longer ones are dropped and counted", min=8)
    max_new_tokens: int = knob(160, "greedy decoding budget per held-out problem", min=1)
    eval_batch_size: int = knob(32, "rows per greedy decoding batch", min=1)
    position_gaps: int = knob(0, "training only: RoPE positions skip a random 0..N after each line end, so that "
                                 "lookups across lines go by content (train/position_gaps.py; our DeepSeek-V3 "
                                 "model; 0 = off)", min=0)
    prompt_gaps: int = knob(0, "training only: RoPE positions also skip a random 0..N after every digit of the "
                               "prompt, so that a number's places are found by content, not by their distance "
                               "from its bracket (train/position_gaps.py; 0 = off)", min=0)
    gapped_rows: float = knob(1.0, "training only: the share of rows that get position/prompt gaps (the others keep "
                                   "decoding's consecutive positions)", min=0.0, max=1.0)

    def __post_init__(self):
        super().__post_init__()
        if not self.data and (not self.tasks or self.num_examples == 0):
            raise ValueError("no SFT data: give --data FILES.jsonl and/or --tasks NAMES with --num_examples > 0")


# ---------------------------------------------------------------------------------------------
# Data
def load_data(cfg: Config, tokenizer, dist):
    """(train loader, held-out loss batches, held-out Examples) for this rank; ValueError on bad data."""
    from sputnik.data import read_sft_jsonl, sft_batches, split_documents
    from sputnik.tasks import format_completion, heldout_examples, mixture, parse_tasks

    pairs, eval_pairs, eval_examples = [], [], []
    for path in cfg.data:
        file_pairs, _ = read_sft_jsonl(path, skip_bad_lines=cfg.skip_bad_lines)
        by_text = {json.dumps(p): p for p in file_pairs}  # hash split on the record, as for documents
        train_keys, held_keys = split_documents(list(by_text), cfg.eval_fraction)
        pairs += [by_text[k] for k in train_keys]
        eval_pairs += [by_text[k] for k in held_keys]
    if cfg.tasks and cfg.num_examples:
        tasks = parse_tasks(cfg.tasks)
        pairs += [(ex.prompt, format_completion(ex)) for ex in mixture(tasks, cfg.num_examples, "train", cfg.seed)]
        if cfg.eval_examples:
            eval_examples = heldout_examples(tasks, cfg.eval_examples, cfg.seed)
            eval_pairs += [(ex.prompt, format_completion(ex)) for ex in eval_examples]
    kw = dict(rank=dist.rank, world_size=dist.world_size)
    train = sft_batches(pairs, tokenizer, cfg.batch_size, cfg.max_len, seed=cfg.seed, name="sft data", **kw)
    held = []
    if eval_pairs:
        loader = sft_batches(eval_pairs, tokenizer, min(cfg.batch_size, max(1, len(eval_pairs) // dist.world_size)),
                             cfg.max_len, shuffle=False, num_epochs=1, name="sft held-out data", **kw)
        held = [b for _, b in zip(range(cfg.eval_batches), loader)]
    return train, held, eval_examples


# ---------------------------------------------------------------------------------------------
# Held-out accuracy
def accuracy(s, cfg: Config, examples: list, step: int) -> dict:
    """Exact match of greedy completions (task verifier); each rank decodes its share."""
    from sputnik.metrics import by_task, task_tally
    from sputnik.tasks import verify

    mine = examples[s.dist.rank::s.dist.world_size]
    tok = s.tokenizer
    prompts = [tok.render_prompt(ex.prompt) for ex in mine]
    max_len = getattr(s.raw.config, "max_position_embeddings", None)
    outs = greedy_generate(s.model, prompts, max_new_tokens=cfg.max_new_tokens, stop_ids=set(tok.stop_ids),
                           pad_id=tok.pad_id, device=s.device, amp=s.amp, batch_size=cfg.eval_batch_size,
                           dist=s.dist, max_len=max_len)
    texts = [tok.decode([t for t in ids if t not in tok.stop_ids and t < tok.vocab_size]) for ids in outs]
    verdicts = [verify(ex, text) for ex, text in zip(mine, texts)]
    if s.rank0:
        for ex, text, v in list(zip(mine, texts, verdicts))[:4]:
            append_jsonl(s.out / "samples.jsonl", {"step": step, "prompt": ex.prompt, "answer": ex.answer,
                                                   "completion": text, "correct": v.correct, "reason": v.reason})
    names = sorted({ex.task for ex in examples})  # the same on every rank
    correct, formatted, n, *tally = dist_lib.all_reduce_sum(
        [sum(v.correct for v in verdicts), sum(v.well_formatted for v in verdicts), len(verdicts),
         *task_tally(names, [ex.task for ex in mine], [v.correct for v in verdicts])], s.dist, s.device)
    return {"accuracy": correct / max(n, 1), "format_rate": formatted / max(n, 1), "eval_n": int(n),
            "heldout_by_task": by_task(names, tally)}


# ---------------------------------------------------------------------------------------------
def run(cfg: Config, parents=(), command: str = "sft") -> dict:
    """Fine-tune; returns the summary (final accuracy and eval loss, tokens, time, the model
    directory, this run's id). `parents`: the ledger runs that produced init; `command`: the run's
    name in the ledger (distillation trains its student as "distill-sft")."""
    with open_session(cfg, model_cfg=cfg.model, optim=cfg.optim, parallel=cfg.parallel) as s:
        gaps = {k: v for k in ("position_gaps", "prompt_gaps") if (v := getattr(cfg, k))}
        if gaps and "positions_BT" not in inspect.signature(s.raw.forward).parameters:
            raise ValueError(f"{', '.join(f'{k}={v}' for k, v in gaps.items())}: {type(s.raw).__name__} takes no "
                             "positions (position gaps are implemented for our DeepSeek-V3 model)")
        if cfg.prompt_gaps and (s.tokenizer.user_id is None or s.tokenizer.assistant_id is None):
            raise ValueError(f"prompt_gaps={cfg.prompt_gaps}: the tokenizer has no user/assistant marker tokens "
                             "to find a prompt by")
        train, held, eval_examples = load_data(cfg, s.tokenizer, s.dist)
        s.restore_loader(train)
        with s.recording(command, parents) as run:
            speed, state = Throughput(peak_flops(s.device, s.dist.world_size)), s.new_loop_state()
            progress = Progress(cfg.steps, s.start_step, s.rank0 and cfg.progress, "sft")
            print0(f"sft: {len(train.rows):,} train conversations ({train.num_dropped} dropped > max_len), "
                   f"{len(eval_examples)} held-out problems")
            step, ev, eval_step, t_start, m = s.start_step, {}, -1, time.time(), {"loss": float("nan")}
            while True:
                last = step == cfg.steps
                # --- every eval_every steps (and first and last): held-out loss and accuracy ------
                if every(step, cfg.eval_every, s.start_step, last):
                    ev, eval_step = {}, step
                    if held:
                        ev["eval_loss"] = eval_loss(s, held)
                        state["best_eval"] = min(ev["eval_loss"], state["best_eval"] or float("inf"))
                    if eval_examples:
                        ev.update(accuracy(s, cfg, eval_examples, step))
                    s.log({"step": step, **ev, "flops": state["flops"]})
                    print0(f"sft step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if not isinstance(v, dict)))
                # --- every checkpoint_every steps (and the last) ---------------------------------
                if s.checkpoint_due(step, state, last):
                    s.save_checkpoint(step, {**state, "loader": train.state_dict()}, run,
                                      ev.get("eval_loss") if eval_step == step else None)
                if last:
                    break
                # --- training step -------------------------------------------------------------
                m = train_step(s, cfg, step, [next(train) for _ in range(cfg.grad_accum)])
                step += 1
                s.count_step(state, m, run, speed)
                if s.nonfinite_guard(state, m["stepped"], step, m["loss"], m["grad_norm"], "sft"):
                    s.log_step(step, m, state, speed, progress, cfg.log_every, step == cfg.steps)
            progress.close()
            # --- summary -------------------------------------------------------------------------
            if ev.get("heldout_by_task"):
                run.metrics["heldout_by_task"] = ev["heldout_by_task"]
            return s.finish(run, {"final_eval_loss": ev.get("eval_loss"), "best_eval_loss": state["best_eval"],
                                  "accuracy": ev.get("accuracy"), "format_rate": ev.get("format_rate"),
                                  "final_train_loss": m["loss"], "steps": cfg.steps, "tokens": state["tokens"],
                                  "wall_s": time.time() - t_start, "nonfinite_steps": state["nonfinite_total"]}, "sft")


# ---------------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("sft", help="chain-of-thought supervised fine-tuning", description=__doc__.split("\n\n")[0])
    add_config_args(p, Config)
    p.set_defaults(func=lambda args: run(config_from_args(args, Config)) and 0)
