"""The measured peak memory of one attribution graph and its pruning, in a fresh process (run as a script: it
prints one JSON line). The peak is the kernel's resident high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` after a warm-up graph) minus the resident memory before the graph; Linux only.

    python -m tests.graphs.memory_probe '{"model": "tiny", "length": 12, "d_sae": 256}'
    python -m tests.graphs.memory_probe '{"model": "bench", "length": 64}'

``tiny``: the 2-layer ``gpt2`` test variant with a random CLT whose features fire about half the time (the
adjacency dominates); ``bench``: benchmarks/bench_graphs.py's model and CLT."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch


def _status(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"{field}:\s+(\d+) kB", text)
    assert match is not None, f"no {field} in /proc/self/status"
    return int(match.group(1)) * 1024


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from interplab.graphs import attribute, estimate_bytes, prune_graph

    torch.manual_seed(0)
    torch.set_num_threads(1)
    if spec["model"] == "bench":
        from benchmarks.bench_graphs import build, prompt

        model, clt = build()
        tokens = prompt(spec["length"], seed=spec["length"])
        targets = None
    else:
        from tests.graphs.helpers import random_clt, variant_model

        model = variant_model("gpt2")
        clt = random_clt(model, d_sae=spec.get("d_sae", 256))
        tokens = torch.randint(0, model.cfg.d_vocab, (spec["length"],))
        targets = 3
    kw = {"max_feature_nodes": spec.get("max_feature_nodes"), "batch_size": spec.get("batch_size", 256)}
    prune_graph(attribute(model, clt, tokens[:4], targets=targets, **kw))  # warm-up: first-call allocations
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = _status("VmRSS")
    graph = attribute(model, clt, tokens, targets=targets, **kw)
    pruned = prune_graph(graph)
    peak = _status("VmHWM") - before
    cfg = model.cfg
    n_features = graph.n_features
    estimate = estimate_bytes(
        graph.n_pos,
        n_features,
        cfg.n_layers,
        cfg.d_model,
        graph.n_logits,
        graph.meta["batch_size"],
        n_active=graph.meta["n_active_features"],
        itemsize=graph.adjacency.element_size(),
    )
    return {
        "length": graph.n_pos,
        "n_features": n_features,
        "n_nodes": len(graph.nodes),
        "batch": graph.meta["batch_size"],
        "kept_nodes": pruned.n_nodes,
        "measured_bytes": peak,
        "estimate_bytes": estimate,
        "estimate_over_measured": estimate / peak,
    }


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
