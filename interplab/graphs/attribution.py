"""Attribution graphs: the direct linear effects, in the replacement model of one prompt, between active
features (per position), error nodes, token embeddings and target logits (circuit-tracer 0.5's definitions).

``adjacency[target, source]`` is the value vector of the source (``a_s W_dec[s -> m]`` summed over the MLP
outputs m it writes, an error vector, a token embedding) dotted with the gradient, through the frozen
replacement model, of the target's read-out: a feature's pre-activation without its bias (``W_enc[t] . x``) or
a logit minus the mean logit (``(W_U[:, t] - mean_v W_U[:, v]) . ln_final(x)[last]``). Gradients flow through
the residual stream, attention's value/output path with frozen patterns and the norms with frozen scales, never
through an MLP (its output is an input of the linear forward). Positional embeddings and biases are constants,
not nodes. Features at position 0 are not nodes (its errors are zero), as in circuit-tracer.

Node order (rows = columns): active features sorted by (layer, position, feature), errors (layer-major), token
embeddings (by position), logits (the targets, in order).

One batched backward computes up to ``batch_size`` rows: the linear forward runs once, and its vector-Jacobian
product is vmapped over the rows' cotangents (the read-out vector of each target at its own place), so no row
needs a forward of its own.

>>> from interplab.sae.clt import CLTConfig, CrossLayerTranscoder
>>> clt = CrossLayerTranscoder(CLTConfig(n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, d_sae=64))
>>> graph = attribute(model, clt, tokens[0], targets=3)
>>> graph.n_logits, graph.adjacency.shape[0] == len(graph.nodes)
(3, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.graphs.nodes import Node, NodeKind, Target
from interplab.graphs.plots import graph_figure
from interplab.graphs.prune import PrunedGraph, prune_graph
from interplab.graphs.replacement import CLTLike, ReplacementModel, ReplacementRun
from interplab.graphs.store import read_graph, read_masks, save_graph
from interplab.model.transformer import Transformer

if TYPE_CHECKING:
    import plotly.graph_objects as go


@dataclass(frozen=True)
class AttributionGraph:
    """The unpruned graph of one prompt (see the module docstring). Prune with `interplab.graphs.prune_graph`."""

    nodes: list[Node]
    adjacency: Float[Tensor, "node node"]
    """``adjacency[target, source]``: the direct effect of source on target"""
    tokens: Int[Tensor, " pos"]
    n_layers: int
    targets: list[Target]
    token_strings: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    """where it came from (model, clt, feature_db) and the settings it was computed with"""

    # ---- the node blocks ----------------------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_logits(self) -> int:
        return len(self.targets)

    @property
    def n_features(self) -> int:
        return len(self.nodes) - (self.n_layers + 1) * self.n_pos - self.n_logits

    @property
    def error_slice(self) -> slice:
        start = self.n_features
        return slice(start, start + self.n_layers * self.n_pos)

    @property
    def token_slice(self) -> slice:
        start = self.n_features + self.n_layers * self.n_pos
        return slice(start, start + self.n_pos)

    @property
    def logit_slice(self) -> slice:
        return slice(len(self.nodes) - self.n_logits, len(self.nodes))

    @property
    def logit_weights(self) -> Float[Tensor, " node"]:
        """The pruning weights: each target's weight on its logit node, 0 elsewhere."""
        w = torch.zeros(len(self.nodes), dtype=self.adjacency.dtype)
        w[self.logit_slice] = torch.tensor([t.weight for t in self.targets], dtype=self.adjacency.dtype)
        return w

    def error_index(self, layer: int, position: int) -> int:
        return self.n_features + layer * self.n_pos + position

    def token_index(self, position: int) -> int:
        return self.token_slice.start + position

    def feature_index(self, layer: int, position: int, feature: int) -> int:
        """The node index of an active feature (a clear error when it is not active there)."""
        for i, node in enumerate(self.nodes[: self.n_features]):
            if (node.layer, node.position, node.feature) == (layer, position, feature):
                return i
        raise KeyError(f"feature {feature} of layer {layer} is not active at position {position}")

    def node_ids(self) -> list[str]:
        return [node.node_id(self.n_layers) for node in self.nodes]

    # ---- files and pictures -------------------------------------------------------------------
    def save(self, path: str | Path, pruned: PrunedGraph | None = None, *, slug: str | None = None) -> Path:
        """Write the run folder (kind ``attribution_graph``): graph.safetensors, graph.json (Neuronpedia's
        schema, the pruned graph) and report.json (scores, sizes, settings)."""
        return save_graph(self, path, pruned, slug=slug)

    @classmethod
    def load(cls, path: str | Path) -> AttributionGraph:
        """The graph `save` wrote into ``path`` (its exact inverse)."""
        parts = read_graph(path)
        return cls(
            parts.nodes,
            parts.adjacency,
            parts.tokens,
            parts.n_layers,
            parts.targets,
            parts.token_strings,
            parts.meta,
        )

    @staticmethod
    def load_pruned(path: str | Path) -> PrunedGraph:
        """The pruning a saved graph's graph.json shows (its masks; the cumulative influence recomputed)."""
        node_mask, edge_mask, node_t, edge_t = read_masks(path)
        again = prune_graph(AttributionGraph.load(path), node_t, edge_t)
        return PrunedGraph(node_mask, edge_mask, again.cumulative_influence, node_t, edge_t)

    def plot(self, pruned: PrunedGraph | None = None) -> go.Figure:
        """The (pruned) graph laid out by position (x) and layer (y), edges coloured by sign."""
        return graph_figure(self, pruned)

    def __repr__(self) -> str:
        return (
            f"AttributionGraph({self.n_pos} tokens, {self.n_features} features, {self.n_logits} targets, "
            f"{len(self.nodes)} nodes)"
        )


