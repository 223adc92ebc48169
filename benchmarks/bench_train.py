"""Training throughput, peak memory and MFU: Sputnik's DeepSeek-V3 vs transformers'
DeepseekV3ForCausalLM on the same config and weights, in one process, A/B interleaved.

One step = forward with loss + backward + AdamW step (+ for Sputnik: the aux-loss-free bias
update and the sequence-wise balance loss it trains with; transformers does neither).
CPU: `tiny`, fp32, batch 8×256.  GPU: `small`, bf16 weights, batch 8×2048.

    python benchmarks/bench_train.py                   # picks CPU or GPU, all cores
    python benchmarks/bench_train.py --threads 2 --repeats 7 --out bench.json
    python benchmarks/bench_train.py --compile         # adds torch.compile rows for both
    python benchmarks/bench_train.py --ablation        # adds our step without the C head kernel
    python benchmarks/bench_train.py --profile 3       # torch.profiler table of our step, then exit
    python benchmarks/bench_train.py --padded --ablation   # SFT-shaped: right-padded rows, prompts unscored

--padded: each row's length is drawn uniformly from [seq/3, seq] and right-padded (the speedrun's SFT
batches are 72% real tokens), its first fifth is a prompt (unscored); tok/s then counts real tokens.
transformers gets the attention mask and labels with -100; --ablation adds our step computing every
row (the path a GPU takes), to measure what skipping the padding buys.

Rows are medians over repeats (range in brackets); each repeat times `--steps` steps of every
variant in turn, so drift on a noisy shared CPU hits all variants alike. `cpu ms` is process CPU
time per step (a diagnostic when the machine is oversubscribed). Peak memory: on GPU the allocator
peak of the step; on CPU the peak RSS of the variant trained alone in a fresh process (weights,
grads, AdamW state and activations). MFU uses accounting.flops_per_token and hardware.py's peaks.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sputnik.accounting.hardware import DEFAULTS, device_key  # noqa: E402
from sputnik.model.accounting import flops_per_token  # noqa: E402
from sputnik.model.config import small, small_dense, tiny, tiny_dense  # noqa: E402
from sputnik.model.hf import hf_config  # noqa: E402
from sputnik.model.transformer import Transformer  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Memory: CPU peak RSS from /proc (reset per measurement), GPU allocator peak
def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(device: torch.device) -> int:
    """Reset the peak counter; return the current baseline in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:  # Linux >= 4.0: writing 5 resets VmHWM (peak RSS) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _proc_status_kb("VmRSS") * 1024


def read_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _proc_status_kb("VmHWM") * 1024


# ---------------------------------------------------------------------------------------------
# Models and their training steps
def build_hf(cfg, ours: Transformer, dtype: torch.dtype, device: torch.device):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    fields = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "sputnik")}
    hc = DeepseekV3Config(**fields)
    model = DeepseekV3ForCausalLM._from_config(hc, attn_implementation="sdpa", dtype=torch.float32)
    # Same weights as ours: the in-memory keys are identical (fused experts on both sides).
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.to(device=device, dtype=dtype)


def make_step(model, kind: str, ids_BT, targets_BT, fused_adam: bool, valid_BT=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused_adam,
                            foreach=None if fused_adam else True)

    def step():
        if kind == "hf":
            labels_BT = ids_BT if valid_BT is None else torch.cat([torch.full_like(ids_BT[:, :1], -100), targets_BT[:, :-1]], 1)
            loss = model(input_ids=ids_BT, labels=labels_BT,  # HF shifts labels inside
                         attention_mask=None if valid_BT is None else valid_BT.long()).loss
        else:
            out = model(ids_BT, targets_BT, valid_BT)
            loss = out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if kind == "ours":  # the trainer's aux-loss-free update (train/balance.py), one process
            base = getattr(model, "_orig_mod", model)
            base.update_expert_bias({k: v.detach().float() for k, v in out.expert_load.items()})
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, steps: int, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds). CPU time is a diagnostic for a contended machine: it
    does not count time spent waiting for a core (it does count OpenMP spinning)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = step()
    loss.item()  # forces completion on GPU
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


