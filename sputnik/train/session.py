"""What a training stage sets up before its loop and does around it: device, ranks, tokenizer, model,
resume, optimizer and wrapping (`open_session`); the run's first writes and its ledger entry
(`Session.recording`); checkpoints, metrics lines, the non-finite guard and the final export.

A stage reads top to bottom:
    with open_session(cfg, model_cfg=cfg.model, optim=cfg.optim) as s:   # validated, nothing written
        data = load_data(cfg, s.tokenizer, s.dist)                       # bad data fails here too
        s.restore_loader(data.train)
        with s.recording("pretrain", parents) as run:                    # first writes, the ledger entry
            while True: ...                                              # the stage's own loop
            return s.finish(run, summary)
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from sputnik import distributed as dist_lib
from sputnik.common import append_jsonl, autocast, pick_device, print0, seed_everything, set_threads
from sputnik.config import RunConfig, knob, save_config
from sputnik.model.config import ModelConfig
from sputnik.train import checkpoint as ckpt_lib
from sputnik.train.loading import exportable, load_model, load_tokenizer, model_config, save_model
from sputnik.train.optim import OptimConfig, build_optimizer
from sputnik.train.progress import trim_metrics


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


@dataclass
class TrainConfig(RunConfig):
    """The knobs of the token-level training loops (pretrain, SFT) on top of every run's."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = knob(200, "optimizer steps", min=1)
    batch_size: int = knob(16, "sequences per micro-batch per rank", min=1)
    grad_accum: int = knob(1, "micro-batches per optimizer step", min=1)
    parallel: Literal["ddp", "fsdp"] = knob("ddp", "wrapping under torchrun (ignored for one process)")
    eval_every: int = knob(50, "held-out evaluation every N steps (0 = only at the end)", min=0)
    eval_batches: int = knob(8, "held-out batches per evaluation", min=1)
    progress: bool = knob(True, "live progress bar on a terminal")
    log_every: int = knob(10, "metrics line every N steps", min=1)

    def __post_init__(self):
        super().__post_init__()
        if self.optim.optimizer == "muon" and self.parallel == "fsdp":
            raise ValueError("optim.optimizer='muon' with parallel='fsdp': Muon on sharded DTensors is not "
                             "supported here; use parallel=ddp")


def every(step: int, n: int, start: int, last: bool) -> bool:
    """An "every n steps" block is due at `step`: at multiples of n (step 0 included on a fresh start,
    not again at the step a resumed run starts from) and always at the last step. n = 0: last only."""
    return last or (n > 0 and step % n == 0 and (step == 0 or step != start))


