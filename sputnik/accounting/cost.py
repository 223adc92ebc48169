"""`sputnik cost`: plan a training run's FLOPs, device-hours, days, money, energy and memory.

FLOPs per token come from sputnik.model.accounting.flops_per_token (training = 3x forward):
matmul 6·N_active (lm_head included, embedding lookup not), causal attention 3·2·n_h·(d_qk+d_v)·s/2
per layer, and the MTP modules. The plain 6·N·D figure is reported beside the total; device-hours
use the total. device-hours = total FLOPs / (peak FLOP/s x MFU) / 3600.

MFU default: 0.35 on GPUs, the figure reference §4.4 derives from DeepSeek-V3 itself (6·37e9·14.8e12
FLOPs in 2.664M H800-hours at 989 TFLOP/s bf16 peak). Our FLOP count also includes attention and
MTP (+19% for V3), so the same hours imply 0.41 on it: at 0.35 the V3 plan comes out ~11% above the
2.788M GPU-hours of the whole final run, erring on the expensive side. CPUs: 0.45 (tiny trains at
42-52% of this CPU's fp32 matmul peak, peer-figures.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sputnik.accounting import hardware
from sputnik.config import build, knob
from sputnik.model.accounting import flops_per_token, param_counts
from sputnik.model.config import PRESETS, ModelConfig

V3_REPORTED = dict(gpu_hours=2.788e6, pretrain_gpu_hours=2.664e6, usd_per_gpu_hour=2.0, usd=5.576e6)
GIB = 2**30

# Bytes per parameter of (weights, gradients, optimizer states) in each training recipe.
PRECISIONS = {
    "fp32": (4, 4, 8),    # fp32 master weights and grads, AdamW m, v fp32, bf16 autocast (Sputnik's default)
    "mixed": (2 + 4, 2, 8),  # bf16 working weights + fp32 master, bf16 grads, fp32 m, v (ZeRO paper's 16 B)
    "bf16": (2, 2, 4),    # everything bf16, AdamW states included (torch keeps them in the param dtype)
    "v3": (4, 4, 4),      # DeepSeek-V3 §3.3: fp32 master weights and grads, bf16 AdamW moments (fp8 copies not counted)
}


@dataclass
class PlanConfig:
    model: str = knob("tiny", "preset (" + ", ".join(PRESETS) + "), our config JSON, or a Hugging Face config.json")
    tokens: float = knob(1e9, "training tokens D (e.g. 14.8e12)", min=1.0)
    device: str = knob("h800", "device kind from the price/power/peak tables: h800, h100, h200, a100, rtx4090, cpu, ...")
    count: int = knob(1, "number of devices (for cpu: cores)", min=1)
    mfu: float = knob(0.0, "model FLOP utilisation (0 = 0.35 on GPUs, the V3-derived value; 0.45 on CPU)", min=0.0, max=1.0)
    seq_len: int = knob(4096, "training sequence length (attention FLOPs, activation memory)", min=1)
    micro_batch: int = knob(1, "sequences per device per micro-step (activation memory)", min=1)
    precision: Literal["fp32", "mixed", "bf16", "v3"] = knob("fp32", "bytes/param recipe for weights, grads, AdamW")
    mtp: bool = knob(True, "count the multi-token-prediction modules (deepseek_v3)")
    lora_rank: int = knob(0, "LoRA fine-tuning at this rank on every attention and MLP projection (dense "
                             "families): frozen base, adapters trained (0 = full training)", min=0)
    lora_base_bytes: int = knob(4, "with LoRA: bytes per frozen base weight (4 fp32, 2 bf16)", min=1, max=4)
    prices: str = knob("", "TOML/JSON file overriding hardware tables (price_usd_per_hour, power_w, peak_flops)")


# ---------------------------------------------------------------------------------------------
# Model configs from presets, our JSON, or Hugging Face config.json
_V3_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
            "topk_group", "first_k_dense_replace", "num_nextn_predict_layers", "tie_word_embeddings",
            "routed_scaling_factor", "norm_topk_prob", "rms_norm_eps", "max_position_embeddings")
def from_hf_config(d: dict) -> ModelConfig:
    """Map a transformers config.json (DeepSeek-V3/V2, or a family of model/llama.py: Llama, Mistral, Qwen2,
    Qwen3, Qwen3-MoE) to a
    ModelConfig: the same reader `--init` uses (model/hf_llama.config_from_hf), so biases, q/k norms and
    explicit head dims are counted."""
    mt = d.get("model_type") or ""
    if mt == "deepseek_v2":  # the reader --init uses (softmax routing, no MTP)
        from sputnik.model.hf import config_from_hf as deepseek_config

        return deepseek_config(d)
    if mt == "deepseek_v3":
        vals = {k: d[k] for k in _V3_KEYS if d.get(k) is not None}
        vals["q_lora_rank"] = d.get("q_lora_rank") or 0  # null = plain q_proj
        vals["num_nextn_predict_layers"] = d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0))
        return build(ModelConfig, {"architecture": "deepseek_v3", **vals})
    from sputnik.model.hf_llama import FAMILIES, NotOnFastPath, config_from_hf

    if mt in FAMILIES:
        try:
            return config_from_hf(d)
        except NotOnFastPath as e:
            raise ValueError(f"model_type={mt!r}: {e} cannot be represented") from None
    raise ValueError(f"unknown architecture: model_type={mt!r}, architectures={d.get('architectures')!r}; "
                     f"the planner maps deepseek_v3, deepseek_v2, {', '.join(FAMILIES)}")


def load_model_config(spec: str) -> tuple[ModelConfig, str]:
    """(config, where it came from) for a preset name, our saved JSON, or an HF config.json."""
    key = spec.lower().replace("_", "-")
    if key in PRESETS:
        return PRESETS[key](), f"preset {key}"
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"model {spec!r}: neither a preset ({', '.join(PRESETS)}) nor an existing file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model file {path}: expected a JSON object")
    if "model_type" in data or "architectures" in data:
        return from_hf_config(data), f"Hugging Face config {path} ({data.get('model_type')})"
    if isinstance(data.get("model"), dict):  # a saved stage config: its model section
        data = data["model"]
    return build(ModelConfig, {k: v for k, v in data.items() if k != "config_class"}), f"config {path}"


# ---------------------------------------------------------------------------------------------
def plan(cfg: PlanConfig, model: ModelConfig | None = None) -> dict:
    """Every number of the plan, in base units (FLOPs, hours, USD, joules, bytes)."""
    model, source = (model, "given") if model is not None else load_model_config(cfg.model)
    tables = hardware.load_tables(cfg.prices or None)
    dev = cfg.device.lower()
    if dev not in tables["peak_flops"]:
        raise ValueError(f"device={cfg.device!r}: no peak FLOP/s known (known: {', '.join(tables['peak_flops'])}); "
                         "add it under [peak_flops] in a --prices file")
    mfu = cfg.mfu or (0.45 if dev == "cpu" else 0.35)
    p = param_counts(model)
    f = flops_per_token(model, cfg.seq_len, training=True, include_mtp=cfg.mtp)
    if cfg.lora_rank:
        p = dict(p, lora=lora_params(model, cfg.lora_rank))
        # frozen weights: forward 2N + activation gradients 2N, no weight gradients (train/loading.flops_per_token)
        f = dict(f, matmul=f["matmul"] * 4 / 6 + 6.0 * p["lora"])
        f["total"] = f["matmul"] + f["attention"]
    total_flops = f["total"] * cfg.tokens
    n_6nd = p["active"] - p["embedding"]  # non-embedding active params, head included, no MTP
    rate = tables["peak_flops"][dev] * mfu * cfg.count  # FLOP/s the whole job sustains
    device_hours = total_flops / (tables["peak_flops"][dev] * mfu) / 3600
    price = tables["price_usd_per_hour"].get(dev, tables["price_usd_per_hour"]["gpu"])
    watts = tables["power_w"].get(dev, tables["power_w"]["gpu"])
    return dict(
        model=source, architecture=model.architecture, params=p, tokens=cfg.tokens, seq_len=cfg.seq_len,
        device=dev, count=cfg.count, peak_flops=tables["peak_flops"][dev], mfu=mfu,
        mfu_source="given" if cfg.mfu else ("cpu default 0.45" if dev == "cpu" else "DeepSeek-V3 derived 0.35"),
        flops=dict(total=total_flops, matmul=f["matmul"] * cfg.tokens, attention=f["attention"] * cfg.tokens,
                   mtp=f["mtp"] * cfg.tokens, six_n_d=6.0 * n_6nd * cfg.tokens, per_token=f["total"],
                   basis="total = matmul 6·N_active (head incl.) + causal attention + MTP; device-hours use total"),
        device_hours=device_hours, device_hours_6nd=6.0 * n_6nd * cfg.tokens / (tables["peak_flops"][dev] * mfu) / 3600,
        wall_days=total_flops / rate / 86400, price_usd_per_hour=price, money_usd=device_hours * price,
        money_usd_at_2=device_hours * 2.0, energy_j=watts * device_hours * 3600, power_w=watts,
        memory=memory_per_device(model, p, cfg), deepseek_v3_reported=V3_REPORTED,
    )


def lora_params(model: ModelConfig, rank: int) -> int:
    """Adapter parameters r·(in + out) of every attention and dense-MLP projection (train/lora.py's
    default targets) of a dense family model; a MoE layer's experts are fused tensors, not adapted."""
    if model.architecture != "llama":
        raise ValueError("lora_rank: LoRA is implemented for the dense families (Llama, Mistral, Qwen2, Qwen3)")
    D, C, I = model.hidden_size, model.attention_head_dim, model.intermediate_size
    H, K = model.num_attention_heads, model.kv_heads
    attention, mlp = (D + H * C) + 2 * (D + K * C) + (H * C + D), 2 * (D + I) + (I + D)
    dense = sum(not model.is_moe_layer(i) for i in range(model.num_hidden_layers))
    return rank * (attention * model.num_hidden_layers + mlp * dense)


