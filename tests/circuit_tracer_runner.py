"""circuit-tracer 0.5.0's attribution graph of a model and transcoders handed over as files; runs under the
peer's interpreter (``bash scripts/peers.sh circuittracer`` builds ``.peers/circuittracer``), never imported by
the suite except for `PeakRSS` (its top level imports only the standard library).

    .peers/circuittracer/bin/python tests/circuit_tracer_runner.py SPEC.json

SPEC (written by `tests.circuit_tracer_peer.run_circuit_tracer` or ``benchmarks/bench_graphs.py``):

- ``model``: a folder with a TransformerLens state dict ``model.pt`` and ``transformerlens_config.json``
  (`tests.autocircuit_peer.export_transformer_lens` of an interplab `Transformer`);
- ``transcoders``: ``{"path", "kind": "transcoder_set" | "cross_layer_transcoder", "feature_input_hook",
  "feature_output_hook", "topk": k | null}``: a folder in circuit-tracer's layout (``layer_{i}.safetensors``, or
  ``W_enc_{i}``/``W_dec_{i}.safetensors``; research notes /work/wt/research/circuit_tracer.md section 1).
  circuit-tracer loads JumpReLU (a ``threshold``) and ReLU from files; ``topk`` swaps in its `TopK` module;
- ``bos``: the special token id the prompts start with (circuit-tracer keeps a prompt that starts with a
  special token as it is, and ignores position 0: no features, zero errors);
- ``jobs``: each ``{"tokens": [ids], "targets": [ids] | null, "max_n_logits", "desired_logit_prob",
  "batch_size", "max_feature_nodes", "node_threshold", "edge_threshold", "dense": bool, "repeats": int,
  "graph_dir": folder | null, "slug", "out": path}``;
- ``fix_error_ids`` (default true): write error node ids as ``{layer}_-1_{pos}`` (circuit-tracer's fix of its
  issue #78, after 0.5.0; 0.5.0's ``0_{layer}_{pos}`` collides with layer-0 feature ids).

Each job runs `circuit_tracer.attribute` ``repeats`` times (>= 1; after a warm-up call when ``repeats`` > 1),
prunes with `prune_graph`, scores with `compute_graph_scores`, optionally writes the Neuronpedia JSON with
`create_graph_files` into ``graph_dir``, and writes ``out``: versions; ``n_layers``, ``n_pos``; the real model's
last-position ``logits``; ``active_features`` [[layer, pos, feature]] with ``activation_values`` and
``selected_features``; ``logit_targets`` (token ids) and ``logit_probabilities``; ``adjacency`` (rows = targets,
columns = sources, circuit-tracer's node order; only when ``dense``); ``node_mask``, ``edge_mask`` (kept
[target, source] pairs), ``cumulative_scores``; ``replacement``, ``completeness``; ``times`` (wall and CPU
seconds of each timed `attribute` call) and ``memory`` (`PeakRSS` of the first call: the process's peak
resident memory during it and its resident memory before, in MiB).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

_BUFFERS = ("mask", "IGNORE")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """The peak resident memory of this process while the ``with`` block runs, in MiB (``peak``, and ``before``
    the block): ``ru_maxrss`` when the block raised it (exact), else the maximum of samples taken every
    millisecond by a thread (the block stayed under an earlier peak)."""

    def __enter__(self) -> PeakRSS:
        self.before = _rss_mib()
        self._max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self._sampled = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, _rss_mib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak = max_after if max_after > self._max_before else max(self._sampled, _rss_mib())

    def as_dict(self) -> dict[str, float]:
        return {"peak_mib": self.peak, "before_mib": self.before, "extra_mib": self.peak - self.before}


def _tokenizer(folder: Path, d_vocab: int, bos: int):
    """A word-level HF tokenizer over ``d_vocab`` ids (``t{i}``, ``<bos>`` at ``bos``), saved in ``folder`` so
    `AutoTokenizer` (TransformerLens, `create_graph_files`) loads it offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {("<bos>" if i == bos else f"t{i}"): i for i in range(d_vocab)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<bos>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {name: "<bos>" for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    PreTrainedTokenizerFast(tokenizer_object=word_level, **special).save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def _transcoders(spec: dict[str, Any]):
    import torch
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    path, kind = Path(spec["path"]), spec["kind"]
    hooks = {
        "feature_input_hook": spec["feature_input_hook"],
        "feature_output_hook": spec["feature_output_hook"],
    }
    cpu = torch.device("cpu")
    if kind == "transcoder_set":
        files = {int(f.stem.split("_")[1]): str(f) for f in path.glob("layer_*.safetensors")}
        tc = load_transcoder_set(
            files,
            scan="interplab",
            device=cpu,
            dtype=torch.float32,
            lazy_encoder=False,
            lazy_decoder=False,
            **hooks,
        )
        layers = list(tc)
    elif kind == "cross_layer_transcoder":
        tc = load_clt(
            str(path), scan="interplab", device=cpu, dtype=torch.float32, lazy_decoder=False, **hooks
        )
        layers = [tc]
    else:
        raise ValueError(f"transcoders kind {kind!r}; valid: transcoder_set, cross_layer_transcoder")
    if spec.get("topk"):
        for module in layers:
            module.activation_function = TopK(int(spec["topk"]))
    return tc


def _model(folder: Path, transcoders, tokenizer_dir: Path, bos: int, **cfg_changes: Any):
    import torch
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from transformer_lens import HookedTransformerConfig

    cfg = json.loads((folder / "transformerlens_config.json").read_text())
    tokenizer = _tokenizer(tokenizer_dir, cfg["d_vocab"], bos)
    cfg.update(tokenizer_name=str(tokenizer_dir), device="cpu", dtype=torch.float32, **cfg_changes)
    model = TransformerLensReplacementModel(HookedTransformerConfig(**cfg), tokenizer=tokenizer)
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[-1] not in _BUFFERS]
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit the TransformerLens model: missing {missing}, unexpected {unexpected}"
        )
    model.eval()
    # what from_config does after building the model: wrap MLPs and unembed, freeze patterns and norm scales
    model._configure_replacement_model(transcoders)
    return model


