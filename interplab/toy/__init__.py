"""Toy models of superposition (Elhage et al. 2022): many ReLU output models trained in one tensor, their
geometry (W^T W, norms, dimensionality, capacity), the sparsity-importance phase diagram, and SAEs on the
hidden layer scored against the true features."""

from interplab.toy.analysis import PhaseDiagram, ToyAnalysis, analyze, phase_diagram
from interplab.toy.model import ToyConfig, ToyModel, train_toy
from interplab.toy.sae import ToySAEResult, toy_sae

__all__ = [
    "PhaseDiagram",
    "ToyAnalysis",
    "ToyConfig",
    "ToyModel",
    "ToySAEResult",
    "analyze",
    "phase_diagram",
    "toy_sae",
    "train_toy",
]
