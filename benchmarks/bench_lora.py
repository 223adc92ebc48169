"""LoRA vs full fine-tuning: step time and peak memory of the same SFT training step on a user's layout.

    .venv/bin/python benchmarks/bench_lora.py [--shape qwen2.5-0.5b] [--layers 8] [--rank 16]
        [--batch 4] [--seq 128] [--steps 3] [--threads 2] [--out bench_lora.json]
        [--device cuda]   (bf16 autocast as the training stages use on a GPU; adds the side `lora_bf16`)

Model: a random-init transformers model of the published layout (bench_families.SHAPES) at full
width, depth cut to --layers (0 = the published depth), loaded as `--init DIR` loads it (our own
model). The step is the training stages' own: forward with the chunked-CE loss, backward, gradient
clipping, AdamW (fused) over the trainable parameters (train/optim.build_optimizer), on random token
batches. LoRA: rank --rank, alpha 2·rank, every attention and MLP projection (the default targets),
base frozen in fp32 (side `lora`) or kept in bf16 (side `lora_bf16`, `--lora.base_dtype bfloat16`:
a GPU's option; on a CPU bf16 matmuls are slow, so that side runs only on CUDA unless --sides asks).
Each side runs in its own subprocess, so its peak memory is its own: on a CPU the peak RSS
(ru_maxrss) and the "training memory" = the peak minus the RSS right after the model is loaded
(weights, the framework); on CUDA the same two from the allocator (max_memory_allocated, and the
peak minus what was allocated after loading). Sides alternate per repeat (--repeats processes each);
medians.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> dict:
    from sputnik.config import LoRAConfig
    from sputnik.train.loading import load_model
    from sputnik.train.lora import apply_lora
    from sputnik.train.optim import OptimConfig, build_optimizer, clip_grad_norm

    from sputnik.common import autocast, pick_device

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    choice = pick_device(args.device)
    device = choice.device
    model = load_model(args.dir)
    if args.side in ("lora", "lora_bf16"):
        apply_lora(model, LoRAConfig(rank=args.rank, alpha=2.0 * args.rank,
                                     base_dtype="bfloat16" if args.side == "lora_bf16" else "float32"))
    model.to(device).train()
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loaded = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, warmup_steps=0))
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    times = []
    for step in range(args.steps + 1):  # the first step allocates the optimizer state: untimed
        ids = torch.randint(0, V, (args.batch, args.seq), generator=g).to(device)
        sync()
        t0 = time.perf_counter()
        with autocast(choice):
            loss = model(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(step_s=statistics.median(times), steps_s=times, peak_mb=peak, after_load_mb=loaded,
                memory="cuda allocator" if cuda else "process RSS",
                training_mb=peak - loaded, trainable_params=trainable,
                params=sum(p.numel() for p in model.parameters()), loss=float(loss))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen2.5-0.5b", help="a layout of bench_families.SHAPES")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers kept (0 = the published depth)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (after one untimed)")
    ap.add_argument("--repeats", type=int, default=2, help="processes per side, alternating")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the step runs (cuda: bf16 autocast)")
    ap.add_argument("--sides", default="", help="comma list of full, lora, lora_bf16 (default full,lora; "
                                                "full,lora,lora_bf16 on CUDA)")
    ap.add_argument("--out", default="bench_lora.json", help="write the results as JSON here")
    ap.add_argument("--side", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        print(json.dumps(worker(args)))
        return 0
    from bench_families import build_checkpoint

    from sputnik.common import atomic_write_text

    sides = [x for x in (args.sides or ("full,lora,lora_bf16" if args.device == "cuda" else "full,lora")).split(",") if x]
    if not sides or set(sides) - {"full", "lora", "lora_bf16"} or "full" not in sides:
        raise SystemExit(f"--sides={args.sides!r}: a comma list of full, lora, lora_bf16 that includes full")
    args.dir = build_checkpoint(args.shape, args.layers)
    runs = {side: [] for side in sides}
    for r in range(args.repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            cmd = [sys.executable, __file__, "--side", side, "--dir", args.dir] + \
                  [f"--{k}={getattr(args, k)}" for k in ("rank", "batch", "seq", "steps", "threads", "device")]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            rec = runs[side][-1]
            print(f"{side:9s} step {rec['step_s']:.3f}s peak {rec['memory']} {rec['peak_mb']:.0f} MB "
                  f"(training {rec['training_mb']:.0f} MB) trainable {rec['trainable_params'] / 1e6:.2f}M", flush=True)
    summary = {side: {k: statistics.median(x[k] for x in rs) for k in ("step_s", "peak_mb", "training_mb")}
               | {"trainable_params": rs[0]["trainable_params"], "params": rs[0]["params"]} for side, rs in runs.items()}
    for side in sides[1:]:
        summary[f"{side}_over_full"] = {k: summary[side][k] / summary["full"][k] for k in ("step_s", "peak_mb", "training_mb")}
        print(side, json.dumps(summary[f"{side}_over_full"]))
    atomic_write_text(args.out, json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
