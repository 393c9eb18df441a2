"""Sparse autoencoders: architectures (one file each, registered), activation stores, training, evaluation,
and SAELens-compatible files.

>>> from interplab.sae import SAEConfig, create_sae, load_sae
>>> sae = create_sae(SAEConfig(d_in=64, d_sae=512, architecture="topk", k=8, hook_name="blocks.0.hook_resid_post"))
"""

from interplab.sae.base import SAE, SAEOutput
from interplab.sae.config import Architecture, DType, Normalization, Reshape, SAEConfig
from interplab.sae.io import SAEFormatError, load_sae, save_sae
from interplab.sae.registry import create_sae, register_architecture, registered_architectures, sae_class

__all__ = [
    "SAE",
    "SAEOutput",
    "Architecture",
    "DType",
    "Normalization",
    "Reshape",
    "SAEConfig",
    "SAEFormatError",
    "load_sae",
    "save_sae",
    "create_sae",
    "register_architecture",
    "registered_architectures",
    "sae_class",
]
