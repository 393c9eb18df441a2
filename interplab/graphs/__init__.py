"""Attribution graphs (issue 17): the replacement model of a prompt built from a (cross-layer) transcoder,
the direct-effect graph among its active features, errors, tokens and target logits, pruning and scores,
circuit-tracer / Neuronpedia graph JSON, and interventions that validate a graph. See docs/graphs.md.

>>> from interplab.sae.clt import CLTConfig, CrossLayerTranscoder
>>> clt = CrossLayerTranscoder(CLTConfig(n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, d_sae=64))
>>> graph = attribute(model, clt, tokens[0], targets=3)
>>> pruned = prune_graph(graph)
>>> graph.save("graph", pruned).name
'graph'
"""

from interplab.graphs.across import (
    GraphChange,
    GraphsAcross,
    GraphStep,
    compare_graphs,
    graphs_across,
    induction_edge,
    match_features,
)
from interplab.graphs.attribution import AttributionGraph, attribute, choose_targets, estimate_bytes
from interplab.graphs.export import GraphJSON, from_neuronpedia_json, to_neuronpedia_json
from interplab.graphs.interventions import Intervention, InterventionResult, intervene, predict, supernode
from interplab.graphs.nodes import Node, NodeKind, Target
from interplab.graphs.prune import PrunedGraph, graph_scores, prune_graph
from interplab.graphs.qk import QKAttribution, QKPair, qk_attribution
from interplab.graphs.replacement import ReplacementModel, ReplacementRun

__all__ = [
    "AttributionGraph",
    "GraphChange",
    "GraphStep",
    "GraphsAcross",
    "compare_graphs",
    "graphs_across",
    "induction_edge",
    "match_features",
    "GraphJSON",
    "Intervention",
    "InterventionResult",
    "Node",
    "NodeKind",
    "PrunedGraph",
    "QKAttribution",
    "QKPair",
    "ReplacementModel",
    "ReplacementRun",
    "Target",
    "attribute",
    "choose_targets",
    "estimate_bytes",
    "from_neuronpedia_json",
    "graph_scores",
    "intervene",
    "predict",
    "prune_graph",
    "qk_attribution",
    "supernode",
    "to_neuronpedia_json",
]