# ---- targets --------------------------------------------------------------------------------------
Targets = int | Sequence[int] | Sequence[str] | tuple[str, int, int] | None


def choose_targets(
    model: Transformer,
    logits: Float[Tensor, " d_vocab_out"],
    targets: Targets,
    desired_logit_prob: float = 0.95,
) -> list[Target]:
    """The target logits: None or k (top k by probability, default 10, cut where the cumulative probability
    reaches ``desired_logit_prob``), token ids (or one-token strings), or ``("logit_diff", a, b)``."""
    dtype = torch.promote_types(logits.dtype, torch.float32)  # a half-precision model's targets in float32
    probs = torch.softmax(logits.double(), dim=-1).to(dtype)
    W_U = model.W_U.detach().to(dtype)
    mean = W_U.mean(dim=1)
    vocab = W_U.shape[1]

    def text(token: int) -> str:
        tok = model.tokenizer
        return str(tok.decode([token])) if tok is not None else str(token)

    def check(token: int) -> int:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise ValueError(
                f"target token {token!r} is not in the vocabulary: valid ids are 0 .. {vocab - 1}"
            )
        return token

    if isinstance(targets, tuple) and len(targets) == 3 and targets[0] == "logit_diff":
        a, b = check(int(targets[1])), check(int(targets[2]))
        label = f"logit({text(a)!r}) - logit({text(b)!r})"
        return [Target(label, a, 1.0, W_U[:, a] - W_U[:, b], token_b=b, text=label)]
    if targets is None or (isinstance(targets, int) and not isinstance(targets, bool)):
        k = 10 if targets is None else targets
        if k < 1:
            raise ValueError(f"targets={k}: ask for at least one logit")
        top = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(top.values, dim=0)
        n = min(int(torch.searchsorted(cumulative, desired_logit_prob)) + 1, k, vocab)
        chosen = [int(t) for t in top.indices[:n]]
    else:
        chosen = []
        items: Sequence[int | str] = targets  # type: ignore[assignment]  # a list of ids or texts here
        for t in items:
            if isinstance(t, str):
                if model.tokenizer is None:
                    raise ValueError(f"target {t!r} is text, but the model has no tokenizer: give token ids")
                ids = model.to_tokens(t)[0].tolist()
                if len(ids) != 1:
                    raise ValueError(f"target {t!r} is {len(ids)} tokens ({ids}); a target is one token")
                t = ids[0]
            chosen.append(check(int(t) if not isinstance(t, int) else t))
        if not chosen:
            raise ValueError("targets is an empty list: give at least one token id")
    return [Target(f"logit({text(t)!r})", t, float(probs[t]), W_U[:, t] - mean, text=text(t)) for t in chosen]


