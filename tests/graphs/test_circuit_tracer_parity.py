"""Parity with circuit-tracer 0.5.0 (PyPI, its own interpreter: ``bash scripts/peers.sh circuittracer``, or
``INTERPLAB_CIRCUITTRACER_PYTHON``; skipped with the reason without it, required in CI): on the same small model
and the same transcoders (JumpReLU cross-layer and per-layer transcoders, reading ``resid_mid`` or
``ln2.hook_normalized``, handed over as interplab's `save_clt` folder or in either of circuit-tracer's layouts
written by `export_transcoders`; LayerNorm and RMSNorm models), `interplab.graphs.attribute` finds
the same active features with the same activations, the same target logits and probabilities, the same
adjacency (to 1e-4), and `prune_graph` keeps the same nodes and edges with circuit-tracer's default thresholds
(0.8 / 0.98); the replacement and completeness scores agree, and the Neuronpedia JSON has the same nodes and
links (circuit-tracer 0.5.0 spells error ids ``0_{layer}_{pos}``, which collides with layer-0 feature ids: its
issue #78; interplab writes the upstream fix ``{layer}_-1_{pos}``, and so does the runner, patching 0.5.0).

The model is exported with tests/circuit_tracer_peer.py (a TransformerLens checkpoint) and circuit-tracer runs
in tests/circuit_tracer_runner.py, one process per case for all its prompts. Prompts start
with the special token circuit-tracer expects (it ignores position 0: no features, zero errors; so does
interplab). Weights are random and sizeable (`randomize`), the transcoders calibrated so that about a third of
the latents fire, with thresholds above 0 (JumpReLU's strict ``>`` matters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from interplab.graphs.attribution import NodeKind, attribute
from interplab.graphs.export import to_neuronpedia_json
from interplab.graphs.prune import graph_scores, prune_graph
from interplab.graphs.replacement import ReplacementModel
from interplab.model import ModelConfig, Transformer
from interplab.sae.clt import CLTConfig, CrossLayerTranscoder
from tests.circuit_tracer_peer import run_circuit_tracer
from tests.model.model_variants import randomize
from tests.peers import peer_python

BOS = 0
PROMPTS = ([BOS, 5, 9, 13, 5, 9, 21, 7], [BOS, 3, 3, 17, 30, 3, 17])
ATOL = RTOL = 1e-4


def small_model(normalization: str = "layernorm") -> Transformer:
    cfg = ModelConfig(
        d_model=32,
        n_layers=3,
        n_heads=4,
        d_mlp=64,
        d_vocab=40,
        n_ctx=16,
        act_fn="gelu",
        normalization=normalization,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    randomize(model)
    return model.eval()


def calibrated_clt(
    model: Transformer, *, cross_layer: bool, hook_in: str, d_sae: int = 16
) -> CrossLayerTranscoder:
    """A random JumpReLU (C)LT for ``model`` whose encoders see unit-scale pre-activations on PROMPTS (about a
    third of the latents above the 0.25 threshold) and whose decoders write at the MLP outputs' scale."""
    n = model.cfg.n_layers
    clt = CrossLayerTranscoder(
        CLTConfig(
            n_layers=n, d_model=model.cfg.d_model, d_sae=d_sae, cross_layer=cross_layer, hook_in=hook_in
        )
    )
    names = [hook_in.format(layer=layer) for layer in range(n)] + [
        f"blocks.{layer}.hook_mlp_out" for layer in range(n)
    ]
    _, cache = model.run_with_cache(torch.tensor([PROMPTS[0]]), names=names)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in range(n):
            x_norm = cache[names[layer]].norm(dim=-1).mean()
            out_norm = cache[names[n + layer]].norm(dim=-1).mean()
            clt.W_enc[layer].copy_(torch.randn(model.cfg.d_model, d_sae, generator=g) / x_norm)
            clt.b_enc[layer].copy_(0.2 * torch.randn(d_sae, generator=g))
            clt.threshold[layer].fill_(0.25)
            dec = clt.W_dec[layer]
            dec.copy_(torch.randn(dec.shape, generator=g) * out_norm / (d_sae * model.cfg.d_model) ** 0.5)
            clt.b_dec[layer].copy_(
                0.1 * out_norm / model.cfg.d_model**0.5 * torch.randn(model.cfg.d_model, generator=g)
            )
    return clt