@dataclass
class Session:
    cfg: RunConfig
    choice: object  # common.DeviceChoice: device, compute dtype and why
    dist: dist_lib.DistInfo
    tokenizer: object
    model: nn.Module  # wrapped (DDP/FSDP) or plain
    raw: nn.Module  # the single-device module (update_expert_bias, moe_layers, config)
    optimizer: object
    out: Path
    start_step: int = 0
    loop_state: dict = field(default_factory=dict)  # from the checkpoint resumed (empty on a fresh start)
    rng: dict | None = None

    @property
    def rank0(self) -> bool:
        return self.dist.is_rank0

    @property
    def device(self) -> torch.device:
        return self.choice.device

    def amp(self):
        """bf16 autocast on a GPU, nothing on fp32 devices (common.autocast)."""
        return autocast(self.choice)

    def restore_loader(self, loader) -> None:
        """Put a resumed run's training loader back where the checkpoint left it."""
        if "loader" in self.loop_state:
            loader.load_state_dict(self.loop_state["loader"])

    def new_loop_state(self) -> dict:
        """Counters carried in checkpoints: non-finite streak and total, best eval loss, tokens and
        FLOPs so far (cumulative over resumes), the ledger runs that wrote this output."""
        return {"nonfinite_streak": 0, "nonfinite_total": 0, "best_eval": None, "tokens": 0, "flops": 0.0,
                "run_ids": [], **{k: v for k, v in self.loop_state.items() if k != "loader"}}

    @contextlib.contextmanager
    def recording(self, command: str, parents=()):
        """The run's first writes (its config, metrics trimmed to the resumed step), the RNG of the
        checkpoint restored last, and the ledger entry around the loop. A resumed run names the runs
        that wrote its checkpoint among its parents, so the lineage keeps them."""
        from sputnik.accounting.ledger import record_run

        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "stage_config.json")
            for name in ("metrics.jsonl", "samples.jsonl"):  # a fresh start drops lines of a run that never checkpointed
                trim_metrics(self.out / name, self.start_step if self.rng is not None else -1)
        print0(f"device {self.device} ({self.choice.reason}); ranks {self.dist.world_size}; "
               f"{'resuming at step ' + str(self.start_step) if self.start_step else 'fresh start'}")
        if self.rng is not None:
            ckpt_lib.restore_rng(self.rng)  # last: nothing after this may consume random numbers
        with record_run(self.cfg.ledger_dir, command, self.cfg,
                        parents=[*parents, *self.loop_state.get("run_ids", [])]) as run:
            yield run

    def save_checkpoint(self, step: int, loop_state: dict, run, eval_loss: float | None = None) -> None:
        """Gather full states on every rank (collectives under FSDP), write on rank 0."""
        loop_state = {**loop_state, "run_ids": sorted({*loop_state.get("run_ids", []), run.run_id})}
        model_state = dist_lib.model_state(self.model)
        optim_state = dist_lib.optimizer_state(self.model, self.optimizer)
        rngs = dist_lib.all_gather_object(ckpt_lib.capture_rng(), self.dist)
        if self.rank0:
            ckpt_lib.save(ckpt_lib.checkpoints_dir(self.out), step, model_state=model_state, optimizer_state=optim_state,
                          rng_states=rngs, loop_state=loop_state, config=self.cfg, eval_loss=eval_loss,
                          keep_last=self.cfg.keep_last)
        dist_lib.barrier(self.dist)

    def log(self, record: dict) -> None:
        """Rank 0 appends one JSON line to metrics.jsonl; NaN/inf become "nan"/"inf" (strict JSON)."""
        if self.rank0:
            clean = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            append_jsonl(self.out / "metrics.jsonl", {"time": round(time.time(), 3), **clean})

    def nonfinite_guard(self, state: dict, stepped: bool, step: int, loss: float, grad_norm: float, stage: str) -> bool:
        """Count consecutive skipped (non-finite) steps in `state`; log each; raise TrainingDiverged
        after cfg.max_nonfinite_steps in a row (no checkpoint is written during a streak, so the last
        good one stays). Returns stepped."""
        if stepped:
            state["nonfinite_streak"] = 0
            return True
        state["nonfinite_streak"] += 1
        state["nonfinite_total"] += 1
        self.log({"step": step, "nonfinite": True, "loss": loss, "grad_norm": grad_norm,
                  "nonfinite_streak": state["nonfinite_streak"]})
        print0(f"{stage}: step {step} skipped: non-finite loss {loss} / grad norm {grad_norm}")
        if state["nonfinite_streak"] >= self.cfg.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{stage}: {state['nonfinite_streak']} consecutive steps with a non-finite loss or gradient (last at "
                f"step {step}); stopped. The last good checkpoint is kept under {self.out / 'checkpoints'}: lower "
                "optim.lr or raise optim.warmup_steps and --resume from it")
        return False

    def count_step(self, state: dict, m: dict, run, speed) -> None:
        """A finished optimizer step's tokens and FLOPs into the loop state (checkpointed, so cumulative
        over resumes), the throughput meter and the ledger entry."""
        state["tokens"] += m["step_tokens"]
        state["flops"] += m["step_flops"]
        speed.add(m.get("step_real_tokens", m["step_tokens"]), m.get("step_real_flops", m["step_flops"]))
        run.add(flops=m["step_flops"], tokens=m["step_tokens"])

    def log_step(self, step: int, m: dict, state: dict, speed, progress, log_every: int, last: bool) -> None:
        """Every log_every steps (and the last) a metrics line; the progress bar every step."""
        if step % log_every and not last:
            progress.update(step, m["loss"])
            return
        tok_s, mfu = speed.read()
        self.log({"step": step, **{k: m[k] for k in ("loss", "ce", "mtp", "aux", "lr", "grad_norm", "loss_tokens",
                                                     "moe_max_over_mean")},
                  "tokens_per_s": tok_s, "mfu": mfu, "tokens": state["tokens"], "flops": state["flops"]})
        progress.update(step, m["loss"], (tok_s, mfu))

    def checkpoint_due(self, step: int, state: dict, last: bool) -> bool:
        """Every checkpoint_every steps (never in the middle of a non-finite streak) and at the last."""
        return step != self.start_step and ((step % self.cfg.checkpoint_every == 0 and not state["nonfinite_streak"])
                                            or last)

    def finish(self, run, summary: dict, stage: str) -> dict:
        """Export <out>/model (rank 0), fill the ledger entry, print the summary line; the summary
        with the model directory and this run's id (the next stage's parent)."""
        model_dir = self.out / "model"
        plain = exportable(self.model, self.raw, self.rank0)  # a collective under FSDP: every rank takes part
        if self.rank0:
            export_model(plain, self.out, self.tokenizer, self.cfg)
        dist_lib.barrier(self.dist)
        summary = {**summary, "model_dir": str(model_dir), "out_dir": str(self.out), "run_ids": [run.run_id]}
        run.metrics.update({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
        run.artifacts.append(str(model_dir))
        shown = ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float))
        print0(f"{stage} done: {shown} -> {model_dir}")
        return summary


