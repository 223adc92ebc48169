"""Pieces shared by the training stages (pretrain, sft): the loop knobs, model and tokenizer
loading (our config, our checkpoint, any local Hugging Face causal LM), the accumulated
forward/backward, held-out loss, greedy decoding, metrics, progress and the stage setup.

Shape legend: B batch, T time, V vocab, D hidden.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sputnik.train import checkpoint as ckpt_lib
from sputnik import distributed as dist_lib
from sputnik.common import append_jsonl, autocast, pick_device, print0, seed_everything, set_threads
from sputnik.config import build, knob, save_config
from sputnik.model.config import ModelConfig
from sputnik.model.moe import count_load_where
from sputnik.model.output import ModelOutput
from sputnik.train.optim import OptimConfig, build_optimizer
from sputnik.train.progress import trim_metrics


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Knobs every training stage has
@dataclass
class InitConfig:
    hf_dir: str = knob("", "start from this local Hugging Face causal-LM directory (a stage's <out>/model, "
                           "or any transformers model); '' = fresh init from the model settings")
    checkpoint: str = knob("", "start from the weights of this sputnik training checkpoint directory")
    hf_impl: Literal["auto", "transformers"] = knob(
        "auto", "auto: our model code for deepseek_v3 and sputnik llama exports, transformers otherwise; "
                "transformers: always AutoModelForCausalLM")

    def __post_init__(self):
        if self.hf_dir and self.checkpoint:
            raise ValueError(f"init.hf_dir={self.hf_dir!r} and init.checkpoint={self.checkpoint!r}: give at most one")


@dataclass
class LoopConfig:
    out_dir: str = knob("runs/stage", "output directory: metrics.jsonl, checkpoints/, model/, stage_config.json")
    tokenizer: str = knob("", "tokenizer directory or tokenizer.json ('' = the one in init.hf_dir)")
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = knob(16, "sequences per micro-batch per rank", min=1)
    grad_accum: int = knob(1, "micro-batches per optimizer step", min=1)
    max_steps: int = knob(200, "optimizer steps", min=1)
    eval_every: int = knob(50, "held-out evaluation every N steps (0 = only at the end)", min=0)
    eval_batches: int = knob(8, "held-out batches per evaluation", min=1)
    checkpoint_every: int = knob(100, "checkpoint every N steps (the last step always)", min=1)
    keep_last: int = knob(2, "checkpoints kept besides the best", min=1)
    resume: str = knob("", "'' fresh start; 'auto' latest checkpoint if any; 'latest'; or a checkpoint directory")
    max_nonfinite_steps: int = knob(5, "stop after this many consecutive steps with a NaN/inf loss or gradient", min=1)
    poison_steps: list[int] = knob(default_factory=list, help="testing only: make the loss NaN at these steps")
    log_every: int = knob(10, "metrics line every N steps", min=1)
    progress: bool = knob(True, "live progress bar on a terminal")
    seed: int = knob(0, "seed of the init, the data order and the RNG", min=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = knob("auto", "compute device")
    parallel: Literal["ddp", "fsdp"] = knob("ddp", "wrapping under torchrun (ignored for one process)")
    num_threads: int = knob(0, "CPU threads (0 = all cores of the affinity mask)", min=0)
    compile: bool = knob(False, "torch.compile the model's training forward (our MoE compiles as one graph; CPU: "
                                "~5% faster after ~20 s of compiling, see benchmarks/bench_train.py --compile)")
    project_dir: str = knob("", "directory of the cost ledger ledger.jsonl ('' = the parent of out_dir)")
    ledger_command: str = knob("", "name of this run in the cost ledger ('' = the stage's name)")

    def __post_init__(self):
        if self.optim.optimizer == "muon" and self.parallel == "fsdp":
            raise ValueError("optim.optimizer='muon' with parallel='fsdp': Muon on sharded DTensors is not "
                             "supported here; use parallel=ddp")


# ---------------------------------------------------------------------------------------------
# Any Hugging Face causal LM behind our forward contract
class HFCausalLM(nn.Module):
    """Wraps a transformers AutoModelForCausalLM so loops, evals and decoders treat it like ours:
    forward(ids, targets) -> ModelOutput (mean CE over non-ignored targets; no MTP, no aux)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None) -> ModelOutput:
        logits_BTV = self.hf(input_ids=input_ids_BT).logits
        if targets_BT is None:
            return ModelOutput(logits=logits_BTV)
        num_tokens = (targets_BT != -100).sum()
        ce_sum = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=-100, reduction="sum")
        ce = ce_sum / num_tokens.clamp(min=1)
        zero = ce.new_zeros(())
        return ModelOutput(loss=ce, ce_loss=ce.detach(), mtp_loss=zero, aux_loss=zero, num_tokens=num_tokens)

    def hidden_states(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids_BT, output_hidden_states=True).hidden_states[-1]

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def expert_load(self) -> list:
        return []

    def update_expert_bias(self) -> None:
        return None

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None):  # engine contract (engine_hf.py)
        from sputnik.inference import hf_cache as engine_hf
        return engine_hf.new_cache(self.hf, batch, max_len, dtype, device)

    def forward_cached(self, input_ids_BT, cache, cache_seqlens_B, return_hidden: bool = False):
        from sputnik.inference import hf_cache as engine_hf
        return engine_hf.forward_cached(self.hf, input_ids_BT, cache, cache_seqlens_B, return_hidden)