JOBS: list[dict[str, Any]] = [
    {"tokens": PROMPTS[0], "targets": None},  # top-10 by probability, cut at 0.95
    {"tokens": PROMPTS[1], "targets": [4, 17, 30]},
    # a feature budget: circuit-tracer visits features by partial influence, re-ranked every 4 batches
    {"tokens": PROMPTS[0], "targets": None, "max_feature_nodes": 20, "batch_size": 8},
]
CASES = {
    # name: (normalization, cross_layer, hook_in, how the transcoders reach circuit-tracer: interplab's save_clt
    # folder as it is (None), or tests/circuit_tracer_peer.export_transcoders in that layout)
    "clt": ("layernorm", True, "blocks.{layer}.hook_resid_mid", None),
    "plt": ("layernorm", False, "blocks.{layer}.hook_resid_mid", None),
    "clt_ln2_export": ("layernorm", True, "blocks.{layer}.ln2.hook_normalized", "cross_layer_transcoder"),
    "plt_ln2_rms_export": ("rmsnorm", False, "blocks.{layer}.ln2.hook_normalized", "transcoder_set"),
}


@pytest.fixture(scope="module")
def peer_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per case (computed once, when first asked): the model, the transcoders and circuit-tracer's results of
    JOBS (one peer process per case, writing its Neuronpedia JSON files under the case's folder)."""
    tmp = tmp_path_factory.mktemp("circuit_tracer")

    class Cases(dict):
        def __missing__(
            self, name: str
        ) -> tuple[Transformer, CrossLayerTranscoder, list[dict[str, Any]], Path]:
            normalization, cross_layer, hook_in, layout = CASES[name]
            model = small_model(normalization)
            clt = calibrated_clt(model, cross_layer=cross_layer, hook_in=hook_in)
            jobs = [
                {**job, "graph_dir": str(tmp / name / f"json{i}"), "slug": f"job{i}"}
                for i, job in enumerate(JOBS)
            ]
            python = peer_python("circuittracer")
            self[name] = (
                model,
                clt,
                run_circuit_tracer(python, model, clt, tmp / name, jobs, bos=BOS, kind=layout),
                tmp / name,
            )
            return self[name]

    return Cases()


@pytest.fixture(
    params=[(name, job) for name in sorted(CASES) for job in range(len(JOBS))], ids="{0[0]}-job{0[1]}".format
)
def pair(request: pytest.FixtureRequest, peer_results: dict[str, Any]) -> dict[str, Any]:
    """One (case, job): interplab's graph and circuit-tracer's result for it."""
    name, job = request.param
    model, clt, results, folder = peer_results[name]
    spec = JOBS[job]
    budget = {k: spec[k] for k in ("max_feature_nodes", "batch_size") if k in spec}
    tokens = torch.tensor(spec["tokens"])
    graph = attribute(model, clt, tokens, targets=spec["targets"], **budget)
    json_file = folder / f"json{job}" / f"job{job}.json"
    return {
        "model": model,
        "tokens": tokens,
        "graph": graph,
        "theirs": results[job],
        "json": json_file,
        "job": job,
    }


def test_same_edges_as_circuit_tracer(pair: dict[str, Any]) -> None:
    model, tokens, graph, theirs = pair["model"], pair["tokens"], pair["graph"], pair["theirs"]

    # the exported model is the same model
    torch.testing.assert_close(
        torch.tensor(theirs["logits"]), model(tokens[None])[0, -1], atol=1e-5, rtol=1e-5
    )

    # active features and their activations, in circuit-tracer's (layer, position, feature) order
    features = [n for n in graph.nodes if n.kind is NodeKind.FEATURE]
    selected = [theirs["active_features"][i] for i in theirs["selected_features"]]
    assert len(selected) >= 20, "the calibration should make a graph worth comparing"
    assert [[n.layer, n.position, n.feature] for n in features] == selected
    torch.testing.assert_close(
        torch.tensor([n.value for n in features]),
        torch.tensor(theirs["activation_values"])[theirs["selected_features"]],
        atol=1e-5,
        rtol=1e-5,
    )

    # target logits and their weights
    logits = [n for n in graph.nodes if n.kind is NodeKind.LOGIT]
    assert [n.feature for n in logits] == theirs["logit_targets"]
    torch.testing.assert_close(
        torch.tensor([t.weight for t in graph.targets]),
        torch.tensor(theirs["logit_probabilities"]),
        atol=1e-6,
        rtol=1e-5,
    )

    # every edge, in the same node order (features, errors, embeddings, logits)
    assert len(graph.nodes) == theirs["n_nodes"]
    adjacency = torch.tensor(theirs["adjacency"])
    assert adjacency.abs().max() > 0.1
    torch.testing.assert_close(graph.adjacency.float(), adjacency, atol=ATOL, rtol=RTOL)


def test_same_pruning_and_json_as_circuit_tracer(pair: dict[str, Any]) -> None:
    graph, theirs, job = pair["graph"], pair["theirs"], pair["job"]

    # pruning with circuit-tracer's defaults keeps the same nodes and edges
    pruned = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    assert pruned.node_mask.tolist() == theirs["node_mask"]
    assert pruned.edge_mask.nonzero().tolist() == theirs["edge_mask"]
    assert 0 < sum(theirs["node_mask"]) < len(graph.nodes)

    scores = graph_scores(graph)
    assert scores["replacement"] == pytest.approx(theirs["replacement"], abs=1e-5)
    assert scores["completeness"] == pytest.approx(theirs["completeness"], abs=1e-5)

    # the Neuronpedia JSON: same nodes (ids, kinds, activations) and links (weights)
    ours_json = to_neuronpedia_json(graph, pruned, slug=f"job{job}")
    theirs_json = json.loads(pair["json"].read_text())
    _same_neuronpedia(ours_json, theirs_json)


def _same_neuronpedia(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert ours["qParams"]["pinnedIds"] == [] and ours["qParams"]["supernodes"] == []
    assert len(ours["metadata"]["prompt_tokens"]) == len(theirs["metadata"]["prompt_tokens"])
    fields = ("feature", "layer", "ctx_idx", "feature_type", "is_target_logit")
    mine = {n["node_id"]: n for n in ours["nodes"]}
    other = {n["node_id"]: n for n in theirs["nodes"]}
    assert set(mine) == set(other)
    for node_id, node in other.items():
        assert {f: mine[node_id][f] for f in fields} == {f: node[f] for f in fields}, node_id
        for f in ("activation", "token_prob", "influence"):
            if node.get(f) is None:
                assert mine[node_id].get(f) is None, (node_id, f)
            else:
                assert mine[node_id][f] == pytest.approx(node[f], abs=1e-4), (node_id, f)
    links = {(ln["source"], ln["target"]): ln["weight"] for ln in ours["links"]}
    other_links = {(ln["source"], ln["target"]): ln["weight"] for ln in theirs["links"]}
    assert set(links) == set(other_links)
    for key, weight in other_links.items():
        assert links[key] == pytest.approx(weight, abs=ATOL, rel=RTOL), key


def test_negative_thresholds_are_where_the_jumprelus_differ(tmp_path: Path) -> None:
    """circuit-tracer 0.5's JumpReLU is ``pre * (pre > threshold)`` (its ``activation_functions.jumprelu``),
    interplab's is SAELens' ``ReLU(pre) * (pre > threshold)``: the same wherever the threshold is >= 0, which
    interplab's training keeps (and every case above uses); below 0, circuit-tracer also keeps the negative
    pre-activations in ``(threshold, 0]`` as active features with negative activations, exactly those."""
    model = small_model()
    clt = calibrated_clt(model, cross_layer=True, hook_in="blocks.{layer}.hook_resid_mid")
    with torch.no_grad():
        clt.threshold[:, ::2] = -0.25
    job = {"tokens": PROMPTS[0], "targets": None, "graph_dir": str(tmp_path / "json"), "slug": "neg"}
    theirs = run_circuit_tracer(
        peer_python("circuittracer"), model, clt, tmp_path, [job], bos=BOS, kind=None
    )[0]
    tokens = torch.tensor(PROMPTS[0])
    graph = attribute(model, clt, tokens, targets=None)
    ours = {(n.layer, n.position, n.feature) for n in graph.nodes if n.kind is NodeKind.FEATURE}
    run = ReplacementModel(model, clt).run(tokens[None])
    with torch.no_grad():
        pre = clt.pre_acts(run.feature_inputs)[0]  # pos layer d_sae
    between = (pre > clt.threshold) & (pre <= 0)
    between[0] = False  # position 0 holds no features in either
    extra = {(int(layer), int(p), int(f)) for p, layer, f in torch.nonzero(between).tolist()}
    assert extra and not extra & ours
    active = [tuple(a) for a in theirs["active_features"]]
    assert set(active) == ours | extra
    values = torch.tensor(theirs["activation_values"])
    for i, (layer, p, f) in enumerate(active):
        if (layer, p, f) in extra:
            torch.testing.assert_close(values[i], pre[p, layer, f], atol=1e-5, rtol=1e-5)
