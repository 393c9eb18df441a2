"""The nodes of an attribution graph and its targets (shared by the graph, its files, JSON and pictures)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import Tensor


class NodeKind(str, Enum):
    FEATURE = "feature"
    ERROR = "error"
    EMBEDDING = "embedding"
    LOGIT = "logit"


@dataclass(frozen=True)
class Node:
    """One node of an attribution graph. ``feature``: the latent index (features), the token id (embeddings
    and logits; a logit difference's first token), None for errors. ``value``: a feature's activation, a
    logit's probability (its weight in pruning), an error vector's norm; None for embeddings."""

    kind: NodeKind
    layer: int | None
    position: int
    feature: int | None
    value: float | None

    def node_id(self, n_layers: int) -> str:
        """The Neuronpedia / circuit-tracer node id (errors as ``{layer}_-1_{pos}``, circuit-tracer's fix of its
        issue #78)."""
        if self.kind is NodeKind.FEATURE:
            return f"{self.layer}_{self.feature}_{self.position}"
        if self.kind is NodeKind.ERROR:
            return f"{self.layer}_-1_{self.position}"
        if self.kind is NodeKind.EMBEDDING:
            return f"E_{self.feature}_{self.position}"
        return f"{n_layers + 1}_{self.feature}_{self.position}"


@dataclass(frozen=True)
class Target:
    """A target logit: ``vector`` [d_model] is its read-out of ln_final's output at the last position."""

    label: str
    token: int
    weight: float
    """its weight in pruning (the probability of a token; 1 for a logit difference)"""
    vector: Tensor
    token_b: int | None = None
    """a logit difference's second token"""
    text: str = ""
    """the token as text (the label of a logit difference)"""
