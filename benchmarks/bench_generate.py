"""Generation throughput: Sputnik's Engine vs transformers' DeepseekV3ForCausalLM.generate() on the
same weights, plus the MLA cache size, the decode step against the memory-bandwidth floor, and
MTP self-speculative decoding at batch 1.

    .venv/bin/python benchmarks/bench_generate.py [--threads 2] [--repeats 3] [--batches 1,32]
        [--checkpoint DIR] [--profile] [--out bench_generate.json] [--device cpu|cuda]

On CUDA (--device cuda) the defaults switch to the GPU workload of the inference issue: the small
preset in bf16, 128-token prompts, 256 new tokens, batches 1 and 64, our engine with CUDA graphs (a
kept Engine: captured once per batch bucket, then replayed), and transformers both by default and with
its static-cache fast path (`cache_implementation="static"`).

CPU workload (the model issue's): the tiny preset (vocab 4096, hidden 256, 4 layers, first dense, 16
experts top-2 + 1 shared, MLA q_lora 128 / kv_lora 64), fp32 on CPU, 32-token random prompts, 128
new tokens, sampling at temperature 1 without top-k/top-p (HF: do_sample, top_k=0,
min_new_tokens = max_new_tokens so every row is exactly as long as ours). Ours and HF alternate
inside each repeat (noise hits both alike); medians are reported, ratios come from the same run.
tokens/s counts generated tokens only (batch × new tokens) over the whole generate call, prefill
included, for both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from sputnik.common import atomic_write_text
from sputnik.inference.decoders import cached_model
from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams
from sputnik.model import build_model
from sputnik.model.config import PRESETS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
from sputnik.model.hf import load_hf, save_hf
from sputnik.inference.speculative import speculative_generate


# ---------------------------------------------------------------------------------------------
# Models
def load_models(args):
    dtype = DTYPES[args.dtype]
    if args.checkpoint:
        ours = load_hf(args.checkpoint)
        path = args.checkpoint
    else:
        torch.manual_seed(0)
        ours = build_model(PRESETS[args.config]())
        path = tempfile.mkdtemp(prefix="bench_generate_")
        save_hf(ours, path)
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype)
    dev = torch.device(args.device)
    return ours.to(dev, dtype).eval(), hf.to(dev).eval()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Timed runs
def run_ours(eng, prompts_BT, new_tokens, seed) -> float:
    """One generate() on a kept Engine (as RL and eval keep theirs: CUDA graphs, once captured, and
    the compiled step are reused across calls)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=seed)
    t0 = time.perf_counter()
    out = eng.generate(prompts_BT.tolist(), params)
    sync(prompts_BT.device)
    dt = time.perf_counter() - t0
    assert all(len(r[0].token_ids) == new_tokens for r in out)
    return dt


@torch.no_grad()
def run_hf(hf, prompts_BT, new_tokens, seed, static=False) -> float:
    """transformers' generate(); static=True is its documented fast path (cache_implementation="static",
    which compiles the forward)."""
    torch.manual_seed(seed)
    extra = dict(cache_implementation="static") if static else {}
    t0 = time.perf_counter()
    out = hf.generate(prompts_BT, attention_mask=torch.ones_like(prompts_BT), do_sample=True, temperature=1.0,
                      top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                      **extra)
    sync(prompts_BT.device)
    dt = time.perf_counter() - t0
    assert out.shape[1] == prompts_BT.shape[1] + new_tokens
    return dt


@torch.no_grad()
def decode_step_ms(model, batch, prompt_len, steps=32) -> float:
    """Median wall time of one eager cached single-token step as the eager decoder runs it (the cached
    model's step with the wave's weights), i.e. the engine's decode step minus sampling and
    bookkeeping, after a prompt_len prefill."""
    dev = model.lm_head.weight.device
    cm = cached_model(model)
    cache = cm.new_cache(batch, prompt_len + steps + 1, None, dev)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=dev)
    cm.forward_cached(ids, cache, torch.zeros(batch, dtype=torch.long, device=dev))
    seqlens, tok, times = torch.full((batch,), prompt_len, device=dev), ids[:, -1:], []
    weights = cm.step_weights()
    for _ in range(steps):
        t0 = time.perf_counter()
        cm.step(tok[:, 0], cache, seqlens, weights)
        sync(dev)
        times.append(time.perf_counter() - t0)
        seqlens = seqlens + 1
    return 1e3 * statistics.median(times)


