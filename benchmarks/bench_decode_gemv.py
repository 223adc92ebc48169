"""How close one batch-1 decode step's weight reads can come to the memory floor, with nothing else in
the step: the linear layers of a decode step called back to back through the C kernel
(kernels/linear_rows.c, one row), weights cold (the model's weights are larger than the caches),
against the same bytes at the measured read bandwidth.

    .venv/bin/python benchmarks/bench_decode_gemv.py [--shape smollm2-135m] [--layers 8] [--threads 2]

Rows printed: the step's linear layers as the model has them (q, k, v, o, gate, up, down per layer,
then the head), and with q/k/v and gate/up concatenated (fewer, longer weight streams). The step
measured by bench_families.py is this plus everything that is not a weight read (norms, RoPE,
attention, sampling, per-op dispatch): the difference between the two is what a faster step can
still remove; the ratio of this one to the floor is what it cannot.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_families import SHAPES, read_gbs
from sputnik.kernels.cpu import linear_rows, linear_rows_available


def step_weights(shape: str, layers: int, fused: bool) -> list[torch.Tensor]:
    c = SHAPES[shape][1]
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    per_layer = ([(q + 2 * kv, d), (d, q), (2 * f, d), (d, f)] if fused else
                 [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)])
    g = torch.Generator().manual_seed(0)
    return [torch.randn(o, i, generator=g) for _ in range(layers or c["num_hidden_layers"]) for o, i in per_layer] \
        + [torch.randn(v, d, generator=g)]


def time_sequence(weights: list[torch.Tensor], repeats: int) -> float:
    xs = [torch.randn(1, w.shape[1]) for w in weights]
    for x, w in zip(xs, weights):  # warm-up, and a check that the kernel computes x Wᵀ
        torch.testing.assert_close(linear_rows(x, w, None), x @ w.T, rtol=1e-4, atol=1e-3)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, w in zip(xs, weights):
            linear_rows(x, w, None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (0 = the published depth)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not linear_rows_available():
        raise SystemExit("the C linear kernel is not available on this machine")
    gbs = read_gbs()
    print(f"{args.shape}, {args.layers or 'all'} layers, {args.threads} threads; read bandwidth {gbs:.1f} GB/s")
    for fused in (False, True):
        weights = step_weights(args.shape, args.layers, fused)
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        t = time_sequence(weights, args.repeats)
        floor = nbytes / (gbs * 1e9)
        print(f"{'q|k|v and gate|up concatenated' if fused else 'linear layers as the model has them':38s} "
              f"{len(weights):3d} calls, {nbytes / 1e6:6.1f} MB: {t * 1e3:6.2f} ms = {nbytes / t / 1e9:5.1f} GB/s, "
              f"{t / floor:.2f}x the floor ({floor * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
