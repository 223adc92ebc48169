"""LoRA (Hu et al., 2021): train a low-rank update of chosen linear layers, the base weights frozen.

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ,    A [r, in] ~ Kaiming-uniform,  B [out, r] = 0,  s = alpha / r

so the model starts exactly as the base. Only A and B are trained (and held by the optimizer): the
gradients and Adam moments of the frozen weights, most of full fine-tuning's memory, are never
allocated. Decoding (rollouts, evaluation: any forward without autograd) uses the merged weight
W + s·B·A, computed once per update and kept until A or B changes (their version counters), so the
engine's fast path runs the same number of matmuls as for the base model; the frozen W is never
modified, so nothing drifts and a resumed run is bit-exact. On a GPU the frozen weights may be kept
in bf16 (`base_dtype`); A and B and the merged product stay in the compute path's dtype.

Export: the merged model in the base's own layout (train/loading.save_model), and the adapter in the
PEFT format (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight`) that peft, transformers and vLLM load onto the base.
Implemented for the dense families (model/llama.py), whose every projection is an nn.Linear; our
DeepSeek-V3 decodes from derived copies of its weights (absorbed MLA, fused experts), which a LoRA
would have to refresh too, and is refused with a clear error.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sputnik.config import LoRAConfig
from sputnik.model.layers import linear


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`/`bias` keys, frozen) plus `lora_A` [r, in] and `lora_B` [out, r]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, base_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        dtype = base_dtype or base.weight.dtype
        self.weight = nn.Parameter(base.weight.detach().to(dtype), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        self.rank, self.scaling = rank, alpha / rank
        adapter_dtype = base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=adapter_dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=adapter_dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of A
        self._merged: tuple[tuple, torch.Tensor] | None = None

    def delta_weight(self) -> torch.Tensor:
        """s · B A, [out, in]."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def merged_weight(self) -> torch.Tensor:
        """W + s·B·A in the adapters' dtype, cached until W, A or B changes (optimizer steps bump
        their version counters: train/optim._bump_versions)."""
        key = (self.weight._version, self.lora_A._version, self.lora_B._version, self.lora_A.device, self.lora_A.dtype)
        if self._merged is None or self._merged[0] != key:
            with torch.no_grad():
                self._merged = (key, self.weight.to(self.lora_A.dtype) + self.delta_weight())
        return self._merged[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not torch.is_grad_enabled():  # decoding, scoring: one matmul with the merged weight
            return linear(x, self.merged_weight().to(x.dtype), bias)
        self._merged = None  # training: free the merged copy (the step will change A and B anyway)
        y = F.linear(x, self.weight.to(x.dtype), bias)
        return y + self.scaling * F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


# ---------------------------------------------------------------------------------------------
def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and replace each targeted nn.Linear by a LoRALinear (in
    place); returns the adapted module names. ValueError when the model is not a dense family model
    or no module matches."""
    from sputnik.model.llama import LlamaModel

    if not isinstance(model, LlamaModel):
        raise ValueError(f"lora.rank={cfg.rank}: LoRA is implemented for the dense families (Llama, Mistral, "
                         f"Qwen2, Qwen3), not {type(model).__name__}; train it fully (lora.rank=0)")
    base_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.base_dtype]
    model.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and \
                name.rsplit(".", 1)[-1] in cfg.targets and name != "lm_head":
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, cfg.rank, cfg.alpha, base_dtype))
            adapted.append(name)
    if not adapted:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora.targets={cfg.targets}: no linear layer of the model matches (its linear layers: {names})")
    return adapted


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of `model` with every adapter folded into its weight (W + s·B·A, in the adapter
    dtype) and the LoRALinear modules back to nn.Linear: what exports in the base's layout."""
    out = copy.deepcopy(model)
    for name, m in lora_modules(out).items():
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                           dtype=m.lora_A.dtype)
        with torch.no_grad():
            linear.weight.copy_(m.weight.to(m.lora_A.dtype) + m.delta_weight())
            if m.bias is not None:
                linear.bias.copy_(m.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name), child, linear)
    out.requires_grad_(True)
    return out


# ---------------------------------------------------------------------------------------------
# The PEFT adapter format
def save_peft_adapter(model: nn.Module, cfg: LoRAConfig, path: str | os.PathLike, base_model: str = "") -> Path:
    """adapter_config.json + adapter_model.safetensors as peft's save_pretrained writes them, atomically
    (a temp directory renamed into place)."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in mods.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().to("cpu").contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().to("cpu").contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
              "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}), "modules_to_save": None,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True}
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_peft_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Apply a PEFT LoRA adapter directory to `model` (a dense family model of the adapter's base):
    wraps its target modules and copies A and B. ValueError for other adapter types or keys that do
    not fit."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: no readable adapter_config.json: {e}") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{path}: only plain LoRA adapters load here (peft_type={config.get('peft_type')!r})")
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    lcfg = LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=targets)
    apply_lora(model, lcfg)
    tensors = load_file(path / "adapter_model.safetensors")
    mods = lora_modules(model)
    expected = {f"base_model.model.{n}.lora_{p}.weight" for n in mods for p in "AB"}
    if set(tensors) != expected:
        raise ValueError(f"{path}: adapter keys do not fit the model: missing {sorted(expected - set(tensors))[:3]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:3]}")
    with torch.no_grad():
        for n, m in mods.items():
            for part, param in (("A", m.lora_A), ("B", m.lora_B)):
                t = tensors[f"base_model.model.{n}.lora_{part}.weight"]
                if t.shape != param.shape:
                    raise ValueError(f"{path}: {n}.lora_{part} is {tuple(t.shape)}, the model needs {tuple(param.shape)}")
                param.copy_(t)
    return list(mods)