# ---- memory ---------------------------------------------------------------------------------------
def estimate_bytes(
    n_pos: int,
    n_features: int,
    n_layers: int,
    d_model: int,
    n_logits: int,
    batch: int,
    *,
    n_active: int | None = None,
    itemsize: int = 4,
) -> int:
    """The peak memory of `attribute` and then `prune_graph` on its graph, in bytes (``itemsize`` 4: float32),
    an upper bound of the measured peak resident memory within about 20% (tests/graphs/test_memory.py,
    docs/graphs.md). The largest of three phases, each with what they all hold:

    - held throughout: each active feature's decoder vectors into the layers it writes and its encoder row;
      a batched backward's live ``[batch, pos, d_model]`` tensors (a cotangent per layer the batch reads, the
      gradient, the attention transpose's temporaries: ``n_layers + 6`` of them), as the allocator keeps
      the freed ones of the last batch resident; and 16 MiB of interpreter and allocator overhead;
    - computing the rows: the square adjacency (with ``max_feature_nodes``, ``n_features`` kept of
      ``n_active``: the rows in visiting order and the copy the influence ordering normalises instead), the
      next batch's backward, and its rows with their feature and error buffers;
    - assembling the kept rows (``max_feature_nodes`` only): the rows in visiting order and the adjacency;
    - pruning: the adjacency, the one square copy `prune_graph` makes of it (masked, normalised and scaled in
      place) and a boolean square mask."""
    n_active = n_features if n_active is None else n_active
    n_nodes = n_features + (n_layers + 1) * n_pos + n_logits
    n_sources = n_active + (n_layers + 1) * n_pos
    square = itemsize * n_nodes * n_nodes
    rows = itemsize * n_features * n_sources if n_active != n_features else 0
    backward = itemsize * (n_layers + 6) * batch * n_pos * d_model
    held = itemsize * n_active * (n_layers + 2) * d_model + backward + 16 * 2**20
    computing = (2 * rows if rows else square) + backward + itemsize * 3 * batch * n_sources
    assembling = rows + square if rows else 0
    pruning = 2 * square + n_nodes * n_nodes
    return held + max(computing, assembling, pruning)


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MB"


def check_memory(
    n_pos: int,
    n_features: int,
    n_layers: int,
    d_model: int,
    n_logits: int,
    batch: int,
    memory_gb: float,
    *,
    n_active: int | None = None,
    itemsize: int = 4,
) -> int:
    """The batch size to use (``batch`` or smaller so that it fits), or a clear error when even one row at a
    time does not fit ``memory_gb``: it says how long a prompt fits, and how to raise the budget."""
    budget = memory_gb * 2**30
    n_active = n_features if n_active is None else n_active

    def need(pos: int, features: int, active: int, b: int) -> int:
        return estimate_bytes(
            pos, features, n_layers, d_model, n_logits, b, n_active=active, itemsize=itemsize
        )

    while batch > 1 and need(n_pos, n_features, n_active, batch) > budget:
        batch //= 2
    needed = need(n_pos, n_features, n_active, batch)
    if needed <= budget:
        return batch
    per_pos, active_per_pos = n_features / max(n_pos, 1), n_active / max(n_pos, 1)
    fits = n_pos
    while fits > 1 and need(fits, int(per_pos * fits), int(active_per_pos * fits), 1) > budget:
        fits = int(fits * 0.9)
    raise MemoryError(
        f"a prompt of {n_pos} tokens with {n_features:,} active features needs about {_size(needed)} "
        f"for its attribution graph ({n_features + (n_layers + 1) * n_pos + n_logits:,} nodes), over "
        f"memory_gb={memory_gb:g}: shorten the prompt to about {fits} tokens, cap the features with "
        "max_feature_nodes, or raise memory_gb"
    )


