"""Our DeepSeek-V3's decode step three ways, interleaved in one process: the one-call C step
(kernels/deepseek_step.c), the eager torch step (deepseek.static_step over the written prefix, the
few-token MoE path and its C expert kernel) and the torch.compile'd static-shape step; plus a prefill.

    .venv/bin/python benchmarks/bench_decode_step.py [--threads 2] [--batches 1,8,32,64,256] [--no-compile]

Model: the tiny preset (or --config; random init), fp32, a 32-token prompt per row, then single-token steps at
position 32 (every round rewrites the same cache slots); each figure is the median over `--repeats`
interleaved rounds of the median step time of one round. The prefill (all rows' prompts, logits of
the last token) through the C call and through torch with the C kernels off. The C step's logits are
checked against the eager step's on the same inputs (last column).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sputnik.inference.decoders import cached_model, compiled_step
from sputnik.kernels.cpu import kernels_off
from sputnik.model import build_model
from sputnik.model.config import PRESETS


def timed(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default="tiny", help="model preset (tiny: MLA absorbed; small: W_UK/W_UV per token)")
    ap.add_argument("--batches", default="1,8,32,64,256")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled step (compiling takes ~5-20 s a batch)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(PRESETS[args.config]()).eval()
    cm = cached_model(model)
    P, S = args.prompt_len, args.prompt_len + args.steps * (args.repeats + 1) + 2
    print(f"threads={torch.get_num_threads()} {args.config} DeepSeek-V3 fp32, {P}-token prompts, cache of {S} positions")
    print(f"{'batch':>5} | {'C step ms':>9} | {'eager ms':>8} | {'compiled ms':>11} | {'eager/C':>7} | "
          f"{'compiled/C':>10} | {'prefill C ms':>12} | {'prefill torch ms':>16} | max |Δ logits|")
    for B in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(0, model.config.vocab_size, (B, P))
        zeros, last = torch.zeros(B, dtype=torch.long), torch.full((B,), P - 1)
        caches = {name: cm.new_cache(B, S) for name in ("c", "eager", "compiled")}
        w = cm.step_weights()
        assert w["c_step"] is not None, "the C step cannot run here (kernels off or unbuilt?)"
        plain = {k: v for k, v in w.items() if k != "c_step"}  # the torch paths' weights
        prefill = {"c": [], "eager": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            cm.forward_cached(ids, cm.new_cache(B, S), zeros, logits_at_B=last)
            prefill["c"].append(time.perf_counter() - t0)
            with kernels_off():
                t0 = time.perf_counter()
                cm.forward_cached(ids, cm.new_cache(B, S), zeros, logits_at_B=last)
                prefill["eager"].append(time.perf_counter() - t0)
        for name, cache in caches.items():
            cm.forward_cached(ids, cache, zeros, logits_at_B=last)
        tok = ids[:, -1]
        fn = None if args.no_compile else compiled_step("static")
        seq = {name: torch.full((B,), P) for name in caches}
        runs = {"c": lambda: cm.step(tok, caches["c"], seq["c"], w),
                "eager": lambda: cm.step(tok, caches["eager"], seq["eager"], plain),
                "compiled": lambda: fn(model, tok, caches["compiled"], seq["compiled"], plain)}
        if fn is None:
            del runs["compiled"]
        else:
            runs["compiled"]()  # compile this batch's graph outside the timing
        diff = float((runs["c"]() - runs["eager"]()).abs().max())
        ms = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                ms[name].append(1e3 * timed(run, args.steps))
        med = {name: statistics.median(v) for name, v in ms.items()}
        comp = med.get("compiled", float("nan"))
        print(f"{B:5d} | {med['c']:9.2f} | {med['eager']:8.2f} | {comp:11.2f} | {med['eager'] / med['c']:6.2f}x | "
              f"{comp / med['c']:9.2f}x | {1e3 * statistics.median(prefill['c']):12.1f} | "
              f"{1e3 * statistics.median(prefill['eager']):16.1f} | {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
