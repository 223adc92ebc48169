"""`sputnik distill`: teacher -> smaller student, the way DeepSeek made its small R1 models.

Two modes:
- sequence (R1-Distill): the teacher samples k traces per training prompt; the task verifier
  keeps the correct ones (rejection sampling); the kept traces are written as JSONL with
  provenance (teacher, sampling settings, verdict) and the student is SFT-trained on them.
  Teacher and student may use different tokenizers.
- logit: token-level KD with forward KL (Hinton, τ²-scaled), reverse KL or generalised JSD(β)
  (GKD), off-policy on teacher traces or on-policy on the student's own samples with probability
  `on_policy_fraction` (GKD's λ). Needs a shared vocabulary, and refuses otherwise.

Memory: the teacher runs under no_grad in eval mode (bf16 on GPU via autocast) and the divergence
is computed in chunks of positions (losses.chunked_kd_loss), so no [B, T, V] fp32 logits exist
for both models at once.
"""
from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sputnik.train import losses
from sputnik.common import append_jsonl, atomic_write_text, autocast, pick_device, print0, seed_everything, set_threads
from sputnik.config import add_config_args, config_from_args, knob, save_config
from sputnik.inference.engine import Engine, SamplingParams
from sputnik.evaluate import greedy_accuracy
from sputnik.model.config import ModelConfig
from sputnik.model.moe import count_load_where
from sputnik.train.optim import OptimConfig, build_optimizer, clip_grad_norm, guarded_step, lr_multiplier, set_lr


def student_preset() -> ModelConfig:
    """Default student: a quarter-width MoE with the speedrun's vocabulary."""
    from sputnik.model.config import tiny

    return tiny(vocab_size=1024, hidden_size=128, num_hidden_layers=2, intermediate_size=384, moe_intermediate_size=64,
                n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=2, q_lora_rank=64, kv_lora_rank=32,
                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=0)


@dataclass
class DistillConfig:
    teacher: str = knob("", "teacher model directory (sputnik or local HF causal LM)")
    student_init: str = knob("", "student model directory to start from ('' = a fresh model of `student`)")
    student: ModelConfig = field(default_factory=student_preset)
    out_dir: str = knob("runs/distill", "output directory")
    ledger_dir: str = knob("runs", "project directory whose ledger.jsonl records this run")
    mode: Literal["sequence", "logit"] = knob("sequence", "sequence (rejection-sampled traces + SFT) or logit (KD)")
    tasks: list[str] = knob(default_factory=lambda: ["addition", "subtraction"], help="tasks whose train split gives prompts")
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
    batch_size: int = knob(32, "sequences per step", min=1)
    max_len: int = knob(256, "longest training sequence (prompt + trace)", min=8)
    eval_examples: int = knob(200, "held-out problems for the student/teacher comparison", min=1)
    seed: int = knob(0, "seed")
    device: str = knob("auto", "auto, cpu, cuda or mps")
    num_threads: int = knob(0, "CPU threads (0 = all)", min=0)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20))


# ---------------------------------------------------------------------------------------------
# Sequence level: rejection sampling
def sample_traces(teacher, tokenizer, tasks, cfg: DistillConfig, teacher_id: str) -> list[dict]:
    """k samples per prompt; keep those the verifier marks correct (deduplicated per prompt)."""
    rng = random.Random(cfg.seed)
    exs = []
    for i in range(cfg.num_prompts):
        t = tasks[i % len(tasks)]
        exs.append(t.generate(1, split="train", seed=rng.randrange(2**31))[0])
    by_name = {t.name: t for t in tasks}
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.teacher_temperature,
                            stop_token_ids=(tokenizer.eot_id,), seed=cfg.seed)
    outs = Engine(teacher, tokenizer).generate([tokenizer.render_prompt(ex.prompt) for ex in exs], params,
                                                 num_samples=cfg.samples_per_prompt)
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


def divergence_fn(cfg: DistillConfig):
    if cfg.divergence == "forward_kl":
        return losses.forward_kl_per_token
    if cfg.divergence == "reverse_kl":
        return losses.reverse_kl_per_token
    return functools.partial(losses.generalized_jsd_per_token, beta=cfg.jsd_beta)


def kd_step_loss(student, teacher, ids_BT, mask_BT, cfg: DistillConfig, dc):
    """Mean per-token divergence over completion positions (mask_BT marks positions whose next
    token is part of the completion)."""
    with autocast(dc):
        h_s = student.hidden_states(ids_BT)
        with torch.no_grad():
            h_t = teacher.hidden_states(ids_BT)
        m = mask_BT.bool()
        total = losses.chunked_kd_loss(h_s[m], student.lm_head.weight, h_t[m], teacher.lm_head.weight,
                                       torch.ones(int(m.sum()), device=ids_BT.device), divergence=divergence_fn(cfg),
                                       temperature=cfg.kd_temperature)
    return total


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


