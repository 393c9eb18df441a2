"""Training dynamics: the local learning coefficient (SGLD), per-component LLCs, susceptibilities, and the
chains' convergence diagnostics (R-hat, ESS)."""

from interplab.dynamics.llc import (
    Component,
    LLCConvergenceWarning,
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
from interplab.dynamics.mcmc import ChainDiagnostics, diagnose, ess_bulk, ess_tail, rhat

__all__ = [
    "ChainDiagnostics",
    "Component",
    "LLCConvergenceWarning",
    "LLCEstimate",
    "SGLDConfig",
    "SGLDDivergence",
    "Susceptibility",
    "diagnose",
    "ess_bulk",
    "ess_tail",
    "estimate_llc",
    "head_component",
    "layer_component",
    "lm_loss",
    "mse_loss",
    "rhat",
    "susceptibility",
]
