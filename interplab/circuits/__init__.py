"""interplab.circuits: the component graph, the edge-level intervention engine, path patching, EAP and ACDC."""

from interplab.circuits.circuit import Circuit, DiscoveryTask, Faithfulness
from interplab.circuits.discovery import EdgeScores, acdc, eap, eap_circuit
from interplab.circuits.engine import Ablation, AtPositions, EdgeEngine, EngineStats, Spec, clean
from interplab.circuits.graph import ComponentGraph, Edge, Node, NodeKind, Slot
from interplab.circuits.patching import patch_edges, patch_edges_spec, path_patch, path_patch_spec

__all__ = [
    "Ablation",
    "AtPositions",
    "Circuit",
    "ComponentGraph",
    "DiscoveryTask",
    "Edge",
    "EdgeEngine",
    "EdgeScores",
    "EngineStats",
    "Faithfulness",
    "Node",
    "NodeKind",
    "Slot",
    "Spec",
    "acdc",
    "clean",
    "eap",
    "eap_circuit",
    "patch_edges",
    "patch_edges_spec",
    "path_patch",
    "path_patch_spec",
]