def _fix_error_ids() -> None:
    """circuit-tracer 0.5.0 names error nodes ``0_{layer}_{pos}``, the id of feature ``layer`` of layer 0 at the
    same position (its issue #78): a JSON with both is ambiguous. Apply the upstream fix (PR #102, after 0.5.0):
    ``{layer}_-1_{pos}``; the other fields stay 0.5.0's."""
    from circuit_tracer.frontend.graph_models import Node

    original = Node.error_node.__func__

    def error_node(cls, layer, pos, influence=None):  # noqa: ANN001, ANN202
        node = original(cls, layer, pos, influence=influence)
        return node.model_copy(update={"node_id": f"{layer}_-1_{pos}"})

    Node.error_node = classmethod(error_node)


def run_job(model, job: dict[str, Any]) -> dict[str, Any]:
    import importlib.metadata as md

    import torch
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.utils import create_graph_files

    tokens = torch.tensor(job["tokens"], dtype=torch.long)
    targets = job.get("targets")
    kwargs = {
        "attribution_targets": None if targets is None else torch.tensor(targets, dtype=torch.long),
        "max_n_logits": job.get("max_n_logits", 10),
        "desired_logit_prob": job.get("desired_logit_prob", 0.95),
        "batch_size": job.get("batch_size", 512),
        "max_feature_nodes": job.get("max_feature_nodes"),
    }
    repeats = max(1, int(job.get("repeats", 1)))
    times, memory = [], None
    for i in range(repeats + (repeats > 1)):
        wall, cpu = time.perf_counter(), time.process_time()
        with PeakRSS() as rss:
            graph = attribute(tokens, model, **kwargs)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        memory = memory or rss.as_dict()
        if repeats == 1 or i > 0:
            times.append({"wall_s": wall, "cpu_s": cpu})
    node_t, edge_t = job.get("node_threshold", 0.8), job.get("edge_threshold", 0.98)
    pruned = prune_graph(graph, node_t, edge_t)
    replacement, completeness = compute_graph_scores(graph)
    if job.get("graph_dir"):
        create_graph_files(graph, slug=job.get("slug", "graph"), output_path=os.path.abspath(job["graph_dir"]),
                           scan="interplab", node_threshold=node_t, edge_threshold=edge_t)  # fmt: skip
    with torch.no_grad():
        logits = model(tokens[None])[0, -1]
    out = {
        "circuit_tracer": md.version("circuit-tracer"),
        "transformer_lens": md.version("transformer-lens"),
        "n_layers": model.cfg.n_layers,
        "n_pos": len(tokens),
        "logits": logits.tolist(),
        "active_features": graph.active_features.tolist(),
        "activation_values": graph.activation_values.tolist(),
        "selected_features": graph.selected_features.tolist(),
        "logit_targets": [int(t.vocab_idx) for t in graph.logit_targets],
        "logit_probabilities": graph.logit_probabilities.tolist(),
        "node_mask": pruned.node_mask.tolist(),
        "edge_mask": pruned.edge_mask.nonzero().tolist(),
        "cumulative_scores": pruned.cumulative_scores.tolist(),
        "replacement": replacement,
        "completeness": completeness,
        "times": times,
        "memory": memory,
        "n_nodes": graph.adjacency_matrix.shape[0],
    }
    if job.get("dense", True):
        out["adjacency"] = graph.adjacency_matrix.tolist()
    return out


def main(spec_path: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("fix_error_ids", True):
        _fix_error_ids()
    work = Path(spec_path).parent
    changes = {"use_hook_mlp_in": True} if spec["transcoders"]["feature_input_hook"] == "hook_mlp_in" else {}
    tc = _transcoders(spec["transcoders"])
    model = _model(Path(spec["model"]), tc, work / "tokenizer", int(spec["bos"]), **changes)
    for job in spec["jobs"]:
        result = run_job(model, job)
        tmp = Path(job["out"]).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(job["out"])
    model.reset_hooks(including_permanent=True)


if __name__ == "__main__":
    main(sys.argv[1])