# ---------------------------------------------------------------------------------------------
def _latest_run_ids(project: str, command: str) -> list[str]:
    from sputnik.accounting import ledger

    ok = [r["run_id"] for r in ledger.load(project) if r.get("command") == command and r.get("status") == "ok"]
    return ok[-1:]


def _sft_student(cfg: DistillConfig, traces_path: Path, student_tok_dir: str) -> dict:
    """Sequence-level distillation = SFT of the student on the verified teacher traces."""
    from sputnik.config import build
    from sputnik.stages import sft

    return sft.run(build(sft.Config, dict(
        out_dir=str(Path(cfg.out_dir) / "student_sft"), tokenizer=student_tok_dir, model=cfg.student,
        init={"hf_dir": cfg.student_init}, data=[str(traces_path)], tasks=[], eval_fraction=0.05,
        max_len=cfg.max_len, batch_size=cfg.batch_size, max_steps=cfg.steps, eval_every=0, seed=cfg.seed,
        ledger_command="distill-sft", checkpoint_every=max(1, cfg.steps // 2),
        device=cfg.device, num_threads=cfg.num_threads, optim=cfg.optim.__dict__, progress=False,
        project_dir=cfg.ledger_dir, resume="auto")))


def _logit_kd(cfg: DistillConfig, teacher, student, tokenizer, traces: list[dict], dc, led) -> dict:
    """Token-level KD: each step is a batch of teacher traces (off-policy) or, with probability
    on_policy_fraction, the student's own samples for those prompts (GKD)."""
    from sputnik.train import session as tc

    rng = random.Random(cfg.seed)
    optimizer = build_optimizer(student, cfg.optim)
    student.train()
    metrics_path = Path(cfg.out_dir) / "metrics.jsonl"
    eng = Engine(student, tokenizer)
    for step in range(cfg.steps):
        rows = [traces[rng.randrange(len(traces))] for _ in range(cfg.batch_size)]
        on_policy = rng.random() < cfg.on_policy_fraction
        if on_policy:  # no gradient through sampling (GKD)
            outs = eng.generate([tokenizer.render_prompt(r["prompt"]) for r in rows],
                                SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                               stop_token_ids=(tokenizer.eot_id,), seed=cfg.seed + step))
            pairs = [(r["prompt"], o[0].text) for r, o in zip(rows, outs)]
            student.train()
        else:
            pairs = [(r["prompt"], r["completion"]) for r in rows]
        ids_BT, mask_BT = batch_from_pairs(tokenizer, pairs, cfg.max_len, dc.device)
        set_lr(optimizer, lr_multiplier(step, cfg.steps, cfg.optim))
        with count_load_where(student, ids_BT != tokenizer.pad_id):  # padding is not expert load
            loss = kd_step_loss(student, teacher, ids_BT, mask_BT, cfg, dc)
        loss.backward()
        loss = float(loss.detach())
        grad_norm = clip_grad_norm(student, cfg.optim.grad_clip)
        if guarded_step(optimizer, loss, grad_norm):
            student.update_expert_bias()
        tokens = int(ids_BT.numel())
        # student fwd+bwd, teacher fwd (1/3 of a training token)
        led.add(flops=tokens * (tc.flops_per_token(student, ids_BT.shape[1]) + tc.flops_per_token(teacher, ids_BT.shape[1]) / 3),
                tokens=tokens)
        if step % 10 == 0 or step + 1 == cfg.steps:
            append_jsonl(metrics_path, dict(step=step + 1, loss=loss, on_policy=on_policy, grad_norm=grad_norm))
    return {}


