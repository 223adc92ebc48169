"""The DeepSeek-V3 architecture and a dense Llama twin: single-device PyTorch, HF key names."""
from torch import nn

from sputnik.model.config import ModelConfig
from sputnik.model.transformer import Transformer


def build_model(cfg: ModelConfig) -> nn.Module:
    """DeepSeek-V3 `Transformer` for architecture deepseek_v3, the dense `LlamaModel` for llama."""
    if cfg.architecture == "deepseek_v3":
        return Transformer(cfg)
    if cfg.architecture == "llama":
        from sputnik.model.llama import LlamaModel  # lazy: the DeepSeek path never needs it

        return LlamaModel(cfg)
    raise ValueError(f"architecture={cfg.architecture!r}: allowed deepseek_v3, llama")


__all__ = ["ModelConfig", "Transformer", "build_model"]