# ---------------------------------------------------------------------------------------------
# ABLATION: our step with a part switched off, to measure what that part buys in the same run.
def every_row(step):
    """Our step computing every row of a padded batch (blocks and head), as on a GPU."""
    from sputnik.model import block, llama, moe
    from sputnik.train import losses

    def patched():
        saved = [(m, m.real_token_rows) for m in (block, llama, moe)], losses._scored_rows_only
        for m, _ in saved[0]:
            m.real_token_rows = lambda valid_BT, x: None
        losses._scored_rows_only = lambda h_ND: False
        try:
            return step()
        finally:
            for m, f in saved[0]:
                m.real_token_rows = f
            losses._scored_rows_only = saved[1]
    return patched


def without_head_kernel(step):
    """Our step with the LM head's row softmax on ATen passes instead of softmax_rows.c."""
    from sputnik.train import losses

    def patched():
        original = losses._softmax_kernel
        losses._softmax_kernel = lambda h_ND, dtype: False
        try:
            return step()
        finally:
            losses._softmax_kernel = original
    return patched


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = all cores we may use)")
    ap.add_argument("--size", default=None, choices=["tiny", "small"], help="default: tiny on CPU, small on GPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=0, help="sequence length (0 = 256 on CPU, 2048 on GPU)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="add torch.compile(model) rows for both")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense Llama twin row")
    ap.add_argument("--adam", default="fused", choices=["fused", "foreach"],
                    help="AdamW kernel for every variant (fused: one C++ kernel, also on CPU)")
    ap.add_argument("--ablation", action="store_true",
                    help="add a row of our step with the LM head's C row-softmax kernel off (see ABLATION)")
    ap.add_argument("--padded", action="store_true", help="SFT-shaped batch: right-padded rows, unscored prompts")
    ap.add_argument("--profile", type=int, default=0, help="profile N of our steps (torch.profiler), print, exit")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)  # internal: one variant's CPU peak RSS
    return ap.parse_args(argv)


