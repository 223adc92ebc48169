"""GRPO step benchmark: Sputnik's GRPO step vs TRL's `GRPOTrainer` on the same weights, prompts and reward.

    .venv/bin/python benchmarks/bench_grpo_step.py [--warm 3] [--steps 5] [--threads 2] [--out grpo.json]
        [--compile]   (ours as `sputnik rl --compile`; TRL stays as by default, no torch_compile)

Setting (peer-figures.md, GRPO row): 8 prompts x G=8 completions a step, beta 0, DAPO loss (token
mean, clip 0.2/0.28), AdamW lr 1e-4 constant, temperature 1, no top-k/top-p, no vLLM. Both sides
generate exactly `--tokens` completion tokens (TRL: generation_kwargs min_new_tokens; ours: no stop
token), so the work is the same. Task: "What is A+B? Answer:" with two-digit A, B (all prompts the
same length); reward 1 if the sum appears in the completion plus 0.1 x the fraction of digit characters.
One optimizer step per GRPO step on both sides. The update's rows per forward/backward differ by
default: ours 16 (`--micro-batch`, gradients accumulated; the token mean divides by the whole
batch's count, so the gradient is the one of the unsplit batch), TRL all 64 (`--trl-micro-batch`
sets its per_device_train_batch_size, with gradient accumulation to 64 rows).

Model: the `tiny` preset on CPU (fp32, 64 tokens), `small` on CUDA (bf16 autocast over fp32 master
weights, 256 tokens), random init, no MTP (TRL's DeepseekV3ForCausalLM has none), vocab from a
byte-level BPE tokenizer trained in-process (padded with unused added tokens up to the preset's
vocab). Ours is exported with `save_hf`; the TRL side loads the identical weights with
`DeepseekV3ForCausalLM.from_pretrained` and the tokenizer with `PreTrainedTokenizerFast`.

Each side runs in its own worker subprocess (so peak RSS / peak CUDA memory are separable); the
parent drives them step by step, alternating which goes first, so machine noise hits both alike.
TRL's trainer loop is paced by a callback that blocks in on_step_begin until the parent says go.
Split: ours times engine.generate, the reward and `update` (the rest: advantages, batch building);
TRL's `_generate_single_turn` (its `model.generate`), `_calculate_rewards`, and `update` = the step
minus `_generate_and_score_completions` (i.e. loss forward/backward, clip, AdamW).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grpo_setup import addition_reward, make_prompts, setup, setup_shape  # noqa: E402  (the task, the checkpoint)

PREFIX = "@@BENCH "
GROUP = 8
PROMPTS_PER_STEP = 8
LR = 1e-4
OURS_MICRO_BATCH = 16  # rows per forward/backward in our update (runs/logs/grpo_speed_notes.md: the fastest, and 1/3 of the RSS of 64)


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Ours
@dataclass
class OursState:
    model: object
    tokenizer: object
    engine: object
    optimizer: object
    cfg: object
    dc: object
    params: object
    step: int = 0


def make_ours(model, tokenizer, device: str = "cpu", tokens: int = 64, amp: bool = False,
              micro_batch: int = OURS_MICRO_BATCH, compile: bool = False, share_prompts: str = "auto") -> OursState:
    """Our GRPO on `model` (a sputnik Transformer) the way `sputnik rl` sets it up, with the
    benchmark's settings: DAPO, beta 0, μ = 1, `micro_batch` rows per forward/backward (one optimizer
    step either way: the token mean divides by the whole batch's token count), no dynamic sampling
    (TRL trains on every group too), no stop token (exactly `tokens` tokens per completion).
    compile: as `sputnik rl --compile` (blocks compiled for the update, compiled decode step)."""
    from sputnik.common import DeviceChoice
    from sputnik.inference.engine import Engine
    from sputnik.inference.sampling import SamplingParams
    from sputnik.stages.rl import Config as RLConfig
    from sputnik.train.optim import OptimConfig, build_optimizer

    dev = torch.device(device)
    dc = DeviceChoice(dev, torch.bfloat16 if amp else torch.float32, "benchmark")
    cfg = RLConfig(init="<bench>", variant="dapo", beta=0.0, prompts_per_step=PROMPTS_PER_STEP, group_size=GROUP,
                   max_new_tokens=tokens, temperature=1.0, micro_batch=micro_batch, share_prompts=share_prompts,
                   dynamic_sampling=False, optim=OptimConfig(lr=LR, warmup_steps=0, schedule="constant",
                                                             weight_decay=0.0))
    model = model.to(dev)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    params = SamplingParams(max_new_tokens=tokens, temperature=1.0, stop_token_ids=())
    if compile:
        from sputnik.train.session import _compile

        _compile(model, blocks=True)
    return OursState(model, tokenizer, Engine(model, tokenizer, compile=compile), optimizer, cfg, dc, params)


def ours_step(st: OursState, batch: list[dict]) -> dict:
    """One GRPO step on `batch` (PROMPTS_PER_STEP records {prompt, answer}). Returns seconds by phase."""
    from sputnik.rl import objectives
    from sputnik.common import autocast
    from sputnik.rl.rollout import build_rollout_batch
    from sputnik.rl.update import VARIANTS, update

    cfg, dev = st.cfg, st.dc.device
    sync(dev)
    t0 = time.perf_counter()
    prompts = [st.tokenizer.encode(r["prompt"]) for r in batch]
    st.params.seed = 7919 * st.step
    with autocast(st.dc):
        groups = st.engine.generate(prompts, st.params, num_samples=cfg.group_size)
    sync(dev)
    t1 = time.perf_counter()
    flat = [c for g in groups for c in g]
    rewards = [addition_reward(c.text, r["answer"]) for r, g in zip(batch, groups) for c in g]
    t2 = time.perf_counter()
    r_PG = torch.tensor(rewards).view(len(batch), cfg.group_size)
    adv_B = objectives.group_advantages(r_PG, cfg.group_size, scale_by_std=VARIANTS[cfg.variant]["scale_by_std"])
    rb = build_rollout_batch([prompts[i // cfg.group_size] for i in range(len(flat))], [c.token_ids for c in flat],
                             [c.logprobs for c in flat], st.tokenizer.pad_id).to(dev)
    sync(dev)
    t3 = time.perf_counter()
    m = update(st.model, None, st.optimizer, rb, adv_B.reshape(-1).to(dev), cfg, st.dc)
    sync(dev)
    t4 = time.perf_counter()
    st.step += 1
    return dict(step=t4 - t0, rollout=t1 - t0, reward=t2 - t1, update=t4 - t3, other=t3 - t2,
                completion_tokens=sum(len(c.token_ids) for c in flat), reward_mean=sum(rewards) / len(rewards),
                loss=m.get("loss", float("nan")))


# ---------------------------------------------------------------------------------------------
# Workers: one process per side, paced by the parent over stdin ("go" / "quit")
def emit(rec: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(rec) + "\n")
    sys.stdout.flush()


def wait_for_go() -> bool:
    line = sys.stdin.readline().strip()
    return line == "go"


def memory_record(device: str) -> dict:
    out = dict(peak_rss_mb=peak_rss_mb())
    if torch.device(device).type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def worker_ours(args) -> None:
    from sputnik.tokenizer import Tokenizer
    from sputnik.train.loading import load_model

    torch.manual_seed(args.seed)
    d = Path(args.dir) / "model"
    model, tok = load_model(str(d)), Tokenizer.load(d)  # as `--init DIR`: our own model for either layout
    st = make_ours(model, tok, args.device, args.tokens, amp=args.amp, micro_batch=args.micro_batch,
                   compile=args.compile, share_prompts=args.share_prompts)
    prompts = json.loads((Path(args.dir) / "prompts.json").read_text())
    emit(dict(event="ready", **memory_record(args.device)))
    i = 0
    while wait_for_go():
        batch = prompts[i * PROMPTS_PER_STEP:(i + 1) * PROMPTS_PER_STEP]
        emit(dict(event="step", **ours_step(st, batch)))
        i += 1
    emit(dict(event="done", **memory_record(args.device)))


def worker_trl(args) -> None:
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(args.seed)
    d = Path(args.dir) / "model"
    tok = PreTrainedTokenizerFast.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    prompts = json.loads((Path(args.dir) / "prompts.json").read_text())
    ds = datasets.Dataset.from_list(prompts)
    cuda = torch.device(args.device).type == "cuda"

    def reward_func(prompts, completions, answer, **kw):
        return [addition_reward(c, a) for c, a in zip(completions, answer)]

    t = dict(gen=0.0, reward=0.0, prep=0.0, tokens=0)

    class Pace(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if not wait_for_go():
                control.should_training_stop = True  # only reached if the parent quits early
            for k in t:
                t[k] = 0
            sync(args.device)
            t["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync(args.device)
            step = time.perf_counter() - t["t0"]
            emit(dict(event="step", step=step, rollout=t["gen"], reward=t["reward"], update=step - t["prep"],
                      other=t["prep"] - t["gen"] - t["reward"], completion_tokens=t["tokens"]))

    gargs = GRPOConfig(
        output_dir=str(Path(args.dir) / "trl_out"), max_steps=args.warm + args.steps,
        per_device_train_batch_size=args.trl_micro_batch, num_generations=GROUP,
        gradient_accumulation_steps=PROMPTS_PER_STEP * GROUP // args.trl_micro_batch,  # one optimizer step
        max_completion_length=args.tokens, generation_kwargs={"min_new_tokens": args.tokens},
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
        num_iterations=1, scale_rewards="group", mask_truncated_completions=False,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL's default is True; ours does not recompute activations
        bf16=cuda, use_cpu=not cuda, shuffle_dataset=False, seed=args.seed, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        torch_compile=args.trl_compile,  # transformers' Trainer compiles the model for the loss forward/backward
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward_func, args=gargs, train_dataset=ds,
                          processing_class=tok, callbacks=[Pace()])

    def timed(name, fn, count_tokens=False):
        def wrapper(*a, **kw):
            sync(args.device)
            s = time.perf_counter()
            out = fn(*a, **kw)
            sync(args.device)
            t[name] += time.perf_counter() - s
            if count_tokens:
                t["tokens"] += sum(len(c) for c in out[0])
            return out
        return wrapper

    trainer._generate_single_turn = timed("gen", trainer._generate_single_turn, count_tokens=True)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("prep", trainer._generate_and_score_completions)
    emit(dict(event="ready", versions=dict(trl=trl.__version__, transformers=transformers.__version__),
              experts_impl=getattr(model.config, "_experts_implementation", None),
              attn_impl=getattr(model.config, "_attn_implementation", None), **memory_record(args.device)))
    trainer.train()
    sys.stdin.readline()  # the parent's final "quit"
    emit(dict(event="done", **memory_record(args.device)))


# ---------------------------------------------------------------------------------------------
# Parent
class Worker:
    def __init__(self, side: str, args, env):
        cmd = ([sys.executable, __file__, "--worker", side, "--dir", args.dir, "--device", args.device,
               "--tokens", str(args.tokens), "--threads", str(args.threads), "--warm", str(args.warm),
               "--steps", str(args.steps), "--seed", str(args.seed), "--micro-batch", str(args.micro_batch),
               "--trl-micro-batch", str(args.trl_micro_batch), "--keep-freed-memory", args.keep_freed_memory]
               + (["--amp"] if args.amp else []) + (["--compile"] if args.compile else [])
               + (["--trl-compile"] if args.trl_compile else [])
               + ["--share-prompts", args.share_prompts])
        self.side = side
        self.log = open(Path(args.dir) / f"{side}.log", "w")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                  env=env, bufsize=1)

    def read(self) -> dict:
        for line in self.p.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
            self.log.write(line)
        rc = self.p.wait()
        self.log.flush()
        tail = Path(self.log.name).read_text()[-3000:]
        raise RuntimeError(f"{self.side} worker exited (rc {rc}); its log ends:\n{tail}")

    def send(self, msg: str) -> dict:
        self.p.stdin.write(msg + "\n")
        self.p.stdin.flush()
        return self.read()


def summarize(steps: list[dict]) -> dict:
    out = {}
    for k in ("step", "rollout", "reward", "update", "other"):
        v = [s[k] for s in steps]
        out[k] = dict(median=statistics.median(v), min=min(v), max=max(v))
    out["completion_tokens"] = steps[0]["completion_tokens"] if steps else 0
    out["rollout_tok_per_s"] = statistics.median(s["completion_tokens"] / s["rollout"] for s in steps)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warm", type=int, default=3, help="untimed steps per side")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads in each worker")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--config", default="", help="model preset (default tiny on CPU, small on CUDA)")
    ap.add_argument("--shape", default="", help="instead of a preset, a user's layout from bench_families.py "
                                                "(smollm2-135m, qwen2.5-0.5b, qwen3-0.6b), random init")
    ap.add_argument("--layers", type=int, default=8, help="with --shape: decoder layers kept (0 = published depth)")
    ap.add_argument("--tokens", type=int, default=0, help="completion tokens (default 64 on CPU, 256 on CUDA)")
    ap.add_argument("--sides", default="ours,trl", help="comma list of sides to run")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (default on CUDA; on CPU only to test the path)")
    ap.add_argument("--compile", action="store_true",
                    help="ours as `sputnik rl --compile` (compiled blocks and decode step; compiling happens in the "
                         "warm-up steps, not timed)")
    ap.add_argument("--trl-compile", action="store_true",
                    help="TRL with GRPOConfig(torch_compile=True) (the Trainer compiles its model; generation stays eager)")
    ap.add_argument("--micro-batch", type=int, default=OURS_MICRO_BATCH,
                    help="ours: sequences per forward/backward in the update (one optimizer step per GRPO step)")
    ap.add_argument("--trl-micro-batch", type=int, default=PROMPTS_PER_STEP * GROUP,
                    help="TRL: per_device_train_batch_size, with gradient accumulation up to 64 rows (one "
                         "optimizer step, one generation of all 64); default all 64 in one batch")
    ap.add_argument("--keep-freed-memory", default="ours", choices=["ours", "both", "none"],
                    help="which workers get sputnik.common.keep_freed_memory() (glibc keeps freed memory instead "
                         "of page-faulting it back in); the `sputnik` CLI always sets it, TRL does not")
    ap.add_argument("--share-prompts", default="auto", choices=["auto", "always", "never"],
                    help="ours: `sputnik rl --share_prompts` (auto: each prompt computed once in the update "
                         "when that saves >= 1/3 of its tokens; not at this benchmark's 10 + 64 tokens)")
    ap.add_argument("--prompt-template", default="plain", choices=["plain", "r1_zero"],
                    help="r1_zero: every prompt wrapped in R1-Zero's template (the same text on both sides; "
                         "~10x longer prompts, where `--share-prompts auto` computes each prompt once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if (PROMPTS_PER_STEP * GROUP) % args.trl_micro_batch:
        ap.error(f"--trl-micro-batch {args.trl_micro_batch} must divide {PROMPTS_PER_STEP * GROUP}")
    torch.set_num_threads(args.threads)

    if args.worker:
        if args.keep_freed_memory == "both" or (args.keep_freed_memory == "ours" and args.worker == "ours"):
            from sputnik.common import keep_freed_memory

            keep_freed_memory()
        (worker_ours if args.worker == "ours" else worker_trl)(args)
        return 0

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    args.config = args.config or ("small" if cuda else "tiny")
    args.tokens = args.tokens or (256 if cuda else 64)
    args.amp = args.amp or cuda
    sides = [s for s in args.sides.split(",") if s]
    tmp = tempfile.TemporaryDirectory(prefix="bench_grpo_")
    args.dir = tmp.name
    t0 = time.perf_counter()
    info = (setup_shape(Path(args.dir), args.shape, args.layers, args.seed) if args.shape
            else setup(Path(args.dir), args.config, args.seed))
    if args.shape:
        args.config = f"{args.shape} ({info['layers']} layers)"
    n_steps = args.warm + args.steps
    prompts = make_prompts(n_steps * PROMPTS_PER_STEP, args.seed)
    if args.prompt_template == "r1_zero":
        from sputnik.rl.prompts import R1_ZERO_TEMPLATE

        prompts = [dict(p, prompt=R1_ZERO_TEMPLATE.format(prompt=p["prompt"])) for p in prompts]
    (Path(args.dir) / "prompts.json").write_text(json.dumps(prompts))
    print(f"setup {time.perf_counter() - t0:.1f}s: {args.config} vocab {info['vocab_size']}, "
          f"{info['params_total'] / 1e6:.2f}M total / {info['params_active'] / 1e6:.2f}M active, {args.device} "
          f"{'bf16 autocast' if args.amp else 'fp32'}, {args.tokens} completion tokens, threads {args.threads}",
          flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_DISABLED="true")
    workers = {s: Worker(s, args, env) for s in sides}
    ready = {s: w.read() for s, w in workers.items()}
    steps = {s: [] for s in sides}
    for i in range(n_steps):
        order = sides if i % 2 == 0 else sides[::-1]  # alternate who goes first
        for s in order:
            rec = workers[s].send("go")
            if i >= args.warm:
                steps[s].append(rec)
            print(f"step {i + 1}/{n_steps} {s:4s} {rec['step']:.2f}s (rollout {rec['rollout']:.2f} reward "
                  f"{rec['reward']:.3f} update {rec['update']:.2f})" + ("" if i >= args.warm else " [warm]"),
                  flush=True)
    done = {s: w.send("quit") for s, w in workers.items()}
    for w in workers.values():
        w.p.wait(timeout=120)

    result = dict(config=args.config, device=args.device, amp=args.amp, compile=args.compile,
                  trl_compile=args.trl_compile, tokens=args.tokens,
                  threads=args.threads,
                  keep_freed_memory=args.keep_freed_memory,
                  ours_micro_batch=args.micro_batch, trl_micro_batch=args.trl_micro_batch,
                  share_prompts=args.share_prompts, prompt_template=args.prompt_template,
                  warm=args.warm, steps=args.steps, prompts_per_step=PROMPTS_PER_STEP, group_size=GROUP,
                  torch=torch.__version__, model=info, sides={})
    for s in sides:
        result["sides"][s] = dict(summary=summarize(steps[s]), steps=steps[s], ready=ready[s],
                                  peak_rss_mb=done[s]["peak_rss_mb"], peak_cuda_gib=done[s].get("peak_cuda_gib"))
    print()
    hdr = f"{'side':5s} {'s/step':>22s} {'rollout':>7s} {'reward':>7s} {'update':>7s} {'other':>7s} {'tok/s':>7s} {'RSS MB':>7s}"
    print(hdr + ("  CUDA GiB" if cuda else ""))
    for s in sides:
        sm, r = result["sides"][s]["summary"], result["sides"][s]
        print(f"{s:5s} {sm['step']['median']:7.2f} [{sm['step']['min']:5.2f}-{sm['step']['max']:5.2f}]     "
              f"{sm['rollout']['median']:7.2f} {sm['reward']['median']:7.3f} {sm['update']['median']:7.2f} "
              f"{sm['other']['median']:7.3f} {sm['rollout_tok_per_s']:7.0f} {r['peak_rss_mb']:7.0f}"
              + (f"  {r['peak_cuda_gib']:.2f}" if cuda else ""))
    if {"ours", "trl"} <= set(sides):
        o, t = result["sides"]["ours"], result["sides"]["trl"]
        result["speedup"] = t["summary"]["step"]["median"] / o["summary"]["step"]["median"]
        result["rss_ratio"] = o["peak_rss_mb"] / t["peak_rss_mb"]
        if cuda:
            result["cuda_mem_ratio"] = o["peak_cuda_gib"] / t["peak_cuda_gib"]
        goal = "2x on a user's layout" if args.shape else "3x on our DeepSeek-V3"  # the issues' goals
        print(f"\nours vs TRL: {result['speedup']:.2f}x faster per step (goal >= {goal}), peak RSS "
              f"{result['rss_ratio']:.2f}x of TRL's (goal <= 0.6x)"
              + (f", peak CUDA memory {result['cuda_mem_ratio']:.2f}x" if cuda else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
