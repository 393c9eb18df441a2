"""interplab.circuits: the component graph, the edge-level intervention engine, path patching, circuit discovery
(EAP, EAP-IG, ACDC) and MIB's faithfulness metrics."""

from interplab.circuits.circuit import Circuit, DiscoveryTask, Faithfulness
from interplab.circuits.discovery import acdc
from interplab.circuits.eap import (
    Attribution,
    EdgeScores,
    ScoreSign,
    attribute,
    clean_corrupted,
    eap,
    eap_circuit,
    eap_ig,
    scores_circuit,
)
from interplab.circuits.engine import Ablation, AtPositions, EdgeEngine, EngineStats, Spec, clean
from interplab.circuits.graph import ComponentGraph, Edge, Node, NodeKind, Slot
from interplab.circuits.metrics import MIB_FRACTIONS, CircuitMetrics, FaithfulnessCurve, circuit_metrics
from interplab.circuits.patching import patch_edges, patch_edges_spec, path_patch, path_patch_spec

__all__ = [
    "Ablation",
    "Attribution",
    "AtPositions",
    "Circuit",
    "CircuitMetrics",
    "ComponentGraph",
    "DiscoveryTask",
    "Edge",
    "EdgeEngine",
    "EdgeScores",
    "EngineStats",
    "Faithfulness",
    "FaithfulnessCurve",
    "MIB_FRACTIONS",
    "Node",
    "ScoreSign",
    "NodeKind",
    "Slot",
    "Spec",
    "acdc",
    "attribute",
    "circuit_metrics",
    "clean",
    "clean_corrupted",
    "eap",
    "eap_circuit",
    "eap_ig",
    "patch_edges",
    "patch_edges_spec",
    "path_patch",
    "path_patch_spec",
    "scores_circuit",
]
