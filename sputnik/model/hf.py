"""DeepSeek-V3 (and DeepSeek-V2 / V2-Lite) checkpoints in the Hugging Face layout: export (`save_hf`) and
import (`load_hf`). V2 is the same MLA + DeepSeekMoE model with softmax routing (ModelConfig.topk_method
"greedy" / "group_limited_greedy", no router bias, no MTP) and its own model_type.

Output loads with `DeepseekV3ForCausalLM.from_pretrained(dir)` (transformers 4.x and 5.x), vLLM and
SGLang; input is our own export or any HF DeepSeek-V3 checkpoint (per-expert keys as on the hub, or
the fused keys transformers 5.x writes with save_original_format=False). Reference §8.5 checklist.

In memory (ours)                                   On disk (HF)
model.layers.{i}.mlp.experts.gate_up_proj [E,2I,D] model.layers.{i}.mlp.experts.{e}.gate_proj.weight [I,D]
                                                   model.layers.{i}.mlp.experts.{e}.up_proj.weight   [I,D]
model.layers.{i}.mlp.experts.down_proj [E,D,I]     model.layers.{i}.mlp.experts.{e}.down_proj.weight [D,I]
mtp.{k−1}.*                                        model.layers.{L+k−1}.* (+ embed_tokens, shared_head.head copies)
Every other key is identical.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sputnik.config import build
from sputnik.model.config import ModelConfig
from sputnik.model.transformer import Transformer

_EXPERT_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_EXPERT_SPLIT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # MTP-layer copies of shared matrices
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Training-only knobs that HF has no field for; kept under one key so a round trip preserves them.
_SPUTNIK_ONLY = ("bias_update_speed", "seq_aux_loss_alpha", "mtp_loss_weight", "moe_impl",
                 # Abacus positions (model/abacus.py): ours only; transformers would drop the table
                 "abacus_max_index", "abacus_train_offset", "abacus_digit_ids")


# ---------------------------------------------------------------------------------------------
# config.json
def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, tokenizer_ids: dict | None = None) -> dict:
    """config.json for DeepseekV3ForCausalLM (DeepseekV2ForCausalLM for V2 routing): every field explicit
    (small configs differ from the defaults in almost all), legacy rope_theta/rope_scaling for 4.x plus
    rope_parameters for 5.x."""
    if cfg.rope_type == "yarn":
        yarn = dict(factor=cfg.rope_factor, original_max_position_embeddings=cfg.original_max_position_embeddings,
                    beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, mscale=cfg.mscale,
                    mscale_all_dim=cfg.mscale_all_dim)
        rope_scaling = {"type": "yarn", "rope_type": "yarn", **yarn}
        rope_parameters = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **yarn}
    else:
        rope_scaling, rope_parameters = None, {"rope_type": "default", "rope_theta": cfg.rope_theta}
    dtype_name = str(dtype).removeprefix("torch.")
    out = dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,  # MLA: all
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank or None, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim, n_group=cfg.n_group, topk_group=cfg.topk_group,
        num_experts_per_tok=cfg.num_experts_per_tok, first_k_dense_replace=cfg.first_k_dense_replace,
        norm_topk_prob=cfg.norm_topk_prob, hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range, rms_norm_eps=cfg.rms_norm_eps, use_cache=True,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=cfg.rope_theta, rope_scaling=rope_scaling,
        rope_parameters=rope_parameters, rope_interleave=True,  # rope.py rotates adjacent pairs
        attention_bias=False, attention_dropout=0.0, num_nextn_predict_layers=cfg.num_nextn_predict_layers,
        topk_method="noaux_tc", scoring_func="sigmoid",  # read by DeepSeek's legacy remote code
        dtype=dtype_name, torch_dtype=dtype_name,
        sputnik={k: getattr(cfg, k) for k in _SPUTNIK_ONLY},
    )
    if cfg.topk_method != "noaux_tc":  # DeepSeek-V2: softmax routing, its own class
        out.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", topk_method=cfg.topk_method)
        del out["scoring_func"]
    out.update(tokenizer_ids or {})
    return out


def config_from_hf(d: dict) -> ModelConfig:
    """ModelConfig from a DeepSeek-V3 or -V2 config.json (4.x legacy rope fields or 5.x rope_parameters)."""
    if d.get("model_type") not in ("deepseek_v3", "deepseek_v2"):
        raise ValueError(f"model_type={d.get('model_type')!r}: load_hf reads deepseek_v3 and deepseek_v2 checkpoints")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("rope_interleave", True)):
        if d.get(key, ok) != ok:
            raise ValueError(f"{key}={d[key]!r} is not supported (this model implements {key}={ok!r})")
    heads = d["num_attention_heads"]
    if d.get("num_key_value_heads") not in (None, heads):
        raise ValueError(f"num_key_value_heads={d['num_key_value_heads']} must equal "
                         f"num_attention_heads={heads} for MLA")
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    f = dict(rope_type=rope_type, rope_theta=theta)
    if rope_type == "yarn":
        if rope.get("truncate", True) is not True or rope.get("attention_factor") is not None:
            raise ValueError(f"rope_parameters={rope}: truncate=False / explicit attention_factor unsupported")
        L0 = rope.get("original_max_position_embeddings", d["max_position_embeddings"])
        # HF semantics of absent keys: factor = max_pos / L0; mscale(_all_dim) absent = 0 (= off).
        f.update(rope_factor=rope.get("factor") or d["max_position_embeddings"] / L0,
                 original_max_position_embeddings=L0, beta_fast=rope.get("beta_fast") or 32.0,
                 beta_slow=rope.get("beta_slow") or 1.0, mscale=rope.get("mscale") or 0.0,
                 mscale_all_dim=rope.get("mscale_all_dim") or 0.0)
    elif rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r}: supported default, yarn")
    eos = d.get("eos_token_id", 1)
    copy = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "kv_lora_rank",
            "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "num_experts_per_tok", "first_k_dense_replace",
            "norm_topk_prob", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings")
    f.update({k: d[k] for k in copy if d.get(k) is not None})
    f.update(q_lora_rank=d.get("q_lora_rank") or 0, n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
             num_nextn_predict_layers=d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0,
             topk_method=("noaux_tc" if d["model_type"] == "deepseek_v3" else d.get("topk_method") or "greedy"),
             bos_token_id=d.get("bos_token_id") or 0, eos_token_id=(eos[0] if isinstance(eos, list) else eos) or 0,
             pad_token_id=d.get("pad_token_id") or 0)  # pad None (HF default): ours is export-only anyway
    f.update({k: v for k, v in (d.get("sputnik") or {}).items() if k in _SPUTNIK_ONLY})
    return build(ModelConfig, f)


# ---------------------------------------------------------------------------------------------
# State dicts
def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict in the on-disk layout: per-expert keys, MTP as layers L+k−1 with copies of
    the shared embedding/head. Fresh contiguous tensors (safetensors refuses shared storage)."""
    cfg, L = model.config, model.config.num_hidden_layers
    out = {}
    for key, t in model.state_dict().items():
        if key.startswith("mtp."):
            k, rest = key[len("mtp."):].split(".", 1)
            key = f"model.layers.{L + int(k)}.{rest}"
        m = _EXPERT_FUSED.match(key)
        if m and m[2] == "gate_up_proj":
            I = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{m[1]}.{e}.gate_proj.weight"] = t[e, :I].clone()
                out[f"{m[1]}.{e}.up_proj.weight"] = t[e, I:].clone()
        elif m:
            for e in range(t.shape[0]):
                out[f"{m[1]}.{e}.down_proj.weight"] = t[e].clone()
        elif not (key == "lm_head.weight" and cfg.tie_word_embeddings):  # HF re-ties on load
            out[key] = t.detach().clone().contiguous()
    for k in range(cfg.num_nextn_predict_layers):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
        out[f"model.layers.{L + k}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return out


def from_hf_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-layout tensors -> our keys: fuse per-expert weights (fused keys pass through), map layers
    >= L to `mtp.*`, drop the MTP copies of the shared matrices, re-tie lm_head when tied."""
    L, out, split = cfg.num_hidden_layers, {}, {}
    for key, t in tensors.items():
        m = _LAYER.match(key)
        if m and int(m[1]) >= L:
            if m[2] in _COPIES:
                continue
            key = f"mtp.{int(m[1]) - L}.{m[2]}"
        s = _EXPERT_SPLIT.match(key.replace("mtp.", "model.layers.", 1) if key.startswith("mtp.") else key)
        if s:
            prefix = key[: key.index(".experts.") + len(".experts")]
            split.setdefault(prefix, {})[(int(s[2]), s[3])] = t
        else:
            out[key] = t
    for prefix, parts in split.items():
        def get(e, name):
            if (e, name) not in parts:
                raise ValueError(f"missing key {prefix}.{e}.{name}.weight")
            return parts[(e, name)]
        E = cfg.n_routed_experts
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([get(e, "gate_proj"), get(e, "up_proj")])
                                                     for e in range(E)])  # rows [gate; up] per expert
        out[f"{prefix}.down_proj"] = torch.stack([get(e, "down_proj") for e in range(E)])
        if extra := sorted(k for k in parts if k[0] >= E):
            raise ValueError(f"unexpected key {prefix}.{extra[0][0]}.{extra[0][1]}.weight (n_routed_experts={E})")
    if cfg.tie_word_embeddings and "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


# ---------------------------------------------------------------------------------------------
# Directories
def save_hf(model: Transformer, path: str | os.PathLike, tokenizer_ids: dict | None = None) -> Path:
    """Write model.safetensors + config.json into `path`, atomically: everything goes to a sibling
    temp dir that replaces `path` by rename (files of `path` we do not write, a tokenizer say, are
    carried over by hard link). A killed save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.with_name(f".{path.name}.tmp-{os.getpid()}"), path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ours = {"model.safetensors", "config.json", "model.safetensors.index.json"}
    if path.is_dir():
        for f in path.iterdir():
            if f.is_file() and f.name not in ours and not f.name.startswith("model-"):
                os.link(f, tmp / f.name)
    dtype = model.lm_head.weight.dtype
    if model.config.abacus_max_index:
        warnings.warn(f"{path}: this model uses Abacus positions, a Sputnik option: Sputnik loads it whole, but "
                      "transformers and the tools built on it would skip model.abacus_embed.weight and compute "
                      "different logits")
    save_file(to_hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config(model.config, dtype, tokenizer_ids), indent=2) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    tensors = {}
    for name in files:
        if not (path / name).exists():
            raise ValueError(f"{path / name} not found (expected a safetensors checkpoint)")
        with safe_open(str(path / name), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def load_hf(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Transformer:
    """Transformer from an HF DeepSeek-V3 directory. Parameters are kept in fp32 unless `dtype`
    is given; router biases stay fp32. Missing, unexpected or mis-shaped keys raise ValueError."""
    path = Path(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    tensors = _read_tensors(path)
    L = cfg.num_hidden_layers
    has_mtp = any((m := _LAYER.match(k)) and int(m[1]) >= L for k in tensors)
    if cfg.num_nextn_predict_layers and not has_mtp:
        # transformers' own save_pretrained never writes MTP weights (its model has none).
        warnings.warn(f"{path}: config has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the "
                      "checkpoint holds no MTP layers; loading without MTP")
        cfg = build(ModelConfig, {**cfg.__dict__, "num_nextn_predict_layers": 0})
    model = Transformer(cfg)
    ours = from_hf_state_dict(tensors, cfg)
    expected = model.state_dict()
    for key in expected:
        if key not in ours:
            raise ValueError(f"missing key {key} in {path}")
    for key, t in ours.items():
        if key not in expected:
            raise ValueError(f"unexpected key {key} in {path}")
        if t.shape != expected[key].shape:
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(t.shape)}, "
                             f"model {tuple(expected[key].shape)}")
    model.load_state_dict(ours, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model