# ---------------------------------------------------------------------------------------------
# Loading models and tokenizers
def load_model(model_cfg: ModelConfig | None, init: InitConfig) -> nn.Module:
    """fp32 model on CPU: fresh from model_cfg, or from init.hf_dir / init.checkpoint (then the
    model settings are ignored, with a warning when they differ from the loaded model's)."""
    model = _load_model(model_cfg, init)
    loaded = getattr(model, "config", None)
    if (init.hf_dir or init.checkpoint) and model_cfg is not None and model_cfg != ModelConfig() and model_cfg != loaded:
        warnings.warn(f"model settings ignored: the architecture comes from {init.hf_dir or init.checkpoint}")
    return model


def _load_model(model_cfg: ModelConfig | None, init: InitConfig) -> nn.Module:
    from sputnik.model import build_model

    if init.checkpoint:
        return _load_from_checkpoint(Path(init.checkpoint))
    if not init.hf_dir:
        return build_model(model_cfg)
    path = Path(init.hf_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"init.hf_dir={path}: not a Hugging Face model directory (no config.json)")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"init.hf_dir={path}: config.json is not valid JSON: {e}") from None
    if init.hf_impl == "auto" and model_type == "deepseek_v3":
        from sputnik.model.hf import load_hf

        return load_hf(path)
    if init.hf_impl == "auto" and model_type == "llama" and (path / "stage_config.json").is_file():
        from sputnik.model.hf_llama import load_hf_llama  # our dense twin, exported by a stage

        return load_hf_llama(path)
    from transformers import AutoModelForCausalLM

    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for unusable dirs
        raise ValueError(f"init.hf_dir={path}: transformers cannot load it: {e}") from None
    return HFCausalLM(hf)


def _load_from_checkpoint(path: Path) -> nn.Module:
    """The model a sputnik checkpoint was trained as (its stage_config's model/init), with its weights."""
    cfg_file = path / "stage_config.json"
    if not (path / "model.safetensors").is_file() or not cfg_file.is_file():
        raise ValueError(f"init.checkpoint={path}: not a sputnik checkpoint (needs model.safetensors and stage_config.json)")
    saved = json.loads(cfg_file.read_text())
    model = load_model(build(ModelConfig, saved["model"]), build(InitConfig, {**saved["init"], "checkpoint": ""}))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = ckpt_lib.tensor_shapes(path / "model.safetensors")
    if shapes != expected:
        raise ValueError(f"init.checkpoint={path}: tensors do not match the model its stage_config describes")
    model.load_state_dict(ckpt_lib.load_tensors(path / "model.safetensors"))
    return model


def load_tokenizer(path: str, init: InitConfig):
    """--tokenizer, else the tokenizer saved in init.hf_dir (ours, or any HF fast tokenizer)."""
    from sputnik.tokenizer import Tokenizer

    source = path or init.hf_dir
    if not source and init.checkpoint:
        saved = json.loads((Path(init.checkpoint) / "stage_config.json").read_text())
        source = saved.get("tokenizer") or saved.get("init", {}).get("hf_dir", "")
    if not source:
        raise ValueError("no tokenizer: pass --tokenizer DIR (from `sputnik tokenizer train`) or --init.hf_dir")
    try:
        return Tokenizer.load(source)
    except ValueError as e:
        if "not a sputnik tokenizer" in str(e):
            return Tokenizer.from_pretrained_hf(source)
        raise