def memory_per_device(model: ModelConfig, p: dict, cfg: PlanConfig) -> dict:
    """Bytes per device. Weights, grads and AdamW states at PRECISIONS[cfg.precision] bytes/param over
    all parameters (MTP included if cfg.mtp), fully sharded over `count` GPUs (FSDP / ZeRO-3; a CPU
    job's cores share one memory, so no division). Activations are a ROUGH estimate:
    34·d·s·b·L bytes per device (Korthikanti et al. 2022, bf16, no recomputation, flash attention so
    no s² term; x2 for fp32 on CPU); MoE expert buffers, MLA's latent path and pipeline/tensor
    parallel splits are ignored."""
    n = p["total_with_mtp"] if cfg.mtp else p["total"]
    shards = 1 if cfg.device.lower() == "cpu" else cfg.count
    w, g, o = (b * n / shards for b in PRECISIONS[cfg.precision])
    if cfg.lora_rank:  # frozen base at lora_base_bytes; the adapters alone have gradients and AdamW states
        a = p["lora"]
        w = (cfg.lora_base_bytes * n + PRECISIONS[cfg.precision][0] * a) / shards
        g, o = PRECISIONS[cfg.precision][1] * a / shards, PRECISIONS[cfg.precision][2] * a / shards
    layers = model.num_hidden_layers + (model.num_nextn_predict_layers if cfg.mtp and model.architecture == "deepseek_v3" else 0)
    act = 34 * model.hidden_size * cfg.seq_len * cfg.micro_batch * layers * (2 if cfg.device.lower() == "cpu" else 1)
    return dict(weights=w, grads=g, optimizer=o, activations_rough=act, total=w + g + o + act,
                precision=cfg.precision, sharded_over=shards, lora_rank=cfg.lora_rank)


