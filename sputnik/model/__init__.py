"""The DeepSeek-V3 architecture and a dense Llama twin: single-device PyTorch, HF key names."""
from sputnik.model.config import ModelConfig

__all__ = ["ModelConfig"]
