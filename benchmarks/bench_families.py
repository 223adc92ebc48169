"""Generation with a user's checkpoint: Sputnik's engine on its own Llama-family model vs transformers'
generate() (default dynamic cache, and its static-cache path) on the same weights, against the floor
the hardware sets, measured in the same run.

    .venv/bin/python benchmarks/bench_families.py [--shapes smollm2-135m,qwen2.5-0.5b] [--layers 8]
        [--batches 1,32] [--prompt-len 32] [--new-tokens 32] [--repeats 3] [--threads 2]
        [--hf-static] [--compile] [--device cpu|cuda] [--out bench_families.json]

On CUDA (--device cuda): bf16 weights on both sides, our engine with CUDA graphs (captured once per
batch bucket on a kept Engine), batches 1, 32 and 64 by default; the floors use the device's measured
bf16 GEMM rate and copy bandwidth.

Models: random-init transformers models of the real layouts (config values of the published
checkpoints) at full width, depth cut to --layers (0 = full) to keep a run short; saved with
save_pretrained and loaded by `sputnik.train.loading.load_model`, the path `--init DIR` takes. fp32.
Workload: random prompts, sampling at temperature 1 (HF: do_sample, top_k=0, min_new_tokens =
max_new_tokens), both sides generate exactly the same number of tokens. Ours and HF alternate inside
each repeat; medians; ratios come from the same run.

Floors (the fastest the machine could possibly go; its GEMM rate and read bandwidth measured before and
after the run, the faster of each used; and, since this VM's memory bandwidth moves between ~30 and
~50 GB/s within a minute and every decode step follows it, also measured right before and after each
of our timed runs: `ours_over_adjacent_floor`, the median over repeats):
  batch 1: every decode step reads all weights once (embedding rows aside) at the measured read
           bandwidth, plus the prefill's FLOPs at the measured GEMM rate; with sparse layers (Qwen3-MoE)
           the experts the step's rows chose: E·(1 − (1 − k/E)^B) per layer for B rows, routing taken
           as uniform (random init), and FLOPs of the k chosen experts a token;
  batch B: the FLOPs of prefill + decode (2 · matmul params · tokens, plus attention) at the
           measured GEMM rate (a large square fp32 matmul), or the batch-1 bytes if larger.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time

import torch

from bench_generate import run_hf, run_ours, sync  # the same timed generate() calls, both sides
from sputnik.common import atomic_write_text
from sputnik.inference.engine import Engine

# The published configs (config.json of HuggingFaceTB/SmolLM2-135M and Qwen/Qwen2.5-0.5B).
SHAPES = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                                   rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643,
                                   eos_token_id=151643, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3-0.6b": ("qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                 bos_token_id=151643, eos_token_id=151645,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Qwen/Qwen3-30B-A3B: every layer sparse, 128 experts, 8 chosen a token (run it with --layers 1-2: one
    # layer's experts are 2.4 GB in fp32, held by both sides and once more packed for our C step)
    "qwen3-30b-a3b": ("qwen3_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                        bos_token_id=151643, eos_token_id=151645,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}


def build_checkpoint(shape: str, layers: int, path: str = "", seed: int = 0, **overrides) -> str:
    """A random-init checkpoint of SHAPES[shape] (config values replaced by `overrides`) saved in `path`
    (a new temporary directory by default); returns the directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    family, values = SHAPES[shape]
    values = dict(values, num_hidden_layers=layers or values["num_hidden_layers"], **overrides)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **values))
    path = path or tempfile.mkdtemp(prefix=f"bench_{shape}_")
    hf.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# The machine's limits, measured in this run