# ---- the graph --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sources:
    """Every source's value vectors, and how to contract a batch of gradients with them into rows."""

    n_features: int
    layers: Tensor
    positions: Tensor
    # per output layer m: (feature indices writing m, their positions, a_s W_dec[s -> m] [n, d_model])
    decoders: list[tuple[Tensor, Tensor, Tensor]]
    errors: Float[Tensor, "pos layer d_model"]
    embed: Float[Tensor, "pos d_model"]


def _contract_by_position(
    grads: Float[Tensor, "row pos d_model"], positions: Int[Tensor, " n"], vectors: Float[Tensor, "n d_model"]
) -> Float[Tensor, "row n"]:
    """``grads[:, positions[i]] . vectors[i]`` for every i, by one batched matmul over positions (vectors padded
    per position), never a [row n d_model] gather."""
    n_pos = grads.shape[1]
    counts = torch.bincount(positions, minlength=n_pos)
    width = int(counts.max())
    order = torch.argsort(positions, stable=True)
    sorted_pos = positions[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(positions), device=positions.device) - starts[sorted_pos]
    padded = vectors.new_zeros(n_pos, width, vectors.shape[1])
    padded[sorted_pos, slot] = vectors[order]
    scores = torch.bmm(grads.transpose(0, 1), padded.transpose(1, 2))  # pos row width
    out = grads.new_empty(grads.shape[0], len(positions))
    out[:, order] = scores[sorted_pos, :, slot].T
    return out


