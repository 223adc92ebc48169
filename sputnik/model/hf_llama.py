"""The dense families' Hugging Face checkpoints: Llama (SmolLM2), Mistral, Qwen2/2.5, Qwen3, in and out.

Our module names are HF's, so the state dict is written as is: no rename table. The files are
`model.safetensors` (metadata format=pt, as `save_pretrained` writes; a tied head is omitted, as HF
omits it) and `config.json` in the family's own `model_type` and fields (RoPE both as
`rope_parameters`, the transformers 5.x form, and as top-level `rope_theta`/`rope_scaling` for 4.x
readers), so the export loads in transformers and the tools that read its layout with no conversion.
`load_hf_llama` reads what `save_pretrained` writes, sharded (`model.safetensors.index.json`) or not.
A config that needs what LlamaModel does not implement raises `NotOnFastPath` (train/loading.py then
wraps the checkpoint through transformers); a malformed one raises ValueError naming the key.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sputnik.config import build
from sputnik.model.config import ModelConfig
from sputnik.model.llama import LlamaModel

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# ModelConfig fields that are config.json fields of the same name and meaning (copied both ways).
_SHARED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "initializer_range",
                  "bos_token_id", "eos_token_id", "pad_token_id")
# Keys older transformers versions saved that carry no weights (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class NotOnFastPath(ValueError):
    """A well-formed checkpoint that needs something LlamaModel does not implement."""


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
def _rope_parameters(cfg: ModelConfig) -> dict:
    out = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        out["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.original_max_position_embeddings)
    return out


def hf_llama_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict `AutoModelForCausalLM.from_pretrained` expects for `cfg` (its family's class)."""
    rope = _rope_parameters(cfg)
    out = {k: getattr(cfg, k) for k in _SHARED_FIELDS}
    out.update(
        architectures=[FAMILIES[cfg.family]], model_type=cfg.family, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.attention_head_dim, hidden_act="silu", attention_dropout=0.0, use_cache=True,
        rope_theta=cfg.rope_theta, rope_parameters=rope,
        rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_type != "default" else None,
        dtype=str(dtype).removeprefix("torch."),
    )
    L = cfg.num_hidden_layers
    out.update({
        "llama": dict(attention_bias=cfg.qkv_bias, mlp_bias=False, pretraining_tp=1),
        "mistral": dict(sliding_window=cfg.sliding_window or None),
        "qwen2": dict(use_sliding_window=False, sliding_window=None, max_window_layers=L),
        "qwen3": dict(attention_bias=cfg.qkv_bias, use_sliding_window=False, sliding_window=None, max_window_layers=L),
        "qwen3_moe": dict(attention_bias=cfg.qkv_bias, use_sliding_window=False, sliding_window=None,
                          max_window_layers=L, num_experts=cfg.n_routed_experts,
                          num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
                          norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
                          mlp_only_layers=list(cfg.mlp_only_layers), router_aux_loss_coef=cfg.router_aux_loss_coef,
                          output_router_logits=cfg.router_aux_loss_coef > 0),
    }[cfg.family])
    return out


def _has_experts(cfg: ModelConfig) -> bool:
    return any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


def _first_id(value, name: str):
    """HF allows None or a list for token ids (eos lists in chat models); we keep one int."""
    if isinstance(value, list):
        value = value[0] if value else None
    if value is not None and (not isinstance(value, int) or value < 0):
        raise ValueError(f"config.json {name}={value!r}: expected a non-negative int")
    return value