def gemm_gflops(device="cpu", dtype=torch.float32, n: int = 2048, reps: int = 10) -> float:
    n = n if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b, device) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def read_gbs(device="cpu", mib: int = 512, reps: int = 5) -> float:
    """Read bandwidth: the fastest of the reads below over a large fp32 tensor (each reads it once and
    writes next to nothing): torch's sum, and on a CPU the C kernel's one-row matrix-vector product
    at a few row widths. The fastest read the machine was seen to do is the floor's bandwidth, so a
    kernel that streams faster than torch's reduction cannot make the floor look slow."""
    x = _read_buffer(device, mib)
    best = min(_timed(lambda: x.sum(), device) for _ in range(reps))
    if device == "cpu":
        from sputnik.kernels.cpu import linear_rows, linear_rows_available

        if linear_rows_available():
            for width in (1024, 4096):
                w = x[: x.numel() // width * width].view(-1, width)
                v = torch.randn(1, width)
                best = min(best, *(_timed(lambda: linear_rows(v, w, None)) for _ in range(reps)))
    return x.numel() * 4 / best / 1e9


@functools.cache
def _read_buffer(device: str, mib: int) -> torch.Tensor:
    return torch.empty(mib * 2**20 // 4, device=device).normal_()


def machine_rates(device: str, dtype) -> tuple[float, float]:
    """(GEMM GFLOP/s, read GB/s) now: a quick measurement taken next to each timed run (this VM's memory
    bandwidth moves between ~30 and ~50 GB/s within a minute, and every step follows it)."""
    return gemm_gflops(device, dtype, reps=3), read_gbs(device, reps=3)


def _timed(fn, device="cpu") -> float:
    sync(torch.device(device))
    t0 = time.perf_counter()
    fn()
    sync(torch.device(device))
    return time.perf_counter() - t0


def floors(model, batch: int, prompt_len: int, new_tokens: int, gflops: float, gbs: float) -> dict:
    """Seconds: see the module docstring. Matmul parameters exclude the embedding lookup but include
    the head (tied or not); attention FLOPs 4 · L · H · C per (query, key) pair."""
    c = model.config
    elt = model.lm_head.weight.element_size()
    embed = model.model.embed_tokens.weight.numel()
    params = sum(p.numel() for p in model.parameters())
    head = c.vocab_size * c.hidden_size
    matmul_params = params - embed + (head if c.tie_word_embeddings else 0)  # a tied head is in params once
    read_bytes = elt * matmul_params
    sparse = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    if sparse:  # a token multiplies by its k chosen experts; a step reads the experts its rows chose
        E, k, expert = c.n_routed_experts, c.num_experts_per_tok, 3 * c.hidden_size * c.moe_intermediate_size
        dense = matmul_params - sparse * E * expert
        matmul_params = dense + sparse * k * expert
        distinct = E * (1 - (1 - k / E) ** batch)  # expected experts read per layer, routing ~ uniform
        read_bytes = elt * (dense + sparse * distinct * expert)
    L, H, C = c.num_hidden_layers, c.num_attention_heads, c.attention_head_dim
    prefill_flops = batch * (2 * (matmul_params - head) * prompt_len + 2 * head  # logits of the last token only
                             + 4 * L * H * C * prompt_len * (prompt_len + 1) / 2)
    decode_flops = batch * sum(2 * matmul_params + 4 * L * H * C * (prompt_len + t) for t in range(1, new_tokens))
    work = {"prefill_flops": prefill_flops, "decode_flops": decode_flops,
            "decode_bytes": (new_tokens - 1) * read_bytes, "matmul_params": matmul_params}
    return work | floor_seconds(work, gflops, gbs)


def floor_seconds(work: dict, gflops: float, gbs: float) -> dict:
    compute_s = (work["prefill_flops"] + work["decode_flops"]) / (gflops * 1e9)
    bytes_s = work["prefill_flops"] / (gflops * 1e9) + work["decode_bytes"] / (gbs * 1e9)
    return {"floor_s": max(compute_s, bytes_s), "compute_floor_s": compute_s, "bytes_floor_s": bytes_s}


# ---------------------------------------------------------------------------------------------
def bench_shape(shape: str, args, gflops: float, gbs: float) -> dict:
    from transformers import AutoModelForCausalLM

    from sputnik.model.llama import LlamaModel
    from sputnik.train.loading import load_model

    path = build_checkpoint(shape, args.layers)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    ours = load_model(path).eval()
    assert isinstance(ours, LlamaModel), f"{shape} did not load on the fast path"
    ours = ours.to(args.device, dtype)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    engine = Engine(ours, compile=args.compile)
    res = {"family": SHAPES[shape][0], "layers": ours.config.num_hidden_layers,
           "params": sum(p.numel() for p in ours.parameters()), "batches": {}}
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, ours.config.vocab_size, (batch, args.prompt_len), generator=g).to(args.device)
        run_ours(engine, prompts, 4, 0)  # warm-up (and the compile, with --compile)
        run_hf(hf, prompts, 4, 0, False)
        sides = {"ours": [], "hf": []} | ({"hf_static": []} if args.hf_static else {})
        if args.hf_static:
            run_hf(hf, prompts, 4, 0, True)
        work = floors(ours, batch, args.prompt_len, args.new_tokens, gflops, gbs)
        adjacent = []  # ours over the floor of the rates measured just before and after that run
        for r in range(args.repeats):
            before = machine_rates(args.device, dtype)
            sides["ours"].append(run_ours(engine, prompts, args.new_tokens, r))
            after = machine_rates(args.device, dtype)
            rates = max(before[0], after[0]), max(before[1], after[1])
            adjacent.append(sides["ours"][-1] / floor_seconds(work, *rates)["floor_s"])
            sides["hf"].append(run_hf(hf, prompts, args.new_tokens, r, False))
            if args.hf_static:
                sides["hf_static"].append(run_hf(hf, prompts, args.new_tokens, r, True))
        row = {k: statistics.median(v) for k, v in sides.items()}
        row |= {f"{k}_all": v for k, v in sides.items()}
        row |= work
        row["ours_over_adjacent_floor"], row["adjacent_all"] = statistics.median(adjacent), adjacent
        row["hf_over_ours"] = row["hf"] / row["ours"]
        if args.hf_static:
            row["hf_static_over_ours"] = row["hf_static"] / row["ours"]
        row["ours_over_floor"] = row["ours"] / row["floor_s"]
        row["hf_over_floor"] = row["hf"] / row["floor_s"]
        res["batches"][batch] = row
        print(f"{shape} b={batch}: ours {row['ours']:.3f}s hf {row['hf']:.3f}s "
              + (f"hf-static {row['hf_static']:.3f}s " if args.hf_static else "")
              + f"floor {row['floor_s']:.3f}s -> ours {row['ours_over_floor']:.2f}x floor "
              f"({row['ours_over_adjacent_floor']:.2f}x the floor of its own minutes), "
              f"{row['hf_over_ours']:.2f}x faster than transformers", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="smollm2-135m,qwen2.5-0.5b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers kept (0 = the published depth)")
    ap.add_argument("--batches", default="", help="comma list of batch sizes (default 1,32; 1,32,64 on CUDA)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=32, help="generated tokens per row")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per measurement (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (set explicitly)")
    ap.add_argument("--hf-static", action="store_true", help="also transformers' static-cache generate")
    ap.add_argument("--compile", action="store_true", help="our engine with the compiled decode step")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both sides run")
    ap.add_argument("--out", default="bench_families.json", help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.batches = [int(b) for b in (args.batches or ("1,32,64" if args.device == "cuda" else "1,32")).split(",")]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gflops, gbs = gemm_gflops(args.device, dtype), read_gbs(args.device)
    print(f"machine: fp32 GEMM {gflops:.0f} GFLOP/s, read bandwidth {gbs:.1f} GB/s ({args.threads} threads)")
    shapes = {s: bench_shape(s, args, gflops, gbs) for s in args.shapes.split(",")}
    # The neighbours on a shared VM slow it for minutes at a time: the floors use the fastest GEMM and
    # read seen before or after the run, so a slow moment at the start cannot flatter the ratios.
    gflops_after, gbs_after = gemm_gflops(args.device, dtype), read_gbs(args.device)
    gflops, gbs = max(gflops, gflops_after), max(gbs, gbs_after)
    print(f"machine after the run: GEMM {gflops_after:.0f} GFLOP/s, read {gbs_after:.1f} GB/s; floors use "
          f"{gflops:.0f} and {gbs:.1f}")
    for shape, res in shapes.items():
        for batch, row in res["batches"].items():
            row |= floor_seconds(row, gflops, gbs)
            row["ours_over_floor"], row["hf_over_floor"] = row["ours"] / row["floor_s"], row["hf"] / row["floor_s"]
            print(f"{shape} b={batch}: ours {row['ours']:.3f}s = {row['ours_over_floor']:.2f}x its floor "
                  f"{row['floor_s']:.3f}s, {row['ours_over_adjacent_floor']:.2f}x the floor measured next to each "
                  f"run; {row['hf_over_ours']:.2f}x faster than transformers")
    out = {"args": vars(args), "gemm_gflops": gflops, "read_gbs": gbs, "shapes": shapes}
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