def memory_bandwidth_gbs(dev, mib=512, reps=5) -> float:
    """Copy bandwidth of a large fp32 tensor (read + write counted): a practical upper bound on
    how fast the weights can be streamed."""
    src = torch.empty(mib * 2**20 // 4, device=dev).normal_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


# ---------------------------------------------------------------------------------------------
# Analytic sizes
def kv_bytes_per_token(cfg, elt: int) -> dict:
    """MLA caches c_KV and the shared RoPE key: L·(kv_lora_rank + qk_rope_head_dim) numbers a
    token. An MHA of the same width caches per head a key (qk_head_dim) and a value (v_head_dim):
    L·H·(qk_head_dim + v_head_dim)."""
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    mla = L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elt
    mha = L * H * (cfg.qk_head_dim + cfg.v_head_dim) * elt
    return {"mla": mla, "mha_same_width": mha, "ratio": mha / mla}


def weight_bytes_per_step(model, batch: int, elt: int) -> float:
    """Bytes a decode step must read at least once: every non-embedding main-model weight except
    the routed experts no token of the step picks; with uniform routing a layer touches
    E·(1 − (1 − k/E)^B) experts in expectation. The embedding reads only B rows (ignored)."""
    cfg = model.config
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    total = model.num_params() - model.model.embed_tokens.weight.numel()
    untouched = E - E * (1 - (1 - k / E) ** batch)
    for name, moe in model.moe_layers().items():
        if not name.startswith("mtp."):
            per_expert = (moe.experts.gate_up_proj.numel() + moe.experts.down_proj.numel()) // E
            total -= untouched * per_expert
    return total * elt


# ---------------------------------------------------------------------------------------------
def task_prompts(checkpoint: str, n: int) -> tuple[list[list[int]], int] | None:
    """Held-out addition prompts in the chat format when the checkpoint has its tokenizer (a trained
    model's MTP head is only meaningful on the text it was trained on), else None."""
    import os

    if not checkpoint or not os.path.exists(os.path.join(checkpoint, "tokenizer.json")):
        return None
    from sputnik.tasks import get_task
    from sputnik.tokenizer import Tokenizer

    tok = Tokenizer.load(checkpoint)
    return [tok.render_prompt(ex.prompt) for ex in get_task("addition").generate(n, split="test", seed=0)], tok.eot_id


def speculative(model, prompt_len, new_tokens, repeats, seed, checkpoint=""):
    """Batch-1 speculative vs plain Engine at temperature 1 and greedy, interleaved prompt by prompt.
    With a trained checkpoint: held-out task prompts, stopping at end-of-turn (tokens/s from the real
    lengths); else random prompts and fixed length."""
    dev = model.lm_head.weight.device
    task = task_prompts(checkpoint, 4 * repeats)
    if task is None:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(repeats)]
        stops = ()
    else:
        prompts, stops = task[0], (task[1],)
    res = {"prompts": "addition (held-out, chat format)" if task else "random"}
    plain_engine = Engine(model, cuda_graphs=False)  # speculation runs eagerly: compare like with like
    for temp in (1.0, 0.0):
        plain_t = spec_t = plain_n = spec_n = drafted = accepted = 0
        for r, prompt in enumerate(prompts):
            params = SamplingParams(max_new_tokens=new_tokens, temperature=temp, seed=seed + r, stop_token_ids=stops)
            t0 = time.perf_counter()
            plain = plain_engine.generate([prompt], params)[0][0]
            sync(dev)
            plain_t += time.perf_counter() - t0
            t0 = time.perf_counter()
            spec, st = speculative_generate(model, prompt, params)
            sync(dev)
            spec_t += time.perf_counter() - t0
            plain_n, spec_n = plain_n + len(plain.token_ids), spec_n + len(spec.token_ids)
            drafted, accepted = drafted + st.drafted, accepted + st.accepted
            if temp == 0:
                assert spec.token_ids == plain.token_ids, "greedy speculative must equal greedy decoding"
        res[f"T={temp:g}"] = {"plain_tok_s": plain_n / plain_t, "spec_tok_s": spec_n / spec_t,
                              "speedup": (spec_n / spec_t) / (plain_n / plain_t),
                              "acceptance": accepted / max(drafted, 1),
                              "tokens_per_main_forward": spec_n / max(drafted + len(prompts), 1),
                              "mean_len": spec_n / len(prompts)}
    return res


