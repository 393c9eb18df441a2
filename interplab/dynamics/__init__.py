"""Training dynamics: the local learning coefficient (SGLD), per-component LLCs, susceptibilities, and the
chains' convergence diagnostics (R-hat, ESS), and an exact (Metropolis-corrected) HMC reference sampler of the
same target."""

from interplab.dynamics.hmc import HMCConfig, HMCEstimate, LowAcceptanceWarning, estimate_llc_hmc
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
    "HMCConfig",
    "HMCEstimate",
    "LLCConvergenceWarning",
    "LLCEstimate",
    "LowAcceptanceWarning",
    "SGLDConfig",
    "SGLDDivergence",
    "Susceptibility",
    "diagnose",
    "ess_bulk",
    "ess_tail",
    "estimate_llc",
    "estimate_llc_hmc",
    "head_component",
    "layer_component",
    "lm_loss",
    "mse_loss",
    "rhat",
    "susceptibility",
]
