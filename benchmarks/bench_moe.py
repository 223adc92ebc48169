"""Micro-benchmark: one MoE layer forward+backward, Sputnik (grouped / fallback / loop) vs transformers'
DeepseekV3MoE (grouped_mm / eager) on the same weights and input.

    .venv/bin/python benchmarks/bench_moe.py [--threads 2] [--reps 20] [--profile] [--device cpu|cuda]

Default shape is the tiny preset's MoE layer (D 256, I 128, 16 experts top-2, 1 shared) on 8x256 tokens.
Prints min and median wall ms over interleaved repetitions (interleaving spreads machine noise evenly),
and the median process CPU ms, which shared, busy cores disturb less (with --threads 1 it is the cost).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from sputnik.model.config import tiny
from sputnik.model.moe import MoE, grouped_mm_supported

MOE_FIELDS = ("hidden_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
              "n_shared_experts", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob")


def build(device: str, dtype: torch.dtype):
    cfg = tiny()
    hf_cfg = DeepseekV3Config(**{k: getattr(cfg, k) for k in MOE_FIELDS})
    hf = DeepseekV3MoE(hf_cfg)
    ours = MoE(cfg)
    hf.load_state_dict(ours.state_dict())  # same names, same layout: no mapping
    variants = {}
    for name, impl, use_gmm in [("sputnik grouped (auto)", "grouped", None),
                                ("sputnik grouped (no grouped_mm)", "grouped", False),
                                ("sputnik loop", "loop", None)]:
        m = MoE(cfg).to(device=device, dtype=dtype)
        m.load_state_dict(ours.state_dict())
        m.experts.impl, m.experts.use_grouped_mm = impl, use_gmm
        variants[name] = m
    for name, impl in [("hf DeepseekV3MoE grouped_mm", "grouped_mm"), ("hf DeepseekV3MoE eager", "eager")]:
        m = DeepseekV3MoE(hf_cfg).to(device=device, dtype=dtype)
        m.load_state_dict(hf.state_dict())
        m.config._experts_implementation = impl  # each copy shares hf_cfg: set right before use below
        variants[name] = (m, impl)
    return variants


def step(entry, x_BTD):
    model, impl = entry if isinstance(entry, tuple) else (entry, None)
    if impl is not None:
        model.config._experts_implementation = impl
    model.zero_grad(set_to_none=True)
    y_BTD = model(x_BTD)
    if isinstance(y_BTD, tuple):  # ours: (y, Routing)
        y_BTD, routing = y_BTD
        loss = y_BTD.float().square().mean() + (routing.aux_loss if routing.aux_loss is not None else 0.0)
    else:
        loss = y_BTD.float().square().mean()
    loss.backward()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, threads {args.threads}, {args.device} {args.dtype}, "
          f"grouped_mm supported: {grouped_mm_supported(torch.device(args.device).type, dtype)}")
    variants = build(args.device, dtype)
    x_BTD = torch.randn(args.batch, args.seq, 256, device=args.device, dtype=dtype, requires_grad=True)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {name: [] for name in variants}
    cpu_times = {name: [] for name in variants}
    for name, entry in variants.items():  # warm-up
        for _ in range(3):
            step(entry, x_BTD)
    for _ in range(args.reps):
        for name, entry in variants.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            step(entry, x_BTD)
            sync()
            times[name].append(1e3 * (time.perf_counter() - t0))
            cpu_times[name].append(1e3 * (time.process_time() - c0))
    base = statistics.median(cpu_times["hf DeepseekV3MoE grouped_mm"])
    for name, ts in times.items():
        cpu = statistics.median(cpu_times[name])
        print(f"{name:32s} fwd+bwd wall min {min(ts):7.2f} median {statistics.median(ts):7.2f} ms | "
              f"cpu median {cpu:7.2f} ms (hf grouped_mm / this = {base / cpu:.2f}x)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for name in ("sputnik grouped (auto)", "hf DeepseekV3MoE grouped_mm"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    step(variants[name], x_BTD)
            print(f"--- {name} (5 steps)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