def profile_decode(model, batch, prompt_len, rows=15):
    from torch.profiler import ProfilerActivity, profile

    eng = Engine(model)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len)).tolist()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eng.generate(prompts, SamplingParams(max_new_tokens=32, temperature=1.0))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (set explicitly)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per measurement (median)")
    ap.add_argument("--batches", default="", help="comma list; default 1,32 on CPU and 1,64 on CUDA")
    ap.add_argument("--prompt-len", type=int, default=0, help="default 32 on CPU, 128 on CUDA")
    ap.add_argument("--new-tokens", type=int, default=0, help="default 128 on CPU, 256 on CUDA")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default="", help="model preset (default tiny on CPU, small on CUDA)")
    ap.add_argument("--dtype", default="", choices=["", "fp32", "bf16"], help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--hf-static", action="store_true",
                    help="also time transformers' static-cache fast path (default on CUDA; slower than its default on CPU)")
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                    help="CUDA: our engine without CUDA graphs (the eager row is always without)")
    ap.add_argument("--checkpoint", default="", help="HF-layout DeepSeek-V3 dir (ours, with MTP) instead of random tiny")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler table of our decode at batch 1 and the largest batch")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="measure only the eager engine (default: compiled decode step and eager, both)")
    ap.add_argument("--skip-hf", action="store_true", help="only our engine (no transformers baseline)")
    ap.add_argument("--out", default="bench_generate.json")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.config = args.config or ("small" if cuda else "tiny")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.prompt_len = args.prompt_len or (128 if cuda else 32)
    args.new_tokens = args.new_tokens or (256 if cuda else 128)
    args.hf_static = args.hf_static or cuda
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in (args.batches or ("1,64" if args.device == "cuda" else "1,32")).split(",")]
    ours, hf = load_models(args)
    dev, cfg, elt = torch.device(args.device), ours.config, ours.lm_head.weight.element_size()
    print(f"threads={torch.get_num_threads()} device={dev} params={ours.num_params() / 1e6:.2f}M "
          f"(active {ours.num_params(active=True) / 1e6:.2f}M) torch {torch.__version__}", flush=True)

    # --- throughput, interleaved
    results = {"config": vars(args), "batches": {}}
    g = torch.Generator().manual_seed(0)
    for B in batches:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g).to(dev)
        eager = Engine(ours, compile=False, cuda_graphs=False)
        fast = Engine(ours, compile=args.compile, cuda_graphs=args.cuda_graphs and cuda)
        fast_on = args.compile or (args.cuda_graphs and cuda)
        run_ours(eager, prompts, 4, 0)  # warm-up (allocator, lazy inits)
        # The fast engine's one-off cost: torch.compile (the first generate() at this batch size class,
        # 1 or > 1) and/or CUDA-graph capture (each batch bucket and cache length once). A user pays it
        # once per process and Engine; reported apart, not in tok/s.
        setup_s = run_ours(fast, prompts, args.new_tokens, 0) if fast_on else None
        hf_modes = ([] if args.skip_hf else ["default"]) + (["static"] if args.hf_static and not args.skip_hf else [])
        for mode in hf_modes:  # the static cache compiles for its length: warm it at the timed length
            run_hf(hf, prompts, args.new_tokens if mode == "static" else 4, 0, static=mode == "static")
        t_ours, t_eager, t_hf = [], [], {m: [] for m in hf_modes}
        for r in range(args.repeats):
            if fast_on:
                t_ours.append(run_ours(fast, prompts, args.new_tokens, r))
            t_eager.append(run_ours(eager, prompts, args.new_tokens, r))
            for mode in hf_modes:
                t_hf[mode].append(run_hf(hf, prompts, args.new_tokens, r, static=mode == "static"))
        n = B * args.new_tokens
        t_ours = t_ours or t_eager
        row = {"ours_tok_s": n / statistics.median(t_ours), "ours_s": t_ours, "compile_s": setup_s,
               "eager_tok_s": n / statistics.median(t_eager), "eager_s": t_eager,
               # the fast engine's decoder after the run (an eager fallback if its graphs failed)
               "decoder": fast.decoder.name}
        if hf_modes:
            t_ref = t_hf["default"]
            row.update(hf_tok_s=n / statistics.median(t_ref), hf_s=t_ref,
                       speedup=statistics.median(t_ref) / statistics.median(t_ours),
                       eager_speedup=statistics.median(t_ref) / statistics.median(t_eager))
        if "static" in t_hf:
            t_st = t_hf["static"]
            row.update(hf_static_tok_s=n / statistics.median(t_st), hf_static_s=t_st,
                       speedup_vs_static=statistics.median(t_st) / statistics.median(t_ours))
        row["decode_step_ms"] = decode_step_ms(ours, B, args.prompt_len)
        row["engine_step_ms"] = 1e3 * statistics.median(t_ours) / args.new_tokens
        results["batches"][B] = row
        print(f"batch {B}: {row}", flush=True)

    # --- cache size and bandwidth floor
    bw = memory_bandwidth_gbs(dev)
    results["kv_bytes_per_token"] = kv_bytes_per_token(cfg, elt)
    results["memory_bandwidth_gb_s"] = bw
    for B, row in results["batches"].items():
        wb = weight_bytes_per_step(ours, B, elt)
        row["weight_bytes_per_step"] = wb
        row["bandwidth_floor_ms"] = 1e3 * wb / (bw * 1e9)
    if cfg.num_nextn_predict_layers:
        results["speculative_batch1"] = speculative(ours, args.prompt_len, args.new_tokens, args.repeats, 100,
                                                     args.checkpoint)

    print_table(results, args)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.profile:
        for B in (1, max(batches)):
            print(f"\n--- profile: our engine, batch {B}, 32 new tokens")
            profile_decode(ours, B, args.prompt_len)