def attribute(
    model: Transformer,
    clt: CLTLike,
    prompt: str | Tensor | Sequence[int],
    targets: Targets = None,
    *,
    max_feature_nodes: int | None = None,
    batch_size: int = 256,
    memory_gb: float = 8.0,
    desired_logit_prob: float = 0.95,
    meta: dict[str, Any] | None = None,
) -> AttributionGraph:
    """The attribution graph of ``prompt`` (text, BOS-prefixed where the tokenizer has one; or token ids [pos])
    for ``targets`` (see `choose_targets`).

    ``max_feature_nodes``: keep only that many features, those of most influence on the targets (visited in
    order of their influence estimated from the rows computed so far, as circuit-tracer does). ``memory_gb``:
    the budget of `check_memory` (the batch shrinks to fit; a prompt that does not fit is refused)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(prompt, str):  # position 0 holds no feature: start with the BOS token where there is one
        bos = getattr(model.tokenizer, "bos_id", None) is not None
        tokens = model.to_tokens(prompt, prepend_bos=bos)[0]
    else:
        tokens = torch.as_tensor(prompt).reshape(-1)
    rm = ReplacementModel(model, clt)
    with torch.no_grad():
        run = rm.run(tokens[None])
    tokens = run.tokens[0]
    n_layers, n_pos, d_model = model.cfg.n_layers, tokens.shape[0], model.cfg.d_model
    chosen = choose_targets(model, run.original_logits[0, -1], targets, desired_logit_prob)
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise ValueError(f"max_feature_nodes must be >= 0, got {max_feature_nodes}")

    acts = run.acts[0].detach().clone()  # pos layer d_sae
    acts[:1] = 0  # position 0 holds no feature node (circuit-tracer)
    pos_i, layer_i, feat_i = torch.nonzero(acts != 0, as_tuple=True)
    order = torch.argsort(layer_i * (n_pos * acts.shape[-1]) + pos_i * acts.shape[-1] + feat_i)
    pos_i, layer_i, feat_i = pos_i[order], layer_i[order], feat_i[order]
    values = acts[pos_i, layer_i, feat_i]
    n_active = len(values)
    n_keep = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    itemsize = run.embed.element_size()
    batch = check_memory(
        n_pos,
        n_keep,
        n_layers,
        d_model,
        len(chosen),
        batch_size,
        memory_gb,
        n_active=n_active,
        itemsize=itemsize,
    )
    sources = _sources(rm, run, layer_i, pos_i, feat_i, values)
    rows_of = _Backward(rm, run, sources)

    n_sources = n_active + (n_layers + 1) * n_pos
    n_nodes = n_keep + (n_layers + 1) * n_pos + len(chosen)
    encoders = clt.W_enc.detach()[layer_i, :, feat_i]  # n_active d_model
    dtype = run.embed.dtype
    if n_keep == n_active:  # every row goes straight into the adjacency: no row buffer, no copies
        adjacency = torch.zeros(n_nodes, n_nodes, dtype=dtype)
        for i in range(0, len(chosen), batch):
            vectors = torch.stack([t.vector for t in chosen[i : i + batch]])
            adjacency[n_nodes - len(chosen) + i : n_nodes - len(chosen) + i + len(vectors), :n_sources] = (
                rows_of.logits(vectors)
            )
        for i in range(0, n_active, batch):
            idx = torch.arange(i, min(i + batch, n_active))
            adjacency[idx, :n_sources] = rows_of.features(layer_i[idx], pos_i[idx], encoders[idx])
        keep = torch.arange(n_active)
    else:  # rows in visiting order (a buffer of n_keep rows), most influential first
        logit_rows = torch.cat(
            [
                rows_of.logits(torch.stack([t.vector for t in chosen[i : i + batch]]))
                for i in range(0, len(chosen), batch)
            ]
        )
        buffer = torch.zeros(n_keep, n_sources, dtype=dtype)
        visited_ids = torch.zeros(n_keep, dtype=torch.long)
        visited = torch.zeros(n_active, dtype=torch.bool)
        done = 0
        while done < n_keep:  # re-estimated every 4 batches
            influence = _partial_influence(logit_rows, buffer[:done], visited_ids[:done], n_active, chosen)
            rank = torch.argsort(influence, descending=True)
            pending = rank[~visited[rank]][: min(4 * batch, n_keep - done)]
            for i in range(0, len(pending), batch):
                idx = pending[i : i + batch]
                buffer[done : done + len(idx)] = rows_of.features(layer_i[idx], pos_i[idx], encoders[idx])
                visited_ids[done : done + len(idx)] = idx
                visited[idx] = True
                done += len(idx)
        keep, slots = torch.sort(visited_ids)
        columns = torch.cat([keep, torch.arange(n_active, n_sources)])
        adjacency = torch.zeros(n_nodes, n_nodes, dtype=dtype)
        for i in range(0, n_keep, batch):  # a batch of rows at a time: no full-size temporaries
            rows = slots[i : i + batch]
            adjacency[i : i + len(rows), : len(columns)] = buffer[rows][:, columns]
        del buffer
        adjacency[n_nodes - len(chosen) :, : len(columns)] = logit_rows[:, columns]

    err_norm = run.errors[0].norm(dim=-1)  # pos layer
    err_norm[:1] = 0
    nodes = [
        Node(NodeKind.FEATURE, int(layer_i[i]), int(pos_i[i]), int(feat_i[i]), float(values[i])) for i in keep
    ]
    nodes += [
        Node(NodeKind.ERROR, layer, p, None, float(err_norm[p, layer]))
        for layer in range(n_layers)
        for p in range(n_pos)
    ]
    nodes += [Node(NodeKind.EMBEDDING, None, p, int(tokens[p]), None) for p in range(n_pos)]
    nodes += [Node(NodeKind.LOGIT, None, n_pos - 1, t.token, t.weight) for t in chosen]
    strings = None
    if model.tokenizer is not None:
        strings = [model.tokenizer.decode([int(t)]) for t in tokens]
    info = {
        "n_active_features": n_active,
        "max_feature_nodes": max_feature_nodes,
        "batch_size": batch,
        "memory_gb": memory_gb,
        "desired_logit_prob": desired_logit_prob,
        **(meta or {}),
    }
    return AttributionGraph(nodes, adjacency, tokens.cpu(), n_layers, chosen, strings, info)


def _sources(
    rm: ReplacementModel, run: ReplacementRun, layer_i: Tensor, pos_i: Tensor, feat_i: Tensor, values: Tensor
) -> _Sources:
    decoders = []
    cross = getattr(rm.clt.cfg, "cross_layer", True)
    for m in range(rm.cfg.n_layers):
        writing = torch.nonzero(layer_i <= m if cross else layer_i == m).flatten()
        vec = _decoder_rows(rm, layer_i[writing], feat_i[writing], values[writing], m)
        decoders.append((writing, pos_i[writing], vec))
    errors = run.errors[0].detach().clone()
    errors[:1] = 0
    return _Sources(len(layer_i), layer_i, pos_i, decoders, errors, run.embed[0].detach())


def _decoder_rows(rm: ReplacementModel, layers: Tensor, feats: Tensor, values: Tensor, m: int) -> Tensor:
    """``a_s W_dec[s -> m]`` [n d_model] for the features ``(layers, feats)`` with activations ``values``."""
    out = values.new_zeros(len(layers), rm.cfg.d_model)
    for src in layers.unique().tolist():
        sel = layers == src
        out[sel] = values[sel, None] * rm.clt.decoder(src, m).detach()[feats[sel]]
    return out


class _Backward:
    """Rows of the adjacency: the transpose of the prompt's linear forward applied to a batch of rows'
    read-out vectors, contracted with every source at each write point as the gradient passes it."""

    def __init__(self, rm: ReplacementModel, run: ReplacementRun, sources: _Sources) -> None:
        self.rm, self.frozen, self.sources = rm, run.frozen, sources
        self.n_pos, self.d_model = run.tokens.shape[1], rm.cfg.d_model
        self.dtype = run.embed.dtype

    def _rows(self, cot_inputs: dict[int, Tensor], cot_final: Tensor | None, b: int) -> Tensor:
        src = self.sources
        feats = torch.zeros(b, src.n_features, dtype=self.dtype)
        errors = torch.zeros(b, self.rm.cfg.n_layers, self.n_pos, dtype=self.dtype)

        def on_mlp_out(layer: int, g: Tensor) -> None:
            index, pos, vec = src.decoders[layer]
            if index.numel():
                feats.index_add_(1, index, _contract_by_position(g, pos, vec))
            errors[:, layer] = (g * src.errors[:, layer]).sum(-1)

        with torch.no_grad():
            g_embed = self.rm.backward(self.frozen, cot_inputs.get, cot_final, on_mlp_out)
        tokens = (g_embed * src.embed).sum(-1)
        return torch.cat([feats, errors.reshape(b, -1), tokens], dim=1)

    def logits(self, vectors: Float[Tensor, "row d_model"]) -> Tensor:
        b = vectors.shape[0]
        cot_final = torch.zeros(b, self.n_pos, self.d_model, dtype=self.dtype)
        cot_final[:, -1] = vectors
        return self._rows({}, cot_final, b)

    def features(self, layers: Tensor, positions: Tensor, vectors: Float[Tensor, "row d_model"]) -> Tensor:
        b = vectors.shape[0]
        cot: dict[int, Tensor] = {}
        for layer in layers.unique().tolist():
            rows = torch.nonzero(layers == layer).flatten()
            c = torch.zeros(b, self.n_pos, self.d_model, dtype=self.dtype)
            c[rows, positions[rows]] = vectors[rows].to(self.dtype)
            cot[layer] = c
        return self._rows(cot, None, b)


def _partial_influence(
    logit_rows: Tensor, rows: Tensor, row_ids: Tensor, n_active: int, targets: list[Target]
) -> Tensor:
    """Each feature's influence on the targets through the rows computed so far (``rows`` of the features
    ``row_ids``; circuit-tracer's ``compute_partial_influences``): power iteration over the normalised absolute
    rows (one copy of them, normalised in place)."""
    a = torch.cat([rows, logit_rows]).abs_()
    a /= a.sum(1, keepdim=True).clamp(min=1e-8)
    row_nodes = torch.cat([row_ids, torch.full((logit_rows.shape[0],), -1)])
    weights = torch.tensor([t.weight for t in targets], dtype=a.dtype)
    current = torch.cat([torch.zeros(len(row_ids), dtype=a.dtype), weights])
    influence = torch.zeros(a.shape[1], dtype=a.dtype)
    for _ in range(128):
        prod = current @ a
        if not prod.any():
            break
        influence += prod
        current = torch.where(row_nodes >= 0, prod[row_nodes.clamp(min=0)], torch.zeros_like(prod[:1]))
    return influence[:n_active]
