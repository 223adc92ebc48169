"""`sputnik distill`: teacher -> smaller student, the way DeepSeek made its small R1 models.

Two modes:
- sequence (R1-Distill): the teacher samples k traces per training prompt; the task verifier
  keeps the correct ones (rejection sampling); the kept traces are written as JSONL with
  provenance (teacher, sampling settings, verdict) and the student is SFT-trained on them.
  Teacher and student may use different tokenizers.
- logit: token-level KD with forward KL (Hinton, τ²-scaled), reverse KL or generalised JSD(β)
  (GKD), off-policy on teacher traces or on-policy on the student's own samples with probability
  `on_policy_fraction` (GKD's λ). Needs a shared vocabulary, and refuses otherwise.

Ledger runs, one after the other (their device-hours never overlap): "distill" (the teacher's traces),
"distill-sft" or "distill-kd" (the student's training, checkpointed and resumable like every stage),
"distill-eval" (student vs teacher on held-out problems), each naming the one before as its parent.

Memory: the teacher runs under no_grad in eval mode (bf16 on GPU via autocast) and the divergence
is computed in chunks of positions (train/losses.py chunked_kd_loss), so no [B, T, V] fp32 logits exist
for both models at once.
"""
from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from sputnik.common import atomic_write_text, print0
from sputnik.config import RunConfig, add_config_args, build, config_from_args, knob
from sputnik.data import right_padding_mask
from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams
from sputnik.model.config import ModelConfig
from sputnik.rl.update import rollout_flops
from sputnik.train import losses
from sputnik.train.balance import ExpertLoad
from sputnik.train.loading import flops_per_token, load_model, load_tokenizer, model_config, peak_flops
from sputnik.train.optim import OptimConfig, clip_grad_norm, guarded_step, lr_multiplier, set_lr
from sputnik.train.progress import Progress, Throughput
from sputnik.train.session import every, open_session, process


def student_preset() -> ModelConfig:
    """Default student: a quarter-width MoE with the speedrun's vocabulary."""
    from sputnik.model.config import tiny

    return tiny(vocab_size=1024, hidden_size=128, num_hidden_layers=2, intermediate_size=384, moe_intermediate_size=64,
                n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=2, q_lora_rank=64, kv_lora_rank=32,
                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=0)


@dataclass
class Config(RunConfig):
    """init / tokenizer are the student's ('' = a fresh student of `student`, with the teacher's tokenizer)."""
    out_dir: str = knob("runs/distill", "output directory: traces.jsonl, the student's run, model/")
    checkpoint_every: int = knob(1000, "checkpoint the student every N steps (the last step always)", min=1)
    teacher: str = knob("", "teacher model directory (sputnik or local HF causal LM)")
    teacher_tokenizer: str = knob("", "the teacher's tokenizer directory ('' = the one saved with the teacher)")
    student: ModelConfig = field(default_factory=student_preset)
    mode: Literal["sequence", "logit"] = knob("sequence", "sequence (rejection-sampled traces + SFT) or logit (KD)")
    tasks: list[str] = knob(default_factory=lambda: ["addition", "subtraction"],
                            help="tasks whose train split gives prompts: task specs name[:knob=value...]")
    num_prompts: int = knob(512, "training prompts the teacher answers", min=1)
    samples_per_prompt: int = knob(4, "k: teacher samples per prompt", min=1)
    teacher_temperature: float = knob(0.7, "teacher sampling temperature (R1-Distill evaluation used 0.6)", min=0.0)
    max_new_tokens: int = knob(96, "longest trace", min=1)
    traces: str = knob("", "reuse an existing traces JSONL instead of sampling the teacher")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = knob("forward_kl", "logit mode: forward KL (Hinton), reverse KL (MiniLLM), generalised JSD (GKD)")
    jsd_beta: float = knob(0.5, "β of JSD(β): 0 -> forward KL, 1 -> reverse KL", min=0.0, max=1.0)
    kd_temperature: float = knob(1.0, "τ of the divergence (forward/reverse KL are τ²-scaled)", min=0.01)
    on_policy_fraction: float = knob(0.0, "logit mode: probability that a batch is the student's own samples (GKD λ)", min=0.0, max=1.0)
    steps: int = knob(300, "student optimizer steps", min=1)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20))
    batch_size: int = knob(32, "sequences per step", min=1)
    max_len: int = knob(256, "longest training sequence (prompt + trace)", min=8)
    progress: bool = knob(True, "live progress bar on a terminal (the student's training)")
    log_every: int = knob(10, "logit mode: metrics line every N steps", min=1)
    eval_examples: int = knob(200, "held-out problems for the student/teacher comparison", min=1)

    def __post_init__(self):
        super().__post_init__()
        if not self.teacher:
            raise ValueError("teacher: give the teacher model directory")

    @property
    def student_tokenizer(self) -> str:
        """The student's tokenizer: its own, else its init's, else the teacher's."""
        return self.tokenizer or ("" if self.init else self.teacher_tokenizer or self.teacher)


