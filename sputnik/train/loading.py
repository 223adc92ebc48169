"""Models and tokenizers in and out of a run: a fresh model from its config, a model directory (ours,
or any local Hugging Face causal LM), a sputnik checkpoint; export in the Hugging Face layout; the
FLOPs a model costs per token.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from sputnik import distributed as dist_lib
from sputnik.config import LoRAConfig, build, save_config
from sputnik.model.config import ModelConfig
from sputnik.model.hf_wrapper import HFCausalLM
from sputnik.train import checkpoint as ckpt_lib


def load_model(init: str, model_cfg: ModelConfig | None = None, impl: str = "auto") -> nn.Module:
    """fp32 model on CPU: fresh from model_cfg when init is '', else from `init`, a model directory
    (config.json) or a sputnik checkpoint (model.safetensors + stage_config.json); the model settings
    are then ignored, with a warning when they differ from the loaded model's, except Abacus positions
    (abacus_*), which are added to a loaded DeepSeek-V3 model that has none. A model directory of
    DeepSeek-V3 or a dense family (Llama, Mistral, Qwen2, Qwen3) loads as our own model; any other
    causal LM through transformers (a notice says so). impl "transformers" loads even our own
    architectures through AutoModelForCausalLM."""
    if not init:
        from sputnik.model import build_model

        if model_cfg is None:
            raise ValueError("no model: give init (a model directory or checkpoint) or model settings")
        return build_model(model_cfg)
    path = Path(init)
    if (path / "config.json").is_file():
        model = _load_model_dir(path, impl)
    elif (path / "model.safetensors").is_file() and (path / "stage_config.json").is_file():
        model = _load_checkpoint(path)
    else:
        raise ValueError(f"init={init!r}: neither a model directory (config.json) nor a sputnik checkpoint "
                         "(model.safetensors and stage_config.json)")
    loaded = getattr(model, "config", None)
    if model_cfg is None or model_cfg == ModelConfig() or model_cfg == loaded:
        return model
    if model_cfg.abacus_max_index:  # the one model setting a loaded model takes: a new positional option
        if not isinstance(loaded, ModelConfig) or loaded.architecture != "deepseek_v3":
            raise ValueError(f"abacus_max_index: {init} is not a deepseek_v3 model of ours (Abacus positions need one)")
        if loaded.abacus_max_index:
            warnings.warn(f"Abacus settings ignored: {init} has its own (abacus_max_index={loaded.abacus_max_index})")
        else:
            model.add_abacus(model_cfg.abacus_max_index, model_cfg.abacus_train_offset, model_cfg.abacus_digit_ids)
    if _without_abacus(model_cfg) not in (ModelConfig(), _without_abacus(loaded)):
        warnings.warn(f"model settings ignored: the architecture comes from {init}")
    return model


def _without_abacus(cfg) -> ModelConfig | None:
    if not isinstance(cfg, ModelConfig):
        return None
    return dataclasses.replace(cfg, abacus_max_index=0, abacus_train_offset=0, abacus_digit_ids=[])


def _load_model_dir(path: Path, impl: str) -> nn.Module:
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"init={path}: config.json is not valid JSON: {e}") from None
    if impl == "auto" and model_type in ("deepseek_v3", "deepseek_v2"):
        from sputnik.model.hf import load_hf

        return load_hf(path)
    if impl == "auto":
        from sputnik.model.hf_llama import NotOnFastPath, load_hf_llama

        try:
            return load_hf_llama(path)
        except NotOnFastPath as e:  # well-formed, but needs what LlamaModel lacks: transformers runs it
            print(f"notice: {path} is not on Sputnik's fast path ({e}); loading it through transformers, without "
                  "the static-cache batched decode, compiled/CUDA-graph steps, shared-prompt RL update and fused "
                  "kernels", file=sys.stderr)
        except ValueError as e:
            raise ValueError(f"init={path}: {e}") from None
    from transformers import AutoModelForCausalLM

    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for unusable dirs
        raise ValueError(f"init={path}: transformers cannot load it: {e}") from None
    return HFCausalLM(hf)


def _saved_run(path: Path) -> dict:
    try:
        return json.loads((path / "stage_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"init={path}: stage_config.json unreadable: {e}") from None


def _load_checkpoint(path: Path) -> nn.Module:
    """The model a sputnik checkpoint was trained as (its run's init and model settings), with its weights."""
    saved = _saved_run(path)
    model_dict = saved.get("model") or saved.get("student")
    model = load_model(saved.get("init", ""), build(ModelConfig, model_dict) if model_dict else None,
                       saved.get("init_impl", "auto"))
    lora = build(LoRAConfig, saved.get("lora") or {})
    if lora.rank:  # a LoRA run's checkpoint: its adapters, folded into a plain model
        from sputnik.train.lora import apply_lora

        apply_lora(model, lora)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if ckpt_lib.tensor_shapes(path / "model.safetensors") != expected:
        raise ValueError(f"init={path}: tensors do not match the model its stage_config.json describes")
    model.load_state_dict(ckpt_lib.load_tensors(path / "model.safetensors"))
    if lora.rank:
        from sputnik.train.lora import merged_copy

        return merged_copy(model)
    return model


def load_tokenizer(path: str, init: str = ""):
    """`path`, else the tokenizer saved with `init` (a model directory holds one; a checkpoint names
    its run's); ours, or any Hugging Face fast tokenizer."""
    from sputnik.tokenizer import Tokenizer

    source = path
    if not source and init:
        source = init
        if not (Path(init) / "config.json").is_file() and (Path(init) / "stage_config.json").is_file():
            saved = _saved_run(Path(init))  # a checkpoint: its run's tokenizer, or its own init's
            source = saved.get("tokenizer") or saved.get("init", "")
    if not source:
        raise ValueError("no tokenizer: pass --tokenizer DIR (from `sputnik tokenizer train`) or --init DIR")
    return Tokenizer.load_any(source)


def model_config(model: nn.Module):
    return dist_lib.unwrap(model).config


def save_model(model: nn.Module, directory: Path, tokenizer, config) -> Path:
    """Export in the Hugging Face layout (loadable by transformers and by --init), with the tokenizer
    and the run's resolved config (stage_config.json) beside it."""
    raw = dist_lib.unwrap(model)
    if isinstance(raw, HFCausalLM):
        raw.hf.save_pretrained(str(directory), safe_serialization=True)
    elif raw.config.architecture == "llama":
        from sputnik.model.hf_llama import save_hf_llama

        save_hf_llama(raw, directory)
    else:
        from sputnik.model.hf import save_hf

        save_hf(raw, directory)
    tokenizer.save(directory)
    save_config(config, directory / "stage_config.json")
    return directory


def exportable(model: nn.Module, raw: nn.Module, rank0: bool) -> nn.Module | None:
    """A plain single-device model to export: the module itself, or under FSDP2 a fresh CPU copy
    (rank 0; None elsewhere) loaded with the gathered full state dict (a collective: every rank calls)."""
    if not dist_lib.is_fsdp(model):
        return dist_lib.unwrap(model)
    state = dist_lib.model_state(model)
    if not rank0:
        return None
    if isinstance(raw, HFCausalLM):
        from transformers import AutoModelForCausalLM

        copy = HFCausalLM(AutoModelForCausalLM.from_config(raw.config))
    else:
        copy = type(raw)(raw.config)
    copy.load_state_dict(state)
    return copy


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: closed form for our configs, 6·N (+ attention) for foreign models.
    With LoRA the frozen weights need no weight gradient: their matmuls cost 4·N (forward 2N, the
    gradient of the activations 2N), the adapters 6·N_adapters; attention is unchanged."""
    cfg = model_config(model)
    if isinstance(cfg, ModelConfig):
        from sputnik.model.accounting import flops_per_token as fpt

        f = fpt(cfg, seq_len, training=True)
        adapters = sum(p.numel() for n, p in dist_lib.unwrap(model).named_parameters() if ".lora_" in n)
        if adapters:
            return f["matmul"] * 4 / 6 + f["attention"] + 6.0 * adapters
        return f["total"]
    n = sum(p.numel() for p in dist_lib.unwrap(model).parameters())
    layers, width = getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "hidden_size", 0)
    return 6.0 * n + 6.0 * layers * width * seq_len  # causal attention: 3 x 2 x 2 x L x d x T/2


def peak_flops(device: torch.device, world_size: int) -> float | None:
    """Nominal peak FLOP/s of the devices of this job (accounting/hardware.py tables); None if unknown."""
    from sputnik.accounting import hardware

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    key = hardware.device_key(device.type, name)
    per = hardware.DEFAULTS["peak_flops"].get(key)
    if per is None:
        return None
    return per * (torch.get_num_threads() if device.type == "cpu" else 1) * world_size
