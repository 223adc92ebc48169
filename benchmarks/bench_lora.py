"""LoRA vs full fine-tuning: step time and peak memory of the same SFT training step on a user's layout.

    .venv/bin/python benchmarks/bench_lora.py [--shape qwen2.5-0.5b] [--layers 8] [--rank 16]
        [--batch 4] [--seq 128] [--steps 3] [--threads 2] [--out bench_lora.json]

Model: a random-init transformers model of the published layout (bench_families.SHAPES) at full
width, depth cut to --layers (0 = the published depth), loaded as `--init DIR` loads it (our own
model). The step is the training stages' own: forward with the chunked-CE loss, backward, gradient
clipping, AdamW (fused) over the trainable parameters (train/optim.build_optimizer), on random token
batches. LoRA: rank --rank, alpha 2·rank, every attention and MLP projection (the default targets),
base frozen in fp32. Each side runs in its own subprocess, so peak RSS (ru_maxrss) is its own; the
"training memory" is the peak minus the RSS right after the model is loaded (weights, the
framework). Sides alternate per repeat (--repeats processes each); medians.
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

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.dir)
    if args.side == "lora":
        apply_lora(model, LoRAConfig(rank=args.rank, alpha=2.0 * args.rank))
    model.train()
    loaded = rss_mb()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, warmup_steps=0))
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    times = []
    for step in range(args.steps + 1):  # the first step allocates the optimizer state: untimed
        ids = torch.randint(0, V, (args.batch, args.seq), generator=g)
        t0 = time.perf_counter()
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(step_s=statistics.median(times), steps_s=times, peak_rss_mb=peak, rss_after_load_mb=loaded,
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
    ap.add_argument("--out", default="bench_lora.json", help="write the results as JSON here")
    ap.add_argument("--side", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        print(json.dumps(worker(args)))
        return 0
    from bench_families import build_checkpoint

    from sputnik.common import atomic_write_text

    args.dir = build_checkpoint(args.shape, args.layers)
    runs = {"full": [], "lora": []}
    for r in range(args.repeats):
        for side in (("full", "lora") if r % 2 == 0 else ("lora", "full")):
            cmd = [sys.executable, __file__, "--side", side, "--dir", args.dir] + \
                  [f"--{k}={getattr(args, k)}" for k in ("rank", "batch", "seq", "steps", "threads")]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            rec = runs[side][-1]
            print(f"{side:4s} step {rec['step_s']:.2f}s peak RSS {rec['peak_rss_mb']:.0f} MB "
                  f"(training {rec['training_mb']:.0f} MB) trainable {rec['trainable_params'] / 1e6:.2f}M", flush=True)
    summary = {side: {k: statistics.median(x[k] for x in rs) for k in ("step_s", "peak_rss_mb", "training_mb")}
               | {"trainable_params": rs[0]["trainable_params"], "params": rs[0]["params"]} for side, rs in runs.items()}
    summary["lora_over_full"] = {k: summary["lora"][k] / summary["full"][k] for k in ("step_s", "peak_rss_mb", "training_mb")}
    print(json.dumps(summary["lora_over_full"]))
    atomic_write_text(args.out, json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
