"""interplab.circuits: the component graph, the edge-level intervention engine, path patching, EAP and ACDC."""

from interplab.circuits.engine import Ablation, EdgeEngine, EngineStats, Spec, clean
from interplab.circuits.graph import ComponentGraph, Edge, Node, NodeKind, Slot
from interplab.circuits.patching import patch_edges, patch_edges_spec, path_patch, path_patch_spec

__all__ = [
    "Ablation",
    "ComponentGraph",
    "Edge",
    "EdgeEngine",
    "EngineStats",
    "Node",
    "NodeKind",
    "Slot",
    "Spec",
    "clean",
    "patch_edges",
    "patch_edges_spec",
    "path_patch",
    "path_patch_spec",
]