# ---------------------------------------------------------------------------------------------
# CLI
def register(sub) -> None:
    p = sub.add_parser("cost", help="plan a training run: FLOPs, device-hours, days, money, energy, memory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(PlanConfig)}
    p.add_argument("model", nargs="?", default=None, help=fields["model"].metadata["help"] + " (default tiny)")
    for name, f in fields.items():
        if name == "model":
            continue
        flag, helptext = "--" + name.replace("_", "-"), f"{f.metadata['help']} (default {f.default!r})"
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            p.add_argument(flag, default=None, help=helptext.replace("%", "%%"))
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=main)


def main(args) -> int:
    values = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(PlanConfig)} and v is not None}
    result = plan(build(PlanConfig, values))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        render(result)
    return 0


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _count(x: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:,.2f}{suffix}"
    return f"{x:,.0f}"


def _usd(x: float) -> str:
    return f"${x / 1e6:,.3f}M" if x >= 1e6 else f"${x:,.2f}"


def render(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    p, f, m, ref = r["params"], r["flops"], r["memory"], r["deepseek_v3_reported"]
    t = Table(title=f"training plan: {r['model']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(style="dim")
    rows = [
        ("parameters", f"{_count(p['total'])} total / {_count(p['active'])} active",
         f"+{_count(p['mtp'])} MTP modules ({_count(p['mtp_active'])} active)" if p["mtp"] else "no MTP"),
        ("tokens", _count(r["tokens"]), f"seq len {r['seq_len']}"),
        ("training FLOPs (used)", _si(f["total"], "FLOP"), f"matmul {_si(f['matmul'])} + attention {_si(f['attention'])}"
                                                          f" (MTP share {_si(f['mtp'])})"),
        ("6·N·D alone", _si(f["six_n_d"], "FLOP"), "N = active non-embedding params, no MTP; not used below"),
        ("device", f"{r['count']} x {r['device']}", f"peak {_si(r['peak_flops'], 'FLOP/s')}, MFU {r['mfu']:.2f} ({r['mfu_source']})"),
        ("device-hours", f"{r['device_hours']:,.0f}", f"6·N·D alone: {r['device_hours_6nd']:,.0f}"),
        ("wall clock", f"{r['wall_days']:,.2f} days", f"{r['wall_days'] * 24:,.1f} hours on {r['count']} x {r['device']}"),
        ("money at table price", _usd(r["money_usd"]), f"${r['price_usd_per_hour']:.2f} per device-hour"),
        ("money at $2/GPU-hour", _usd(r["money_usd_at_2"]), "DeepSeek-V3's assumed H800 rental rate"),
        ("energy", f"{r['energy_j'] / 3.6e9:,.2f} MWh" if r["energy_j"] >= 3.6e9 else f"{r['energy_j'] / 3.6e6:,.2f} kWh", f"{r['power_w']:.0f} W per device at full power, devices only"),
        ("memory / device", f"{m['total'] / GIB:,.1f} GiB",
         f"weights {m['weights'] / GIB:,.1f} + grads {m['grads'] / GIB:,.1f} + AdamW {m['optimizer'] / GIB:,.1f} "
         f"({m['precision']}, sharded /{m['sharded_over']}) + activations ~{m['activations_rough'] / GIB:,.1f} (rough)"
         + (f"; LoRA rank {m['lora_rank']}: {_count(p['lora'])} trained parameters, the base frozen"
            if m["lora_rank"] else "")),
        ("yardstick", f"{r['device_hours'] / ref['gpu_hours']:.3g}x DeepSeek-V3",
         f"V3 reported {ref['gpu_hours'] / 1e6:.3f}M H800-hours = {_usd(ref['usd'])} at $2/GPU-hour "
         f"(pre-training {ref['pretrain_gpu_hours'] / 1e6:.3f}M), final run only"),
    ]
    for row in rows:
        t.add_row(*row)
    Console(width=160).print(t)