# ---------------------------------------------------------------------------------------------
# Teacher traces
def teacher_traces(cfg: Config, parents) -> tuple[Path, list[dict], str]:
    """The rejection-sampled traces (sampled now, or reused) in the ledger run "distill" ->
    (traces file, traces, run id). A killed run reuses its traces only if they were sampled with the
    same settings; the meta file names the run that sampled them, which a rerun that reuses them
    (and records no FLOPs itself) names as its parent instead."""
    from sputnik.accounting.ledger import record_run
    from sputnik.tasks import parse_tasks

    out = Path(cfg.out_dir)
    traces_path = Path(cfg.traces) if cfg.traces else out / "traces.jsonl"
    settings = dict(teacher=str(Path(cfg.teacher).resolve()), tasks=list(cfg.tasks), num_prompts=cfg.num_prompts,
                    k=cfg.samples_per_prompt, temperature=cfg.teacher_temperature,
                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    meta_path = out / "traces.settings.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    reuse = bool(cfg.traces) or (traces_path.is_file() and meta.get("settings", meta) == settings)
    sampled_by = [meta["run_id"]] if reuse and not cfg.traces and meta.get("run_id") else []
    with process(cfg) as (choice, _):
        teacher = load_model(cfg.teacher).to(choice.device).eval().requires_grad_(False)
        t_tok = load_tokenizer(cfg.teacher_tokenizer, cfg.teacher)
        with record_run(cfg.ledger_dir, "distill", cfg, parents=[*parents, *sampled_by]) as run:
            if reuse:
                traces = [json.loads(line) for line in traces_path.read_text().splitlines() if line.strip()]
            else:
                traces = sample_traces(teacher, t_tok, parse_tasks(cfg.tasks), cfg, teacher_id=settings["teacher"],
                                       count_flops=lambda f: run.add(flops=f))
                write_traces(traces_path, traces)
                atomic_write_text(meta_path, json.dumps({"settings": settings, "run_id": run.run_id}))
            if not traces:
                raise ValueError("the teacher produced no verified trace: nothing to distil (check the teacher's accuracy)")
            print0(f"distill: {len(traces)} verified traces from {cfg.num_prompts} prompts x {cfg.samples_per_prompt} samples")
            run.metrics.update(num_traces=len(traces))
            run.artifacts.append(str(traces_path))
    return traces_path, traces, run.run_id


# ---------------------------------------------------------------------------------------------
# Sequence level: rejection sampling
def sample_traces(teacher, tokenizer, tasks, cfg: "Config", teacher_id: str, count_flops=lambda flops: None) -> list[dict]:
    """k samples per prompt; keep those the verifier marks correct (deduplicated per prompt)."""
    rng = random.Random(cfg.seed)
    exs = []
    for i in range(cfg.num_prompts):
        t = tasks[i % len(tasks)]
        exs.append(t.generate(1, split="train", seed=rng.randrange(2**31))[0])
    by_name = {t.name: t for t in tasks}
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.teacher_temperature,
                            stop_token_ids=tokenizer.stop_ids, seed=cfg.seed)
    prompts = [tokenizer.render_prompt(ex.prompt) for ex in exs]
    outs = Engine(teacher, tokenizer).generate(prompts, params, num_samples=cfg.samples_per_prompt)
    # every sample was paid for, verified or not (the same count as RL's rollouts)
    count_flops(rollout_flops(teacher, prompts, [c for samples in outs for c in samples]))
    kept = []
    sampling = dict(temperature=cfg.teacher_temperature, k=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                    seed=cfg.seed)
    for ex, samples in zip(exs, outs):
        seen = set()
        for c in samples:
            v = by_name[ex.task].verify(ex, c.text)
            if v.correct and c.text not in seen:  # rejection sampling: only verified traces survive
                seen.add(c.text)
                kept.append(dict(prompt=ex.prompt, completion=c.text, answer=ex.answer, task=ex.task,
                                 teacher=teacher_id, sampling=sampling,
                                 verdict=dict(correct=v.correct, well_formatted=v.well_formatted, extracted=v.extracted)))
    return kept


