"""Sparse autoencoders: architectures (one file each, registered), activation stores, training (`train_saes`;
a family of SAEs from one pass: `plan_sweep` + `train_sweep`), evaluation, and SAELens-compatible files;
crosscoders (`interplab.sae.crosscoder`, model diffing: `interplab.sae.diffing`) and cross-layer transcoders
(`interplab.sae.clt`). `load_dictionary` loads any of the three by what its folder is.

>>> from interplab.sae import SAEConfig, create_sae, load_sae
>>> sae = create_sae(SAEConfig(d_in=64, d_sae=512, architecture="topk", k=8, hook_name="blocks.0.hook_resid_post"))
"""

from interplab.sae.base import SAE, SAEOutput, TrainStep
from interplab.sae.config import Architecture, DType, Normalization, Reshape, SAEConfig
from interplab.sae.dictionary import Dictionary, describe_dictionary, load_dictionary
from interplab.sae.io import SAEFormatError, load_sae, save_sae
from interplab.sae.registry import create_sae, register_architecture, registered_architectures, sae_class
from interplab.sae.sweep import SAESweepConfig, parse_sweep, plan_sweep, sae_name, train_sweep
from interplab.sae.train import SAETrainConfig, SAETrainProgress, SAETrainResult, train_saes

__all__ = [
    "SAE",
    "SAEOutput",
    "TrainStep",
    "Architecture",
    "DType",
    "Normalization",
    "Reshape",
    "SAEConfig",
    "SAEFormatError",
    "load_sae",
    "save_sae",
    "Dictionary",
    "describe_dictionary",
    "load_dictionary",
    "create_sae",
    "register_architecture",
    "registered_architectures",
    "sae_class",
    "SAESweepConfig",
    "parse_sweep",
    "plan_sweep",
    "sae_name",
    "train_sweep",
    "SAETrainConfig",
    "SAETrainProgress",
    "SAETrainResult",
    "train_saes",
]