def _rope_from_hf(hf: dict) -> dict:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config.json rope_parameters={rope!r}: expected an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3", "linear"):
        raise NotOnFastPath(f"RoPE type {rope_type!r} (implemented: default, llama3, linear)")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise NotOnFastPath("partial_rotary_factor != 1")
    out = dict(rope_type=rope_type, rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    try:
        if rope_type in ("linear", "llama3"):
            out["rope_factor"] = float(rope["factor"])
        if rope_type == "llama3":
            out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    except KeyError as e:
        raise ValueError(f"config.json rope_parameters: {rope_type} RoPE needs {e.args[0]!r}") from None
    return out


def config_from_hf(hf: dict) -> ModelConfig:
    """config.json dict -> ModelConfig(architecture="llama", family=model_type). NotOnFastPath for a
    family or option LlamaModel does not implement, ValueError for a malformed config."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise NotOnFastPath(f"model_type {family!r} (fast path: {', '.join(FAMILIES)})")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise ValueError(f"config.json {key}={hf.get(key)!r}: expected a positive int")
    if hf.get("hidden_act", "silu") != "silu":
        raise NotOnFastPath(f"hidden_act={hf['hidden_act']!r} (implemented: silu)")
    if hf.get("mlp_bias"):
        raise NotOnFastPath("mlp_bias=true")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise NotOnFastPath(f"{family} with use_sliding_window=true (per-layer windows)")
    if family == "mistral" and hf.get("layer_types"):
        raise NotOnFastPath("mistral with per-layer layer_types")
    values = {k: hf[k] for k in _SHARED_FIELDS if hf.get(k) is not None}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in values and (v := _first_id(values.pop(k), k)) is not None:
            values[k] = v
    derived = hf["hidden_size"] // hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or derived
    bias = bool(hf.get("attention_bias", False))
    values.update(
        architecture="llama", family=family, num_nextn_predict_layers=0,
        num_key_value_heads=hf.get("num_key_value_heads") or 0,
        head_dim=0 if head_dim == derived and hf["hidden_size"] % hf["num_attention_heads"] == 0 else head_dim,
        qkv_bias={"qwen2": True, "mistral": False}.get(family, bias),
        o_proj_bias=False if family in ("qwen2", "mistral") else bias,
        qk_norm=family in ("qwen3", "qwen3_moe"),
        sliding_window=(hf.get("sliding_window") or 0) if family == "mistral" else 0,
        **_rope_from_hf(hf),
    )
    if family == "qwen3_moe":
        if "num_experts" not in hf and "num_local_experts" in hf:  # transformers 5's name for it
            hf = {**hf, "num_experts": hf["num_local_experts"]}
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if not isinstance(hf.get(key), int) or hf[key] < 1:
                raise ValueError(f"config.json {key}={hf.get(key)!r}: expected a positive int")
        values.update(n_routed_experts=hf["num_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                      moe_intermediate_size=hf["moe_intermediate_size"],
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                      decoder_sparse_step=hf.get("decoder_sparse_step") or 1,
                      mlp_only_layers=list(hf.get("mlp_only_layers") or []),
                      # transformers adds the balance loss only with output_router_logits
                      router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0)
                      if hf.get("output_router_logits") else 0.0)
    try:
        return build(ModelConfig, values)
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None


# ---------------------------------------------------------------------------------------------
# Save
def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_hf_llama(model: LlamaModel, path: str | os.PathLike) -> Path:
    """Write `model` as a checkpoint directory of its HF family (LlamaForCausalLM, ...); returns the path.

    Files are written and fsynced in a temp directory beside `path`, then renamed: a new directory
    appears whole or not at all. Into an existing directory each file is renamed over its old
    version (weights first, config.json last), so files others put there (a tokenizer) survive.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    if _has_experts(model.config):  # experts per expert on disk, as on the hub (hf.py's mapping)
        from sputnik.model.hf import to_hf_state_dict

        state = to_hf_state_dict(model)
    else:
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # one tensor, stored once under its embedding name (as HF does)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    dtype = model.model.embed_tokens.weight.dtype
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_llama_config(model.config, dtype), indent=2, sort_keys=True) + "\n")
        for name in ("model.safetensors", "config.json"):
            _fsync(tmp / name)
        if not path.exists():
            os.replace(tmp, path)
            return path
        for name in ("model.safetensors", "config.json"):
            os.replace(tmp / name, path / name)
        # A stale shard index from an earlier sharded save would shadow the new single file.
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------
# Load
def _read_state(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    elif index.exists():
        files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                if not k.endswith(_IGNORED_SUFFIXES):
                    state[k] = sf.get_tensor(k)
    return state


def load_state_strict(model: LlamaModel, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `model` (casting dtype). ValueError naming every missing, unexpected or
    mis-shaped key; a tied head may be absent, and if present must equal the embedding."""
    own = model.state_dict()
    tied = model.config.tie_word_embeddings
    if tied and "lm_head.weight" in state:
        if not torch.equal(state["lm_head.weight"], state.get("model.embed_tokens.weight", torch.empty(0))):
            raise ValueError("tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    required = set(own) - ({"lm_head.weight"} if tied else set())
    missing, unexpected = sorted(required - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {shapes}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def load_hf_llama(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LlamaModel:
    """Build a LlamaModel from an HF checkpoint directory of a dense family (ours or `save_pretrained`'s).
    Weights are cast to `dtype` (fp32 master weights by default, whatever the file holds)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path}: no config.json")
    try:
        hf = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'}: not valid JSON: {e}") from None
    cfg = config_from_hf(hf)
    with torch.device("meta"):  # no random init of weights about to be overwritten
        model = LlamaModel(cfg)
    model.to_empty(device="cpu").to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty() unties
    model.rotary.reset()
    state = _read_state(path)
    if _has_experts(cfg):  # per-expert hub keys (or transformers 5's fused ones) -> our fused tensors
        from sputnik.model.hf import from_hf_state_dict

        state = from_hf_state_dict(state, cfg)
    load_state_strict(model, state)
    return model
