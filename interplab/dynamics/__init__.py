"""Training dynamics: the local learning coefficient (SGLD), per-component LLCs, susceptibilities."""

from interplab.dynamics.llc import (
    Component,
    LLCEstimate,
    SGLDConfig,
    SGLDDivergence,
    Susceptibility,
    estimate_llc,
    head_component,
    layer_component,
    lm_loss,
    mse_loss,
    susceptibility,
)

__all__ = [
    "Component",
    "LLCEstimate",
    "SGLDConfig",
    "SGLDDivergence",
    "Susceptibility",
    "estimate_llc",
    "head_component",
    "layer_component",
    "lm_loss",
    "mse_loss",
    "susceptibility",
]
