"""Export/import of the dense `LlamaModel` in the Hugging Face `LlamaForCausalLM` layout.

Our module names are HF's, so the state dict is written as is: no rename table. The files are
`model.safetensors` (metadata format=pt, as `save_pretrained` writes; a tied head is omitted, as HF
omits it) and `config.json` (LlamaConfig fields; `rope_theta` both inside `rope_parameters`, the
transformers 5.x form, and at top level for 4.x readers). `load_hf_llama` also reads what
`LlamaForCausalLM.save_pretrained` writes, sharded (`model.safetensors.index.json`) or not.
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

# ModelConfig fields that are LlamaConfig fields of the same name and meaning (copied both ways).
_SHARED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "initializer_range",
                  "bos_token_id", "eos_token_id", "pad_token_id")
# Keys older transformers versions saved that carry no weights (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
def hf_llama_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict `LlamaForCausalLM.from_pretrained` expects for `cfg`."""
    out = {k: getattr(cfg, k) for k in _SHARED_FIELDS}
    out.update(
        architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", attention_bias=False, attention_dropout=0.0, mlp_bias=False,
        pretraining_tp=1, use_cache=True, rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        dtype=str(dtype).removeprefix("torch."),
    )
    return out


def _first_id(value, name: str):
    """HF allows None or a list for token ids (eos lists in chat models); we keep one int."""
    if isinstance(value, list):
        value = value[0] if value else None
    if value is not None and (not isinstance(value, int) or value < 0):
        raise ValueError(f"config.json {name}={value!r}: expected a non-negative int")
    return value


def config_from_hf(hf: dict) -> ModelConfig:
    """config.json dict -> ModelConfig(architecture="llama"); ValueError for what we cannot build."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"config.json model_type={hf.get('model_type')!r}: expected 'llama'")
    unsupported = {"hidden_act": ("silu", None), "attention_bias": (False, None), "mlp_bias": (False, None)}
    for key, allowed in unsupported.items():
        if hf.get(key) not in allowed:
            raise ValueError(f"config.json {key}={hf.get(key)!r}: LlamaModel supports only {allowed[0]!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json rope type {rope.get('rope_type', rope.get('type'))!r}: only 'default' RoPE")
    head_dim = hf.get("head_dim")
    if head_dim not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        raise ValueError(f"config.json head_dim={head_dim}: LlamaModel needs hidden_size/num_attention_heads="
                         f"{hf['hidden_size'] // hf['num_attention_heads']}")
    values = {k: hf[k] for k in _SHARED_FIELDS if hf.get(k) is not None}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in values and (v := _first_id(values.pop(k), k)) is not None:
            values[k] = v
    values["num_key_value_heads"] = hf.get("num_key_value_heads") or 0
    values["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    return build(ModelConfig, dict(values, architecture="llama", num_nextn_predict_layers=0))


# ---------------------------------------------------------------------------------------------
# Save
def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_hf_llama(model: LlamaModel, path: str | os.PathLike) -> Path:
    """Write `model` as an HF LlamaForCausalLM checkpoint directory; returns the path.

    Files are written and fsynced in a temp directory beside `path`, then renamed: a new directory
    appears whole or not at all. Into an existing directory each file is renamed over its old
    version (weights first, config.json last), so files others put there (a tokenizer) survive.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
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
    """Build a LlamaModel from an HF Llama checkpoint directory (ours or `save_pretrained`'s).
    Weights are cast to `dtype` (fp32 master weights by default, whatever the file holds)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path}: no config.json")
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    model = LlamaModel(cfg).to(dtype)
    load_state_strict(model, _read_state(path))
    return model
