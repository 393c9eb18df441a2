"""The model: configuration, the hooked `Transformer`, loading, weight processing and generation."""

from interplab.model.config import Activation, ModelConfig, Norm, Positional, QKNorm, RotaryStyle
from interplab.model.kv_cache import KVCache
from interplab.model.transformer import Transformer

__all__ = [
    "Activation",
    "KVCache",
    "ModelConfig",
    "Norm",
    "Positional",
    "QKNorm",
    "RotaryStyle",
    "Transformer",
]