def setup(args):
    """Device, threads, configs and the batch, decided once (the same for every variant)."""
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and device.type != "cuda":
        raise SystemExit("--device cuda but CUDA is not available")
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or avail
    torch.set_num_threads(threads)
    size = args.size or ("tiny" if device.type == "cpu" else "small")
    seq = args.seq or (256 if device.type == "cpu" else 2048)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = (tiny if size == "tiny" else small)(num_nextn_predict_layers=0)  # transformers trains no MTP
    dense_cfg = (tiny_dense if size == "tiny" else small_dense)()
    torch.manual_seed(0)
    ids_BT = torch.randint(0, cfg.vocab_size, (args.batch, seq), device=device)
    targets_BT = torch.cat([ids_BT[:, 1:], torch.full_like(ids_BT[:, :1], -100)], 1)
    valid_BT = None
    if args.padded:
        lengths_B = torch.randint(seq // 3, seq + 1, (args.batch,), device=device)
        valid_BT = torch.arange(seq, device=device)[None] < lengths_B[:, None]
        ids_BT = ids_BT.clamp(min=1).masked_fill(~valid_BT, 0)  # pad id 0
        targets_BT = torch.cat([ids_BT[:, 1:], torch.zeros_like(ids_BT[:, :1])], 1)
        scored_BT = torch.cat([valid_BT[:, 1:], torch.zeros_like(valid_BT[:, :1])], 1)
        scored_BT &= torch.arange(seq, device=device)[None] >= lengths_B[:, None] // 5
        targets_BT = targets_BT.masked_fill(~scored_BT, -100)
    return dict(valid_BT=valid_BT, device=device, threads=threads, size=size, seq=seq, dtype=dtype, cfg=cfg, dense_cfg=dense_cfg,
                ids_BT=ids_BT, targets_BT=targets_BT)


def build_variants(args, env, only: str | None = None) -> tuple[dict, dict]:
    """{name: step()} for every row (or just the row `only`), and facts about the HF model."""
    device, dtype, cfg, ids_BT, targets_BT, valid_BT = (env[k] for k in ("device", "dtype", "cfg", "ids_BT",
                                                                          "targets_BT", "valid_BT"))
    fused, variants, info = args.adam == "fused", {}, {}

    def want(name):
        return only is None or only == name
    need_ours = any(want(n) for n in ("sputnik", "transformers", "sputnik-no-head-kernel", "sputnik-every-row", "sputnik+compile",
                                      "transformers+compile"))
    ours = Transformer(cfg) if need_ours else None  # built first: the HF model copies its weights
    if want("transformers") or (args.compile and want("transformers+compile")):
        hf = build_hf(cfg, ours, dtype, device)
        info = dict(hf_attn=hf.config._attn_implementation,
                    hf_experts=getattr(hf.config, "_experts_implementation", None))
        if want("transformers"):
            variants["transformers"] = make_step(hf, "hf", ids_BT, targets_BT, fused, valid_BT)
        if args.compile and want("transformers+compile"):
            variants["transformers+compile"] = make_step(torch.compile(hf), "hf", ids_BT, targets_BT, fused, valid_BT)
    ours = ours.to(device=device, dtype=dtype) if need_ours else None
    if want("sputnik") or (args.ablation and (want("sputnik-no-head-kernel") or want("sputnik-every-row"))):
        step = make_step(ours, "ours", ids_BT, targets_BT, fused, valid_BT)
        if want("sputnik"):
            variants["sputnik"] = step
        if args.ablation and want("sputnik-no-head-kernel"):
            variants["sputnik-no-head-kernel"] = without_head_kernel(step)
        if args.ablation and valid_BT is not None and want("sputnik-every-row"):
            variants["sputnik-every-row"] = every_row(step)
    if not args.no_dense and (want("sputnik-dense") or (args.ablation and want("sputnik-dense-every-row"))):
        try:
            from sputnik.model.llama import LlamaModel

            dense = LlamaModel(env["dense_cfg"]).to(device=device, dtype=dtype)
            dense_step = make_step(dense, "dense", ids_BT, targets_BT, fused, valid_BT)
            if want("sputnik-dense"):
                variants["sputnik-dense"] = dense_step
            if args.ablation and valid_BT is not None and want("sputnik-dense-every-row"):
                variants["sputnik-dense-every-row"] = every_row(dense_step)
        except ImportError as e:  # the dense twin is another engineer's file
            print(f"[bench] dense twin skipped: {e}", file=sys.stderr)
    if args.compile and want("sputnik+compile"):
        # A separate copy. Inductor accepts torch._grouped_mm only in bf16 on CUDA; elsewhere the experts run
        # inside an opaque custom op (moe.block_mm), so the model compiles as one graph.
        ours_c = copy.deepcopy(ours)
        variants["sputnik+compile"] = make_step(torch.compile(ours_c), "ours", ids_BT, targets_BT, fused, valid_BT)
    return variants, info


def cpu_peak_rss(args, name: str) -> int:
    """Peak RSS of one variant trained alone in a fresh process, above the RSS after imports:
    weights + grads + AdamW state + activations. In-process peaks are meaningless on CPU (memory
    freed by one variant is reused by the next without growing RSS)."""
    cmd = [sys.executable, __file__, "--mem-child", name, "--threads", str(args.threads), "--batch",
           str(args.batch), "--seq", str(args.seq), "--adam", args.adam, "--warmup", "1"]
    cmd += [f for f, on in (("--compile", args.compile), ("--ablation", args.ablation), ("--padded", args.padded)) if on]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK_RSS ")]
    return int(lines[-1].split()[1]) if lines else -1


def mem_child(args) -> None:
    base = _proc_status_kb("VmRSS") * 1024
    env = setup(args)
    variants, _ = build_variants(args, env, only=args.mem_child)
    for _ in range(args.warmup + 1):
        variants[args.mem_child]()
    print(f"PEAK_RSS {_proc_status_kb('VmHWM') * 1024 - base}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.mem_child:
        return mem_child(args) or {}
    env = setup(args)
    device, threads, size, seq, dtype, cfg, dense_cfg = (
        env[k] for k in ("device", "threads", "size", "seq", "dtype", "cfg", "dense_cfg"))
    variants, info = build_variants(args, env)
    if args.profile:
        return profile(variants["sputnik"], args.profile, device)

    # --- warm up (compiles, allocator, grouped-mm probes), then interleaved timed repeats
    for name, step in variants.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(device)
        print(f"[bench] warmup {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    tokens = args.batch * seq if env["valid_BT"] is None else int(env["valid_BT"].sum())  # real tokens
    rates = {name: [] for name in variants}
    cpu_s = {name: [] for name in variants}
    peaks = {name: 0 for name in variants}
    for r in range(args.repeats):
        for name, step in variants.items():
            base = reset_peak(device)
            seconds, cpu_seconds = time_steps(step, args.steps, device)
            peaks[name] = max(peaks[name], read_peak(device) - base)
            rates[name].append(tokens * args.steps / seconds)
            cpu_s[name].append(cpu_seconds / args.steps)
        print(f"[bench] repeat {r + 1}/{args.repeats}: " +
              ", ".join(f"{n} {rates[n][-1]:,.0f}" for n in variants), file=sys.stderr)
    if device.type == "cpu":
        args.threads = threads
        peaks = {name: cpu_peak_rss(args, name) for name in variants}

    # --- report
    key = device_key(device.type, torch.cuda.get_device_name(0) if device.type == "cuda" else "")
    peak_flops = DEFAULTS["peak_flops"][key] * (threads if device.type == "cpu" else 1)
    rows = []
    for name in variants:
        flops_cfg = dense_cfg if name.startswith("sputnik-dense") else cfg
        ftok = flops_per_token(flops_cfg, seq, training=True, include_mtp=False)["total"]
        med = statistics.median(rates[name])
        rows.append(dict(name=name, tokens_per_s=med, min=min(rates[name]), max=max(rates[name]),
                         step_ms=tokens / med * 1e3, cpu_ms_per_step=statistics.median(cpu_s[name]) * 1e3,
                         peak_mem_bytes=peaks[name],
                         flops_per_token=ftok, mfu=ftok * med / peak_flops))
    ref = statistics.median(rates["transformers"])
    print(f"\n{size} {args.batch}x{seq} {str(dtype).removeprefix('torch.')} on {device.type} ({threads} threads), "
          f"{f'padded ({tokens} real tokens), ' if args.padded else ''}HF attention={info['hf_attn']} experts={info['hf_experts']}, AdamW {args.adam}; median of {args.repeats}")
    print(f"{'variant':<22}{'tok/s':>10}{'range':>20}{'vs HF':>8}{'ms/step':>9}{'cpu ms':>8}{'peak MB':>9}"
          f"{'MFU':>7}")
    for row in rows:
        rng = f"[{row['min']:,.0f}-{row['max']:,.0f}]"
        print(f"{row['name']:<22}{row['tokens_per_s']:>10,.0f}{rng:>20}{row['tokens_per_s'] / ref:>7.2f}x"
              f"{row['step_ms']:>9.1f}{row['cpu_ms_per_step']:>8.0f}{row['peak_mem_bytes'] / 2**20:>9.0f}"
              f"{row['mfu']:>7.1%}")
    result = dict(size=size, batch=args.batch, seq=seq, dtype=str(dtype), device=device.type, threads=threads,
                  adam=args.adam, padded=args.padded, real_tokens=tokens, **info, torch=torch.__version__, host=platform.node(),
                  peak_flops=peak_flops, repeats=args.repeats, steps=args.steps, rows=rows,
                  speedup_vs_hf=statistics.median(rates["sputnik"]) / ref)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def profile(step, n: int, device) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=40))
    return {}


if __name__ == "__main__":
    main()
