"""Sputnik: train reasoning language models the frugal DeepSeek way, and know what it cost."""
__version__ = "0.1.0"