def write_traces(path: Path, traces: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(t) + "\n" for t in traces))


# ---------------------------------------------------------------------------------------------
# Logit level
def check_shared_vocab(teacher_tok, student_tok, teacher_model, student_model) -> None:
    if teacher_tok.vocab_size != student_tok.vocab_size or \
            any(teacher_tok.encode(s) != student_tok.encode(s) for s in ("12+34=46", "<think>a</think>", "Hello world")):
        raise ValueError(f"logit-level KD needs a shared vocabulary: the teacher's tokenizer ({teacher_tok.vocab_size} ids) "
                         f"and the student's ({student_tok.vocab_size} ids) differ. Use mode=sequence, which "
                         "distils through text and allows different tokenizers.")
    tv, sv = teacher_model.lm_head.weight.shape[0], student_model.lm_head.weight.shape[0]
    if tv != sv:
        raise ValueError(f"logit-level KD needs equal output vocabularies: teacher head {tv}, student head {sv}")


# ---------------------------------------------------------------------------------------------
# The student: SFT on the traces (sequence level) or token-level KD
def student_sft(cfg: Config, traces_path: Path, parents) -> dict:
    """Sequence-level distillation = SFT of the student on the verified teacher traces ("distill-sft")."""
    from sputnik.stages import sft

    out = Path(cfg.out_dir)
    with process(cfg):
        load_tokenizer(cfg.student_tokenizer, cfg.init).save(out / "student_tokenizer")
    sft_cfg = build(sft.Config, dict(
        out_dir=str(out / "student_sft"), tokenizer=str(out / "student_tokenizer"), model=cfg.student, init=cfg.init,
        data=[str(traces_path)], tasks=[], eval_fraction=0.05, max_len=cfg.max_len, batch_size=cfg.batch_size,
        steps=cfg.steps, eval_every=0, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
        device=cfg.device, num_threads=cfg.num_threads, cpu_kernels=cfg.cpu_kernels, optim=cfg.optim.__dict__,
        progress=False, project_dir=cfg.ledger_dir, resume="auto", lora=cfg.lora.__dict__))
    return sft.run(sft_cfg, parents=parents, command="distill-sft")


def divergence_fn(cfg: "Config"):
    if cfg.divergence == "forward_kl":
        return losses.forward_kl_per_token
    if cfg.divergence == "reverse_kl":
        return losses.reverse_kl_per_token
    return functools.partial(losses.generalized_jsd_per_token, beta=cfg.jsd_beta)


def kd_loss(student, teacher, ids_BT, mask_BT, cfg: Config, pad_id: int):
    """Mean per-token divergence over completion positions (mask_BT marks positions whose next
    token is part of the completion) -> (loss, the student's expert load; padding is not load)."""
    h = student.hidden_states(ids_BT, right_padding_mask(ids_BT, pad_id))
    with torch.no_grad():
        h_t = teacher.hidden_states(ids_BT).hidden
    m = mask_BT.bool()
    total = losses.chunked_kd_loss(h.hidden[m], student.lm_head.weight, h_t[m], teacher.lm_head.weight,
                                   torch.ones(int(m.sum()), device=ids_BT.device), divergence=divergence_fn(cfg),
                                   temperature=cfg.kd_temperature)
    return total, h.expert_load