def run(cfg: DistillConfig, *, parents: list[str] = (), final_model: bool = False) -> dict:
    """`parents`: ledger run_ids that produced the teacher; with final_model the evaluation run
    names them (and this stage's own runs) as the student's lineage."""
    from sputnik.accounting import ledger
    from sputnik.train import session as tc
    from sputnik.model.accounting import param_counts
    from sputnik.tasks import get_task

    # --- setup: everything validated before any work
    if not cfg.teacher:
        raise ValueError("teacher: give the teacher model directory")
    set_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    dc = pick_device(cfg.device)
    t_init = tc.InitConfig(hf_dir=cfg.teacher)
    t_tok = tc.load_tokenizer("", t_init)
    teacher = tc.load_model(ModelConfig(), t_init).to(dc.device).eval().requires_grad_(False)
    s_init = tc.InitConfig(hf_dir=cfg.student_init)
    s_tok = tc.load_tokenizer("", s_init) if cfg.student_init else t_tok
    student = tc.load_model(cfg.student, s_init).to(dc.device)
    from sputnik.data import check_vocab

    check_vocab(s_tok, tc.model_vocab_size(student))
    if cfg.mode == "logit":
        check_shared_vocab(t_tok, s_tok, teacher, student)
    tasks = [get_task(n) for n in cfg.tasks]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    t0 = time.time()

    # Ledger records never overlap in time (device-hours would be counted twice), so the student's
    # SFT in sequence mode is its own run ("distill-sft") between the trace and evaluation runs.
    traces_path = Path(cfg.traces) if cfg.traces else out / "traces.jsonl"
    lineage = list(parents)
    with ledger.record_run(cfg.ledger_dir, "distill", cfg) as led:
        lineage.append(led.run_id)
        # --- teacher traces, rejection-sampled (or reused)
        # A killed run reuses its traces only if they were sampled with the same settings.
        settings = dict(teacher=str(Path(cfg.teacher).resolve()), tasks=list(cfg.tasks), num_prompts=cfg.num_prompts,
                        k=cfg.samples_per_prompt, temperature=cfg.teacher_temperature,
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        # The meta file also names the run that sampled them: a rerun that reuses the traces
        # records no FLOPs itself, and puts that run in the student's lineage instead.
        meta_path = out / "traces.settings.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        same = meta.get("settings", meta) == settings
        if cfg.traces or (traces_path.is_file() and same):
            traces = [json.loads(line) for line in traces_path.read_text().splitlines() if line.strip()]
            if not cfg.traces and meta.get("run_id") and meta["run_id"] not in lineage:
                lineage.insert(len(lineage) - 1, meta["run_id"])
        else:
            traces = sample_traces(teacher, t_tok, tasks, cfg, teacher_id=str(Path(cfg.teacher).resolve()))
            write_traces(traces_path, traces)
            atomic_write_text(meta_path, json.dumps({"settings": settings, "run_id": led.run_id}))
            led.add(flops=cfg.num_prompts * cfg.samples_per_prompt * cfg.max_new_tokens
                    * tc.flops_per_token(teacher, cfg.max_len) / 3)
        if not traces:
            raise ValueError("the teacher produced no verified trace: nothing to distil (check the teacher's accuracy)")
        print0(f"distill: {len(traces)} verified traces from {cfg.num_prompts} prompts x {cfg.samples_per_prompt} samples")
        led.metrics.update(num_traces=len(traces))
        led.artifacts.append(str(traces_path))
        # --- logit-level KD trains inside this run
        if cfg.mode == "logit":
            _logit_kd(cfg, teacher, student, s_tok, traces, dc, led)
            tc.save_model(student, out / "model", s_tok, cfg)
    # --- sequence-level: SFT of the student on the verified traces (its own ledger run)
    if cfg.mode == "sequence":
        tok_dir = out / "student_tokenizer"
        s_tok.save(tok_dir)
        res = _sft_student(cfg, traces_path, str(tok_dir))
        lineage += _latest_run_ids(cfg.ledger_dir, "distill-sft")
        student = tc.load_model(ModelConfig(), tc.InitConfig(hf_dir=res["model_dir"])).to(dc.device)
    # --- report: student vs teacher on held-out problems
    with ledger.record_run(cfg.ledger_dir, "distill-eval", cfg, parents=lineage,
                           final_model=final_model) as led:
        s_acc, s_tps = greedy_accuracy(Engine(student, s_tok), s_tok, tasks, cfg.eval_examples, cfg.seed, cfg.max_new_tokens)
        t_acc, t_tps = greedy_accuracy(Engine(teacher, t_tok), t_tok, tasks, cfg.eval_examples, cfg.seed, cfg.max_new_tokens)
        s_cfg, t_cfg = tc.unwrap_config(student), tc.unwrap_config(teacher)
        sp = param_counts(s_cfg) if isinstance(s_cfg, ModelConfig) else {}
        tp = param_counts(t_cfg) if isinstance(t_cfg, ModelConfig) else {}
        summary = dict(student_accuracy=s_acc, teacher_accuracy=t_acc, accuracy_ratio=s_acc / t_acc if t_acc else None,
                       student_params_total=sp.get("total"), student_params_active=sp.get("active"),
                       teacher_params_total=tp.get("total"), teacher_params_active=tp.get("active"),
                       student_tokens_per_s=s_tps, teacher_tokens_per_s=t_tps, num_traces=len(traces),
                       student_dir=str(out / "model") if cfg.mode == "logit" else res["model_dir"],
                       wall_s=time.time() - t0)
        led.metrics.update(heldout_accuracy=s_acc, params_total=sp.get("total"), params_active=sp.get("active"), **summary)
    return summary


def register(sub) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a smaller student (rejection-sampled traces or logit KD)",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, DistillConfig)
    p.set_defaults(func=lambda args: print(json.dumps(run(config_from_args(args, DistillConfig)), indent=2, default=str)) or 0)