def model_vocab_size(model: nn.Module) -> int:
    return unwrap_config(model).vocab_size


def unwrap_config(model: nn.Module):
    return dist_lib.unwrap(model).config


def save_model(model: nn.Module, directory: Path, tokenizer, config) -> Path:
    """Export in the Hugging Face layout (loadable by transformers and by --init.hf_dir), with the
    tokenizer and the resolved stage config beside it."""
    raw = dist_lib.unwrap(model)
    if isinstance(raw, HFCausalLM):
        raw.hf.save_pretrained(str(directory), safe_serialization=True)
    elif raw.config.architecture == "llama":
        from sputnik.model.hf_llama import save_hf_llama

        save_hf_llama(raw, directory)
    else:
        from sputnik.model.hf import save_hf

        save_hf(raw, directory)
    tokenizer.save(directory)
    save_config(config, directory / "stage_config.json")
    return directory


def exportable(s) -> nn.Module | None:
    """A plain single-device model to export: the module itself, or under FSDP2 a fresh CPU copy
    (rank 0; None elsewhere) loaded with the gathered full state dict."""
    if not dist_lib.is_fsdp(s.model):
        return dist_lib.unwrap(s.model)
    state = dist_lib.model_state(s.model)
    if not s.rank0:
        return None
    if isinstance(s.raw, HFCausalLM):
        from transformers import AutoModelForCausalLM

        copy = HFCausalLM(AutoModelForCausalLM.from_config(s.raw.config))
    else:
        copy = type(s.raw)(s.raw.config)
    copy.load_state_dict(state)
    return copy


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: closed form for our configs, 6·N (+ attention) for foreign models."""
    cfg = unwrap_config(model)
    if isinstance(cfg, ModelConfig):
        from sputnik.model.accounting import flops_per_token as fpt

        return fpt(cfg, seq_len, training=True)["total"]
    n = sum(p.numel() for p in dist_lib.unwrap(model).parameters())
    layers, width = getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "hidden_size", 0)
    return 6.0 * n + 6.0 * layers * width * seq_len  # causal attention: 3 x 2 x 2 x L x d x T/2


def peak_flops(device: torch.device, world_size: int) -> float | None:
    """Nominal peak FLOP/s of the devices of this job (hardware.py tables); None if unknown."""
    from sputnik.accounting import hardware

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    key = hardware.device_key(device.type, name)
    per = hardware.DEFAULTS["peak_flops"].get(key)
    if per is None:
        return None
    return per * (torch.get_num_threads() if device.type == "cpu" else 1) * world_size


def parse_tasks(entries: list[str]) -> list:
    """Task specs "name" or "name:knob=value:knob=value" (e.g. "addition:max_digits=3") -> Tasks,
    knobs validated by sputnik.tasks.get_task."""
    from sputnik.tasks import get_task

    tasks = []
    for entry in entries:
        name, *pairs = entry.split(":")
        knobs = {}
        for pair in pairs:
            if "=" not in pair:
                raise ValueError(f"task spec {entry!r}: expected name:knob=value[:knob=value...]")
            key, value = pair.split("=", 1)
            knobs[key] = value
        tasks.append(get_task(name, **knobs))
    return tasks


# ---------------------------------------------------------------------------------------------
# Stage setup: everything validated and loaded before the first byte is written
@dataclass
class Session:
    cfg: LoopConfig
    device: torch.device
    dtype_reason: str
    amp: object  # zero-arg callable returning the autocast context
    dist: dist_lib.DistInfo
    tokenizer: object
    model: nn.Module  # wrapped (DDP/FSDP) or plain
    raw: nn.Module  # the single-device module (hooks: update_expert_bias, moe_layers)
    optimizer: object
    start_step: int = 0
    loop_state: dict = field(default_factory=dict)
    rng: dict | None = None
    out: Path = Path(".")

    @property
    def rank0(self) -> bool:
        return self.dist.is_rank0


def setup(cfg: LoopConfig, check_data) -> tuple[Session, object]:
    """Device, process group, tokenizer, model, data (check_data(tokenizer, dist) -> data, raising
    ValueError on bad input), resume validation, optimizer, wrapping. Writes nothing."""
    choice = pick_device(cfg.device)
    set_threads(cfg.num_threads)
    dist = dist_lib.init_distributed(choice.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    resume_path = ckpt_lib.resolve(cfg.resume, out)
    if resume_path is None and ckpt_lib.list_checkpoints(ckpt_lib.checkpoints_dir(out)):
        raise ValueError(f"out_dir {out} already holds checkpoints: pass --resume auto to continue, or choose a new --out_dir")
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.init)
    model = load_model(cfg.model, cfg.init)
    from sputnik.data import check_vocab

    check_vocab(tokenizer, model_vocab_size(model))
    data = check_data(tokenizer, dist)
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
        model.compile()
    # FSDP2 replaces parameters with sharded DTensors: wrap first, then build the optimizer over them
    wrapped = dist_lib.wrap_model(model, cfg.parallel, dist, choice.device)
    optimizer = build_optimizer(dist_lib.unwrap(wrapped), cfg.optim)
    if optim_state is not None:
        try:
            dist_lib.load_optimizer_state(wrapped, optimizer, optim_state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"checkpoint {ckpt.path}: optimizer state does not fit this model/optimizer: {e}") from None
    session = Session(cfg=cfg, device=choice.device, dtype_reason=choice.reason, amp=lambda: autocast(choice),
                      dist=dist, tokenizer=tokenizer, model=wrapped, raw=model, optimizer=optimizer, out=out,
                      start_step=start_step, loop_state=loop_state, rng=rng)
    return session, data


def begin(session: Session) -> None:
    """First writes of the run: resolved config, metrics trimmed to the resumed step, RNG restored."""
    out, cfg = session.out, session.cfg
    if session.rank0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "stage_config.json")
        for name in ("metrics.jsonl", "samples.jsonl"):  # a fresh start drops lines of a run that never checkpointed
            trim_metrics(out / name, session.start_step if session.rng is not None else -1)
    print0(f"device {session.device} ({session.dtype_reason}); ranks {session.dist.world_size}; "
           f"{'resuming at step ' + str(session.start_step) if session.start_step else 'fresh start'}")
    if session.rng is not None:
        ckpt_lib.restore_rng(session.rng)  # last: nothing after this may consume random numbers


def save_checkpoint(session: Session, step: int, loop_state: dict, eval_loss: float | None) -> None:
    """Gather full states on every rank (collectives under FSDP), write on rank 0."""
    model_state = dist_lib.model_state(session.model)
    optim_state = dist_lib.optimizer_state(session.model, session.optimizer)
    rngs = dist_lib.all_gather_object(ckpt_lib.capture_rng(), session.dist)
    if session.rank0:
        ckpt_lib.save(ckpt_lib.checkpoints_dir(session.out), step, model_state=model_state, optimizer_state=optim_state,
                      rng_states=rngs, loop_state=loop_state, config=session.cfg, eval_loss=eval_loss,
                      keep_last=session.cfg.keep_last)
    dist_lib.barrier(session.dist)


def run_stage(cfg: LoopConfig, check_data, command: str, loop) -> dict:
    """A training stage from start to end: setup (validate and load everything, resume), then the first
    writes, the ledger entry around `loop(session, cfg, *data, ledger_run)`, and the teardown (process
    group, and the caller's thread count back for in-process callers: tests, the pipeline).
    data[0] is the training loader, whose position a resumed run restores."""
    threads = torch.get_num_threads()
    try:
        session, data = setup(cfg, check_data)
        if session.loop_state:
            data[0].load_state_dict(session.loop_state["loader"])
        begin(session)
        with ledger(session, command) as ledger_run:
            return loop(session, cfg, *data, ledger_run)
    finally:
        dist_lib.teardown()
        torch.set_num_threads(threads)


def ledger(session: Session, command: str, final_model: bool = False):
    """The stage's one ledger call (rank 0 records; the ledger ignores other ranks)."""
    from sputnik.accounting.ledger import record_run

    project = session.cfg.project_dir or str(session.out.resolve().parent)
    return record_run(project, session.cfg.ledger_command or command, session.cfg, final_model=final_model)


# ---------------------------------------------------------------------------------------------
# The accumulated forward/backward and the MoE hooks
def forward_backward(session: Session, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                     poison: bool = False) -> dict[str, float]:
    """Backward of the token-mean loss over the global batch (all micro-batches, all ranks).
    Micro-batch i is weighted n_i / N (n_i its non-ignored targets, N their global sum), times
    world_size because DDP/FSDP average gradients over ranks. Returns global token-weighted means
    of loss, ce, mtp, aux, and the global token count."""
    n_local = [int((y != -100).sum()) for _, y in micro_batches]
    (n_global,) = dist_lib.all_reduce_sum([sum(n_local)], session.dist, session.device)
    sums = torch.zeros(4, dtype=torch.float64)
    for i, (x_BT, y_BT) in enumerate(micro_batches):
        x_BT, y_BT = x_BT.to(session.device), y_BT.to(session.device)
        weight = n_local[i] / max(n_global, 1.0)
        pad_id = getattr(session.tokenizer, "pad_id", None)  # SFT rows are right-padded with it
        load_mask = count_load_where(session.raw, x_BT != pad_id) if pad_id is not None else contextlib.nullcontext()
        with dist_lib.maybe_no_sync(session.model, i == len(micro_batches) - 1), session.amp(), load_mask:
            out = session.model(x_BT, y_BT)
        loss = out.loss * (weight * session.dist.world_size)
        if poison:
            loss = loss * float("nan")
        loss.backward()
        parts = [loss.detach() / session.dist.world_size, out.ce_loss * weight, out.mtp_loss * weight, out.aux_loss * weight]
        sums += torch.stack([p.detach().double().cpu() for p in parts])
    loss, ce, mtp, aux = dist_lib.all_reduce_sum(sums.tolist(), session.dist, session.device)
    return dict(loss=loss, ce=ce, mtp=mtp, aux=aux, tokens=n_global)


def moe_balance(raw: nn.Module) -> float | None:
    """max/mean of the routed counts accumulated this step (this rank), worst MoE layer."""
    layers = raw.moe_layers().values() if hasattr(raw, "moe_layers") else []
    ratios = [m.load_stats()["max_over_mean"] for m in layers]
    return max(ratios) if ratios else None


def after_step(raw: nn.Module, stepped: bool) -> None:
    """Aux-loss-free balancing after optimizer.step(); a skipped step discards its counts
    (update with γ = 0 still all-reduces and resets them, keeping ranks in lockstep)."""
    if stepped:
        raw.update_expert_bias()
    elif hasattr(raw, "moe_layers"):
        for m in raw.moe_layers().values():
            m.update_bias(0.0)


# ---------------------------------------------------------------------------------------------
# Evaluation
@torch.no_grad()
def eval_loss(session: Session, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Token-weighted mean next-token CE (no MTP, no aux) over held-out batches and ranks."""
    session.model.eval()  # MoE counts only accumulate in training mode
    total, count = 0.0, 0.0
    for x_BT, y_BT in batches:
        with session.amp():
            out = session.model(x_BT.to(session.device), y_BT.to(session.device))
        total += float(out.ce_loss) * float(out.num_tokens)
        count += float(out.num_tokens)
    session.model.train()
    total, count = dist_lib.all_reduce_sum([total, count], session.dist, session.device)
    return total / max(count, 1.0)


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: set[int],
                    pad_id: int, device: torch.device, amp=contextlib.nullcontext, batch_size: int = 32,
                    dist: dist_lib.DistInfo = dist_lib.DistInfo(), max_len: int | None = None) -> list[list[int]]:
    """Greedy completions (stop token included when hit) with the model's full forward, no cache.
    Rows are right-padded in one buffer; causal attention means row b's next token depends only
    on its own first len_b positions, so ragged rows need no attention mask. Under distribution
    every rank must run the same number of forwards (FSDP gathers weights in each): the batch
    count and the early exit are agreed over ranks."""
    raw = dist_lib.unwrap(model)
    sharded = any(hasattr(p, "full_tensor") for p in raw.parameters())  # FSDP2 DTensors need its forward hooks
    if hasattr(raw, "new_cache") and not sharded:
        # Fast path: the inference engine (latent KV cache, finished rows leave the batch); ranks
        # decode their own prompts independently, no collectives needed.
        from sputnik.inference.engine import Engine, SamplingParams

        with amp():
            outs = Engine(raw, max_batch_size=batch_size).generate(
                prompts, SamplingParams(max_new_tokens=max_new_tokens if max_len is None else
                                        max(1, min(max_new_tokens, max_len - max(map(len, prompts)))),
                                        temperature=0, stop_token_ids=tuple(stop_ids)))
        return [o[0].token_ids for o in outs]
    was_training = model.training
    model.eval()
    results: list[list[int]] = []
    num_batches = math.ceil(len(prompts) / batch_size)
    if dist.enabled:
        num_batches = int(max(dist_lib.all_gather_object(num_batches, dist)))
    for b in range(num_batches):
        chunk = prompts[b * batch_size:(b + 1) * batch_size] or [[pad_id]]  # a dummy row keeps ranks in step
        lens_B = torch.tensor([len(p) for p in chunk], device=device)
        budget = max_new_tokens if max_len is None else max(0, min(max_new_tokens, max_len - int(lens_B.max())))
        if dist.enabled:  # the same number of forwards everywhere
            budget = int(min(dist_lib.all_gather_object(budget, dist)))
        buf_BT = torch.full((len(chunk), int(lens_B.max()) + budget), pad_id, dtype=torch.long, device=device)
        for row, p in enumerate(chunk):
            buf_BT[row, :len(p)] = torch.tensor(p, dtype=torch.long)
        outs, done = [[] for _ in chunk], torch.zeros(len(chunk), dtype=torch.bool, device=device)
        rows = torch.arange(len(chunk), device=device)
        for _ in range(budget):
            with amp():
                logits_BTV = model(buf_BT[:, :int(lens_B.max())]).logits
            next_B = logits_BTV[rows, lens_B - 1].argmax(-1)
            for row in torch.nonzero(~done).flatten().tolist():
                tok = int(next_B[row])
                outs[row].append(tok)
                done[row] = tok in stop_ids
            live = ~done
            buf_BT[rows, lens_B] = torch.where(live, next_B, buf_BT[rows, lens_B])
            lens_B = lens_B + live.long()
            all_done = bool(done.all())
            if dist.enabled:
                all_done = all(dist_lib.all_gather_object(all_done, dist))
            if all_done:
                break
        results.extend(outs if b * batch_size < len(prompts) else [])
    model.train(was_training)
    return results[:len(prompts)]


# ---------------------------------------------------------------------------------------------
# Metrics (progress bar, throughput and metrics-file helpers live in sputnik/train/progress.py)
def log_metrics(session: Session, record: dict) -> None:
    """Rank 0 appends one JSON line; NaN/inf become the strings "nan"/"inf" (strict JSON)."""
    if session.rank0:
        clean = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        append_jsonl(session.out / "metrics.jsonl", {"time": round(time.time(), 3), **clean})


def nonfinite_guard(s: Session, state: dict, stepped: bool, step: int, m: dict, grad_norm: float, stage: str) -> bool:
    """Count consecutive skipped (non-finite) steps in `state`; log each; raise TrainingDiverged
    after cfg.max_nonfinite_steps in a row (no checkpoint is written during a streak, so the
    last good one stays). Returns stepped."""
    if stepped:
        state["nonfinite_streak"] = 0
        return True
    state["nonfinite_streak"] += 1
    state["nonfinite_total"] += 1
    log_metrics(s, {"step": step, "nonfinite": True, "loss": m["loss"], "grad_norm": grad_norm,
                    "nonfinite_streak": state["nonfinite_streak"]})
    print0(f"{stage}: step {step} skipped: non-finite loss {m['loss']} / grad norm {grad_norm}")
    if state["nonfinite_streak"] >= s.cfg.max_nonfinite_steps:
        raise TrainingDiverged(
            f"{stage}: {state['nonfinite_streak']} consecutive steps with a non-finite loss or gradient (last at "
            f"step {step}); stopped. The last good checkpoint is kept under {s.out / 'checkpoints'}: lower "
            "optim.lr or raise optim.warmup_steps and --resume from it")
    return False


def new_loop_state(loop_state: dict) -> dict:
    """Counters carried in checkpoints (the loader position is added at save time)."""
    return {"nonfinite_streak": 0, "nonfinite_total": 0, "best_eval": None,
            **{k: v for k, v in loop_state.items() if k != "loader"}}


def finish(s: Session, cfg, ledger_run, summary: dict, stage: str) -> dict:
    """Export <out>/model (rank 0), fill the ledger entry, print the summary line."""
    model_dir = s.out / "model"
    plain = exportable(s)  # a collective under FSDP: every rank takes part
    if s.rank0:
        save_model(plain, model_dir, s.tokenizer, cfg)
    dist_lib.barrier(s.dist)
    summary = {**summary, "model_dir": str(model_dir), "out_dir": str(s.out)}
    ledger_run.metrics.update({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
    ledger_run.artifacts.append(str(model_dir))
    shown = ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float))
    print0(f"{stage} done: {shown} -> {model_dir}")
    return summary