def export_model(model: nn.Module, out: Path, tokenizer, cfg: RunConfig) -> Path:
    """<out>/model in the Hugging Face layout (what the next stage's --init reads); with LoRA the
    adapters folded in, and with lora.save_adapter also <out>/adapter in the PEFT format."""
    if not cfg.lora.rank:
        return save_model(model, out / "model", tokenizer, cfg)
    from sputnik.train.lora import merged_copy, save_peft_adapter

    if cfg.lora.save_adapter:
        save_peft_adapter(model, cfg.lora, out / "adapter", base_model=cfg.init)
    return save_model(merged_copy(model), out / "model", tokenizer, cfg)


@contextlib.contextmanager
def process(cfg):
    """Threads, device, the kernels switch and the process group of a run (its DeviceConfig fields)
    -> (DeviceChoice, DistInfo); on exit the process group is left and the caller's thread count and
    kernels switch restored (in-process callers: tests, the pipeline)."""
    from sputnik.kernels import cpu as kernels

    threads, kernels_on = torch.get_num_threads(), kernels.cpu_kernels_enabled()
    try:
        choice = pick_device(cfg.device)
        set_threads(cfg.num_threads)
        kernels.use_cpu_kernels(cfg.cpu_kernels)
        yield choice, dist_lib.init_distributed(choice.device)
    finally:
        dist_lib.teardown()
        torch.set_num_threads(threads)
        kernels.use_cpu_kernels(kernels_on)


@contextlib.contextmanager
def open_session(cfg: RunConfig, *, model_cfg: ModelConfig | None, optim: OptimConfig, parallel: str = "none",
                 compile_blocks: bool = False):
    """Device, process group, tokenizer, model, resume validation, optimizer, wrapping: everything
    checked and loaded before the first byte is written (inside `process`). With cfg.compile the
    model's forward is compiled, or each transformer block (compile_blocks: RL, whose update reaches
    the blocks through hidden_states and whose micro-batches vary in length)."""
    with process(cfg) as (choice, dist):
        yield _setup(cfg, choice, dist, model_cfg, optim, parallel, compile_blocks)


def _setup(cfg: RunConfig, choice, dist, model_cfg: ModelConfig | None, optim: OptimConfig, parallel: str,
           compile_blocks: bool) -> Session:
    from sputnik.data import check_vocab

    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    resume_path = ckpt_lib.resolve(cfg.resume, out)
    if resume_path is None and ckpt_lib.list_checkpoints(ckpt_lib.checkpoints_dir(out)):
        raise ValueError(f"out_dir {out} already holds checkpoints: pass --resume auto to continue, or choose a new --out_dir")
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.init)
    if model_cfg is not None and model_cfg.abacus_max_index and not model_cfg.abacus_digit_ids:
        model_cfg.abacus_digit_ids = tokenizer.digit_ids()  # in place: the run's saved config records them
    model = load_model(cfg.init, model_cfg, cfg.init_impl)
    check_vocab(tokenizer, model_config(model).vocab_size)
    if cfg.lora.rank:  # before resuming: a LoRA run's checkpoints hold the adapters beside the frozen base
        from sputnik.train.lora import apply_lora

        adapted = apply_lora(model, cfg.lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print0(f"LoRA rank {cfg.lora.rank} on {len(adapted)} layers: {trainable:,} trainable parameters of "
               f"{sum(p.numel() for p in model.parameters()):,}")
    ckpt = None
    if resume_path is not None:
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        ckpt = ckpt_lib.validate(resume_path, expected_shapes=shapes, config=cfg, world_size=dist.world_size)
    optim_state, rng, start_step, loop_state = None, None, 0, {}
    if ckpt is not None:
        model_state, optim_state, rng = ckpt_lib.load(ckpt, dist.rank)
        model.load_state_dict(model_state)
        start_step, loop_state = ckpt.step, ckpt.loop_state
    model.to(choice.device)
    if cfg.compile:  # in place: the module, its state-dict keys and its other methods stay as they are
        _compile(model, compile_blocks)
    # FSDP2 replaces parameters with sharded DTensors: wrap first, then build the optimizer over them
    wrapped = dist_lib.wrap_model(model, parallel, dist, choice.device)
    optimizer = build_optimizer(dist_lib.unwrap(wrapped), optim)
    if optim_state is not None:
        try:
            dist_lib.load_optimizer_state(wrapped, optimizer, optim_state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"checkpoint {ckpt.path}: optimizer state does not fit this model/optimizer: {e}") from None
    return Session(cfg=cfg, choice=choice, dist=dist, tokenizer=tokenizer, model=wrapped, raw=model,
                   optimizer=optimizer, out=out, start_step=start_step, loop_state=loop_state, rng=rng)


def _compile(model: nn.Module, blocks: bool) -> None:
    """torch.compile in place: the whole forward (our MoE compiles as one graph), or each transformer
    block, one shape-polymorphic graph each."""
    if not blocks:
        model.compile()
        return
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"compile: {type(model).__name__} has no model.layers to compile; run without --compile")
    for block in layers:
        block.compile()