def print_table(res, args):
    print(f"\n{'batch':>5} | {'ours tok/s':>10} | {'HF tok/s':>9} | {'ours/HF':>7} | {'HF static':>9} | "
          f"{'ours/st':>7} | {'eager tok/s':>11} | {'eager/HF':>8} | {'1st call s':>10} | {'engine step ms':>14} | "
          f"{'fwd step ms':>11} | {'BW floor ms':>11}")
    for B, r in res["batches"].items():
        hf = f"{r['hf_tok_s']:9.0f} | {r['speedup']:6.2f}x" if "hf_tok_s" in r else f"{'-':>9} | {'-':>7}"
        st = (f"{r['hf_static_tok_s']:9.0f} | {r['speedup_vs_static']:6.2f}x" if "hf_static_tok_s" in r
              else f"{'-':>9} | {'-':>7}")
        eager_hf = f"{r['eager_speedup']:7.2f}x" if "hf_tok_s" in r else f"{'-':>8}"
        comp = f"{r['compile_s']:10.1f}" if r["compile_s"] is not None else f"{'-':>10}"
        print(f"{B:>5} | {r['ours_tok_s']:10.0f} | {hf} | {st} | {r['eager_tok_s']:11.0f} | {eager_hf} | {comp} | "
              f"{r['engine_step_ms']:14.2f} | {r['decode_step_ms']:11.2f} | {r['bandwidth_floor_ms']:11.3f}")
        if r.get("decoder", "").startswith("eager") and r["compile_s"] is not None:
            print(f"      batch {B}: the fast engine fell back to {r['decoder']} (see the warning above)")
    print("ours = Engine(compile=True) (unless --no-compile): on a CPU in fp32 the one-call C step (deepseek_step.c, "
          "which the eager engine takes too), else the compiled decode step (static shapes, one graph per batch "
          "bucket); on CUDA, CUDA graphs (unless --no-cuda-graphs); "
          "eager = Engine(compile=False, cuda_graphs=False); HF static = cache_implementation='static'; 1st call s = "
          "wall of the fast engine's first generate() at that batch (compile, graph capture), paid once per "
          "process and Engine, not in tok/s")
    kv = res["kv_bytes_per_token"]
    print(f"KV cache bytes/token: MLA {kv['mla']} vs MHA of the same width {kv['mha_same_width']} ({kv['ratio']:.1f}x); "
          f"copy bandwidth {res['memory_bandwidth_gb_s']:.1f} GB/s")
    for k, s in res.get("speculative_batch1", {}).items():
        if k == "prompts":
            print(f"speculative batch 1 on {s} prompts:")
            continue
        print(f"speculative batch 1, {k}: {s['spec_tok_s']:.0f} vs plain {s['plain_tok_s']:.0f} tok/s "
              f"({s['speedup']:.2f}x), acceptance {s['acceptance']:.2f}, {s['tokens_per_main_forward']:.2f} tokens "
              f"per main forward, mean length {s['mean_len']:.0f}")
    if not args.checkpoint:
        print("note: random weights. Greedy acceptance ~0 (unrelated argmaxes); at T=1 both p and q are "
              "near-uniform, so acceptance is high but meaningless. Use --checkpoint for a trained model.")


if __name__ == "__main__":
    sys.exit(main())