def batch_from_pairs(tokenizer, pairs: list[tuple[str, str]], max_len: int, device):
    rows = []
    for prompt, completion in pairs:
        ids, mask = tokenizer.render_chat(prompt, completion)
        rows.append((ids[:max_len], mask[:max_len]))
    T = max(len(r[0]) for r in rows)
    ids_BT = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    m_BT = torch.zeros(len(rows), T)
    for b, (ids, mask) in enumerate(rows):
        ids_BT[b, : len(ids)] = torch.tensor(ids)
        # position t predicts token t+1: it is trained when token t+1 is an assistant token
        m_BT[b, : len(ids) - 1] = torch.tensor(mask[1:], dtype=torch.float32)
    return ids_BT.to(device), m_BT.to(device)


def kd_batch(cfg: Config, step: int, traces: list[dict], tokenizer, engine: Engine, device):
    """The step's rows: teacher traces (off-policy) or, with probability on_policy_fraction, the
    student's own samples for those prompts (GKD; no gradient through sampling). Drawn from the step
    number, so a resumed run draws the same rows."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    rows = [traces[rng.randrange(len(traces))] for _ in range(cfg.batch_size)]
    on_policy = rng.random() < cfg.on_policy_fraction
    if on_policy:
        outs = engine.generate([tokenizer.render_prompt(r["prompt"]) for r in rows],
                               SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                              stop_token_ids=tokenizer.stop_ids, seed=cfg.seed + step))
        pairs = [(r["prompt"], o[0].text) for r, o in zip(rows, outs)]
    else:
        pairs = [(r["prompt"], r["completion"]) for r in rows]
    return (*batch_from_pairs(tokenizer, pairs, cfg.max_len, device), on_policy)


def student_kd(cfg: Config, traces: list[dict], parents) -> dict:
    """Token-level KD of the student ("distill-kd"), with checkpoints, resume and the non-finite guard
    of every training loop."""
    # resume "auto" as the sequence mode's student SFT: a rerun continues (or finds done) what a killed run left
    kd_cfg = replace(cfg, out_dir=str(Path(cfg.out_dir) / "student_kd"), tokenizer=cfg.student_tokenizer,
                     resume=cfg.resume or "auto")
    with open_session(kd_cfg, model_cfg=cfg.student, optim=cfg.optim) as s:
        teacher = load_model(cfg.teacher).to(s.device).eval().requires_grad_(False)
        check_shared_vocab(load_tokenizer(cfg.teacher_tokenizer, cfg.teacher), s.tokenizer, teacher, s.raw)
        engine = Engine(s.raw, s.tokenizer)
        with s.recording("distill-kd", parents) as run:
            speed, state = Throughput(peak_flops(s.device, 1)), s.new_loop_state()
            progress = Progress(cfg.steps, s.start_step, s.rank0 and cfg.progress, "distill-kd")
            step, t_start, loss = s.start_step, time.time(), float("nan")
            while True:
                last = step == cfg.steps
                if s.checkpoint_due(step, state, last):
                    s.save_checkpoint(step, state, run)
                if last:
                    break
                # --- training step: student forward and backward, teacher forward -----------------
                ids_BT, mask_BT, on_policy = kd_batch(cfg, step, traces, s.tokenizer, engine, s.device)
                s.raw.train()
                lr = set_lr(s.optimizer, lr_multiplier(step, cfg.steps, cfg.optim))
                with s.amp():
                    loss_t, expert_load = kd_loss(s.raw, teacher, ids_BT, mask_BT, cfg, s.tokenizer.pad_id)
                if step in cfg.poison_steps:
                    loss_t = loss_t * float("nan")
                loss_t.backward()
                loss, load = float(loss_t.detach()), ExpertLoad()
                load.add(expert_load)
                grad_norm = clip_grad_norm(s.raw, cfg.optim.grad_clip)
                stepped = guarded_step(s.optimizer, loss, grad_norm)
                load.apply(s.raw, s.dist, stepped)
                step += 1
                tokens = int(ids_BT.numel())  # student fwd+bwd, teacher fwd (1/3 of a training token)
                teacher_fpt = flops_per_token(teacher, ids_BT.shape[1]) / 3
                fpt = flops_per_token(s.raw, ids_BT.shape[1]) + teacher_fpt
                s.count_step(state, {"step_tokens": tokens, "step_flops": fpt * tokens}, run, speed)
                # the teacher's share, so that a comparison at equal *student* compute can take it out
                state["teacher_forward_flops"] = state.get("teacher_forward_flops", 0.0) + teacher_fpt * tokens
                if s.nonfinite_guard(state, stepped, step, loss, grad_norm, "distill-kd") and \
                        every(step, cfg.log_every, 0, step == cfg.steps):
                    s.log(dict(step=step, loss=loss, lr=lr, on_policy=on_policy, grad_norm=grad_norm,
                               tokens=state["tokens"], flops=state["flops"]))
                progress.update(step, loss)
            progress.close()
            return s.finish(run, {"final_train_loss": loss, "steps": cfg.steps, "tokens": state["tokens"],
                                  "teacher_forward_flops": float(state.get("teacher_forward_flops", 0.0)),
                                  "wall_s": time.time() - t_start, "nonfinite_steps": state["nonfinite_total"]},
                            "distill-kd")


# ---------------------------------------------------------------------------------------------
def run(cfg: Config, parents=(), final_model: bool = False) -> dict:
    """Traces, student, evaluation: three ledger runs, each the next one's parent. `parents`: the
    runs that produced the teacher; final_model: the evaluation run marks the student as the
    project's final model (its lineage: the whole chain)."""
    from sputnik.accounting.ledger import record_run
    from sputnik.evaluate import greedy_eval
    from sputnik.metrics import by_task
    from sputnik.model.accounting import param_counts
    from sputnik.tasks import parse_tasks

    t0 = time.time()
    tasks = parse_tasks(cfg.tasks)  # a bad spec fails before any work
    traces_path, traces, traces_run = teacher_traces(cfg, parents)
    trained = (student_sft(cfg, traces_path, [traces_run]) if cfg.mode == "sequence"
               else student_kd(cfg, traces, [traces_run]))
    # --- evaluation: student vs teacher on held-out problems
    with process(cfg) as (choice, _):
        student = load_model(trained["model_dir"]).to(choice.device)
        teacher = load_model(cfg.teacher).to(choice.device).eval()
        s_tok, t_tok = load_tokenizer("", trained["model_dir"]), load_tokenizer(cfg.teacher_tokenizer, cfg.teacher)
        with record_run(cfg.ledger_dir, "distill-eval", cfg, parents=trained["run_ids"], final_model=final_model) as run:
            s_res = greedy_eval(Engine(student, s_tok), s_tok, tasks, cfg.eval_examples, cfg.seed, cfg.max_new_tokens)
            t_res = greedy_eval(Engine(teacher, t_tok), t_tok, tasks, cfg.eval_examples, cfg.seed, cfg.max_new_tokens)
            (s_acc, s_tps), (t_acc, t_tps) = [(r["accuracy"], r["tokens_per_s"]) for r in (s_res, t_res)]
            names = [t.name for t in tasks]
            s_cfg, t_cfg = model_config(student), model_config(teacher)
            sp = param_counts(s_cfg) if isinstance(s_cfg, ModelConfig) else {}
            tp = param_counts(t_cfg) if isinstance(t_cfg, ModelConfig) else {}
            summary = dict(student_accuracy=s_acc, teacher_accuracy=t_acc, accuracy_ratio=s_acc / t_acc if t_acc else None,
                           student_params_total=sp.get("total"), student_params_active=sp.get("active"),
                           teacher_params_total=tp.get("total"), teacher_params_active=tp.get("active"),
                           student_tokens_per_s=s_tps, teacher_tokens_per_s=t_tps, num_traces=len(traces),
                           student_dir=trained["model_dir"], wall_s=time.time() - t0)
            run.metrics.update(heldout_accuracy=s_acc, params_total=sp.get("total"), params_active=sp.get("active"),
                               heldout_by_task=by_task(names, s_res["tally"]),
                               teacher_by_task=by_task(names, t_res["tally"]), **summary)
    return {**summary, "run_ids": [run.run_id]}


def register(sub) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a smaller student (rejection-sampled traces or logit KD)",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, Config)
    p.set_defaults(func=lambda args: print(json.dumps(run(config_from_args(args, Config)), indent=2, default=str)) or 0)
