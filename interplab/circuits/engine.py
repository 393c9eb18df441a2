"""The edge-level intervention engine: run a model in which every edge may carry another input's value.

A `Spec` says how to compute a node for a batch of examples: the row of the engine's data set each example
runs on (``input``), per-edge overrides (``patches``: another `Spec` computes the sender's value for that
edge, or an `Ablation`), and what the edges it does not override carry:

- ``propagate=False`` (a treeified node, as causal scrubbing needs): the sender's ordinary output on ``input``;
- ``propagate=True`` (a patched model, as path patching and ACDC need): the sender computed under this same
  spec, so the effect of a patch flows to everything downstream.

A receiving node's input is rebuilt as the sum of its senders' outputs, each from the spec its edge names.
The engine computes this as the node's clean input on ``input`` plus, for every edge whose value differs,
``value - clean value`` (equal up to float rounding; far fewer additions). Ordinary outputs of every node on
every data-set row are computed once, in batched forward passes, and cached: identical (node, input)
computations are shared by every path and every spec that needs them.

Attention masks and positions of a head come from ``spec.context`` (default ``spec.input``).

Grouped-query attention: every query head has its own q, k and v input (its copy of the key input, made into
keys through its group's shared weights), so an edge into ``a2.1.k`` changes head 2.1 alone. Post-norms
(Gemma-2): a head's output is its share of the attention output *before* the layer's post-norm; a receiver
reads ``post_norm(sum of the layer's heads, each as its edge's spec computes it)`` for each layer, so
patching one head's edge changes that head's term inside the norm (the MLP's post-norm is part of the MLP).
See `ComponentGraph` and docs/circuits.md.

>>> engine = EdgeEngine(model, tokens)
>>> a, b = torch.arange(2), torch.arange(2, 4)          # rows of the engine's data set
>>> logits = engine.run(Spec(a, {engine.graph.edge("a0.0->a1.1.k"): Spec(b)}, propagate=True))
>>> logits.shape
torch.Size([2, 16, 100])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.graph import ComponentGraph, Edge, Node, NodeKind, Slot
from interplab.hooks.site import Site, SiteKind
from interplab.model.attention import HeadInputs
from interplab.model.transformer import Transformer


class Ablation(str, Enum):
    """Values an edge can carry instead of another input's: zero, or the sender's mean over the data set."""

    ZERO = "zero"
    MEAN = "mean"


@dataclass(frozen=True, eq=False)
class Part:
    """One term of a `SumOfParts`: ``fn(value of the sender under spec, tokens of rows)``."""

    fn: Callable[[Tensor, Tensor], Tensor]
    """``fn(value [batch pos d_model], tokens [batch pos])`` -> a tensor broadcastable to value"""
    spec: Spec
    """computes the sender whose value ``fn`` reads"""
    rows: Int[Tensor, " batch"] | None = None
    """data-set rows whose tokens ``fn`` reads (default ``spec.input``)"""


@dataclass(frozen=True, eq=False)
class SumOfParts:
    """A sender's value rewritten as parts plus the rest, each part on its own spec (REMIX's residual
    rewrite): ``sum_i fn_i(V(parts[i].spec)) + V(rest) - sum_i fn_i(V(rest))`` where ``V(s)`` is the sender
    computed under ``s``. With every spec equal this is the sender's value itself."""

    parts: tuple[Part, ...]
    rest: Spec
    """the spec the residual ``value - sum of parts`` is computed on"""
    rest_rows: Int[Tensor, " batch"] | None = None
    """rows whose tokens the parts read when computing the residual (default ``rest.input``)"""


@dataclass(frozen=True, eq=False)
class AtPositions:
    """A patch that applies only at some positions: elsewhere the edge keeps its unpatched value
    (edges split by position)."""

    value: Spec | Ablation | SumOfParts
    positions: Int[Tensor, " n"]
    """position indices (or a boolean mask over positions)"""


@dataclass(frozen=True, eq=False)
class PositionPieces:
    """Several `AtPositions` on one edge, at disjoint positions (e.g. one datum per position); elsewhere the
    edge keeps its unpatched value."""

    pieces: tuple[AtPositions, ...]

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for piece in self.pieces:
            if not isinstance(piece, AtPositions) or piece.positions.dtype == torch.bool:
                raise TypeError("PositionPieces holds AtPositions with integer positions")
            here = set(piece.positions.tolist())
            if here & seen:
                raise ValueError(f"PositionPieces overlap at positions {sorted(here & seen)}")
            seen |= here


@dataclass(frozen=True, eq=False)
class Spec:
    """How to compute a node for a batch: see the module docstring. Compared by identity."""

    input: Int[Tensor, " batch"]
    """row of the engine's data set each example runs on"""
    patches: Mapping[Edge, Patch] = field(default_factory=dict)
    """edges whose sender value comes from another spec (or an ablation, a rewrite, position pieces)"""
    propagate: bool = False
    """unpatched edges carry the sender computed under this spec (True) or its clean output on ``input``"""
    context: Int[Tensor, " batch"] | None = None
    """rows whose attention mask and positions heads use (default ``input``)"""

    def __post_init__(self) -> None:
        if not isinstance(self.input, Tensor) or self.input.dim() != 1:
            raise ValueError(f"Spec.input must be a 1-d tensor of data-set rows, got {self.input!r}")
        object.__setattr__(self, "input", self.input.long())
        for edge, value in self.patches.items():
            if not isinstance(edge, Edge):
                raise TypeError(f"Spec.patches keys are Edges (graph.edge('a0.0->a1.0.k')), got {edge!r}")
            if not isinstance(value, (Spec, Ablation, AtPositions, PositionPieces, SumOfParts)):
                raise TypeError(
                    f"patch for {edge.name} must be a Spec, an Ablation, AtPositions, PositionPieces or "
                    f"SumOfParts, got {type(value).__name__}"
                )
            for inner in _inner_specs(value):
                if inner.input.shape != self.input.shape:
                    raise ValueError(
                        f"patch for {edge.name} has batch {tuple(inner.input.shape)}, "
                        f"the spec has {tuple(self.input.shape)}"
                    )
        orders = [e.receiver.order for e in self.patches]
        object.__setattr__(self, "_first_patched", min(orders, default=1 << 30))
        object.__setattr__(self, "_patched", frozenset(e.receiver for e in self.patches))

    def is_clean_for(self, node: Node) -> bool:
        """True when ``node`` under this spec is just its ordinary output on ``input``."""
        if (
            self.context is not None
            and node.kind is NodeKind.HEAD
            and not torch.equal(self.context, self.input)
        ):
            return False
        if self.propagate:
            return node.order < self._first_patched  # type: ignore[attr-defined]
        return node not in self._patched  # type: ignore[attr-defined]


Patch = Spec | Ablation | AtPositions | PositionPieces | SumOfParts
"""What a `Spec` may put on an edge."""


def _inner_specs(value: Patch) -> list[Spec]:
    """The specs a patch computes the sender under (to check their batch)."""
    if isinstance(value, Spec):
        return [value]
    if isinstance(value, AtPositions):
        return _inner_specs(value.value)
    if isinstance(value, PositionPieces):
        return [s for p in value.pieces for s in _inner_specs(p)]
    if isinstance(value, SumOfParts):
        return [value.rest, *(p.spec for p in value.parts)]
    return []


def clean(rows: Tensor) -> Spec:
    """The ordinary forward pass on ``rows``."""
    return Spec(torch.as_tensor(rows))


@dataclass
class EngineStats:
    clean_examples: int = 0
    """examples run through an ordinary (cached) forward pass"""
    node_evaluations: int = 0
    """example x node computations outside the cache (a head layer counts once per head evaluated)"""
    patched_runs: int = 0
    """calls of `EdgeEngine.run`"""


class _Store:
    """Per-node clean activations, kept in the chunks they were computed in, indexed by data-set row."""

    def __init__(self, n_rows: int) -> None:
        self.chunk = torch.full((n_rows,), -1, dtype=torch.long)
        self.offset = torch.zeros(n_rows, dtype=torch.long)
        self.chunks: list[dict[str, Tensor]] = []

    def missing(self, rows: Tensor) -> Tensor:
        return torch.unique(rows[self.chunk[rows] < 0])

    def add(self, rows: Tensor, values: dict[str, Tensor]) -> None:
        self.chunk[rows] = len(self.chunks)
        self.offset[rows] = torch.arange(rows.numel())
        self.chunks.append(values)

    def get(self, name: str, rows: Tensor, positions: Tensor | None = None) -> Tensor:
        """``name``'s activations on ``rows`` [rows pos ...], or only at integer ``positions`` [rows n ...]."""
        which = self.chunk[rows]
        if len(self.chunks) == 1 or bool((which == which[0]).all()):
            return self._take(self.chunks[int(which[0])][name], self.offset[rows], positions)
        first = self.chunks[0][name]
        n_pos = first.shape[1] if positions is None else positions.numel()
        out = first.new_empty((rows.numel(), n_pos, *first.shape[2:]))
        for c in torch.unique(which).tolist():
            sel = which == c
            out[sel] = self._take(self.chunks[c][name], self.offset[rows[sel]], positions)
        return out

    def gather(self, name: str, rows: Tensor, positions: Tensor) -> Tensor:
        """``name``'s activation of row ``rows[i, j]`` at position ``positions[j]``: [batch n ...]."""
        which, offsets = self.chunk[rows], self.offset[rows]
        cols = positions[None, :].expand_as(rows)
        if len(self.chunks) == 1 or bool((which == which.flatten()[0]).all()):
            return self.chunks[int(which.flatten()[0])][name][offsets, cols]
        first = self.chunks[0][name]
        out = first.new_empty((*rows.shape, *first.shape[2:]))
        for c in torch.unique(which).tolist():
            sel = which == c
            out[sel] = self.chunks[c][name][offsets[sel], cols[sel]]
        return out

    @staticmethod
    def _take(values: Tensor, offsets: Tensor, positions: Tensor | None) -> Tensor:
        return values[offsets] if positions is None else values[offsets[:, None], positions[None, :]]


class EdgeEngine:
    """Runs a model over a fixed data set (``tokens`` rows) with edge-level interventions.

    ``attention_mask`` [rows pos] marks real tokens (1) and padding (0), as in `Transformer.forward`.
    """

    def __init__(
        self,
        model: Transformer,
        tokens: Int[Tensor, "rows pos"],
        attention_mask: Tensor | None = None,
        *,
        batch_size: int = 512,
        graph: ComponentGraph | None = None,
    ) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [rows, pos], got shape {tuple(tokens.shape)}")
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}"
            )
        self.model = model
        self.graph = graph or ComponentGraph(model.cfg)
        self.tokens = tokens.long()
        self.attention_mask = attention_mask
        self.batch_size = batch_size
        self.stats = EngineStats()
        self._store = _Store(tokens.shape[0])
        self._means: dict[str, Tensor] = {}
        self._edges_into = {(r, s): self.graph.edges_into(r, s) for r in self.graph.nodes for s in r.slots}

    # ---- clean activations -----------------------------------------------------------------------
    def _mask(self, rows: Tensor) -> Tensor | None:
        return None if self.attention_mask is None else self.attention_mask[rows]

    def _forward_clean(self, rows: Tensor) -> dict[str, Tensor]:
        """One ordinary batched forward; outputs of every sender and the clean input of every receiver."""
        cfg, model = self.model.cfg, self.model
        embed, pos_embed = Site(SiteKind.EMBED).name, Site(SiteKind.POS_EMBED).name
        final = Site(SiteKind.RESID_POST, cfg.n_layers - 1).name
        names = [embed, pos_embed]
        for layer in range(cfg.n_layers):
            names += [Site(SiteKind.RESID_PRE, layer).name, Site(SiteKind.RESULT, layer).name]
            if cfg.post_norms:
                names.append(Site(SiteKind.ATTN_OUT, layer).name)
            if cfg.has_mlp:
                names.append(Site(SiteKind.MLP_OUT, layer).name)
                if not cfg.parallel_attn_mlp:
                    names.append(Site(SiteKind.RESID_MID, layer).name)
        names.append(final)
        names = [n for n in names if n in model.hook_registry]
        with torch.no_grad():
            _, cache = model.run_with_cache(self.tokens[rows], names, attention_mask=self._mask(rows))
        out: dict[str, Tensor] = {}
        for node in self.graph.nodes:
            if node.kind is NodeKind.EMBED:
                out[node.name] = cache[embed]
            elif node.kind is NodeKind.POS_EMBED:
                out[node.name] = cache[pos_embed].expand_as(cache[embed])
            elif node.kind is NodeKind.HEAD:
                assert node.layer is not None  # heads and MLPs have a layer
                b_o = model.blocks[node.layer].attn.b_O / cfg.n_heads
                result = cache[Site(SiteKind.RESULT, node.layer).name]
                out[node.name] = result[:, :, node.head] + b_o
                if node.head == 0:  # heads of a layer share resid_pre: one copy per layer
                    out[f"{node.name}.in"] = cache[Site(SiteKind.RESID_PRE, node.layer).name]
                    if cfg.post_norms:  # the layer's attention before and after its post-norm
                        out[f"a{node.layer}.pre"] = result.sum(2) + model.blocks[node.layer].attn.b_O
                        out[f"a{node.layer}.out"] = cache[Site(SiteKind.ATTN_OUT, node.layer).name]
            elif node.kind is NodeKind.MLP:
                out[node.name] = cache[Site(SiteKind.MLP_OUT, node.layer).name]
                mid = SiteKind.RESID_PRE if cfg.parallel_attn_mlp else SiteKind.RESID_MID
                out[f"{node.name}.in"] = cache[Site(mid, node.layer).name]
            else:
                out["logits.in"] = cache[final]
        return {k: v.contiguous() for k, v in out.items()}

    def ensure_clean(self, rows: Int[Tensor, " batch"]) -> None:
        """Run (and cache) the ordinary forward on every row not yet cached."""
        missing = self._store.missing(rows)
        for start in range(0, missing.numel(), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            self._store.add(chunk, self._forward_clean(chunk))
            self.stats.clean_examples += chunk.numel()

    def clear_cache(self) -> None:
        """Forget the cached clean activations (memory); statistics are kept."""
        self._store = _Store(self.tokens.shape[0])

    def clean_output(self, node: Node, rows: Tensor) -> Float[Tensor, "batch pos d_model"]:
        """``node``'s ordinary output (a sender) on data-set ``rows``."""
        self.ensure_clean(rows)
        return self._store.get(node.name, rows)

    def clean_input(self, node: Node, rows: Tensor) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream ``node`` reads in the ordinary forward on ``rows``."""
        self.ensure_clean(rows)
        key = f"a{node.layer}.0.in" if node.kind is NodeKind.HEAD else f"{node.name}.in"
        return self._store.get(key, rows)

    def mean_output(self, node: Node) -> Float[Tensor, "pos d_model"]:
        """``node``'s output averaged over every row of the data set (for mean ablation)."""
        if not self._means:
            sums: dict[str, Tensor] = {}
            n = self.tokens.shape[0]
            for start in range(0, n, self.batch_size):
                acts = self._forward_clean(torch.arange(start, min(n, start + self.batch_size)))
                for s in self.graph.senders_all:
                    sums[s.name] = sums.get(s.name, 0) + acts[s.name].sum(0)
            self._means = {k: v / n for k, v in sums.items()}
        return self._means[node.name]

    # ---- patched runs ----------------------------------------------------------------------------
    def run(self, spec: Spec, node: Node | str | None = None) -> Tensor:
        """The output of ``node`` (default: the logits, [batch pos d_vocab_out]) computed under ``spec``."""
        target = self.graph.logits if node is None else self.graph.node(node)
        self.stats.patched_runs += 1
        with torch.no_grad():
            return self._value(target, spec, {})

    def _value(self, node: Node, spec: Spec, memo: dict) -> Tensor:
        if node.kind is not NodeKind.LOGITS and spec.is_clean_for(node):
            return self.clean_output(node, spec.input)
        key = (node.name, id(spec))
        if key in memo:
            return memo[key][1]
        rows = spec.input.numel()
        if node.kind is NodeKind.HEAD:
            self._heads(node.layer, spec, memo)  # type: ignore[arg-type]
            return memo[key][1]
        x = self._slot_input(node, Slot.IN, spec, memo)
        if node.kind is NodeKind.MLP:
            assert node.layer is not None  # heads and MLPs have a layer
            block = self.model.blocks[node.layer]
            out = block.mlp(block.ln2(x))
            if self.model.cfg.post_norms:
                out = block.ln2_post(out)
        else:
            out = self.model.unembed_resid(x)
        self.stats.node_evaluations += rows
        memo[key] = (spec, out)  # keep spec alive so its id is not reused
        return out

    def _edge_value(self, edge: Edge, spec: Spec, memo: dict) -> Tensor | None:
        """The value ``edge`` carries under ``spec``, or None when it is the clean value on spec.input."""
        patch = spec.patches.get(edge)
        if patch is None:
            if not spec.propagate or spec.is_clean_for(edge.sender):
                return None
            return self._value(edge.sender, spec, memo)
        if isinstance(patch, (AtPositions, PositionPieces)):
            if spec.propagate and not spec.is_clean_for(edge.sender):
                out = self._value(edge.sender, spec, memo).clone()
            else:
                out = self.clean_output(edge.sender, spec.input).clone()
            pieces = patch.pieces if isinstance(patch, PositionPieces) else (patch,)
            rows, positions, rest = self._clean_pieces(patch, pieces, memo)
            if rows is not None:  # clean senders on other rows: one gather from the cache
                self.ensure_clean(rows.flatten())
                out[:, positions] = self._store.gather(edge.sender.name, rows, positions)
            for piece in rest:
                value = self._patch_value(edge, spec, piece.value, memo)
                out[:, piece.positions] = value.expand_as(out)[:, piece.positions]
            return out
        return self._patch_value(edge, spec, patch, memo)

    def _clean_pieces(self, patch: object, pieces: tuple[AtPositions, ...], memo: dict) -> tuple:
        """Split position pieces into those whose value is an ordinary forward on other rows (as [batch n]
        rows and [n] positions, read from the cache in one gather) and the rest. Memoised per patch."""
        key = ("pieces", id(patch))
        if key not in memo:
            rows, positions, rest = [], [], []
            for piece in pieces:
                value, pos = piece.value, piece.positions
                if (
                    isinstance(value, Spec)
                    and not value.patches
                    and value.context is None
                    and pos.dtype != torch.bool
                ):
                    pos = pos.long().flatten()
                    rows.append(value.input[:, None].expand(-1, pos.numel()))
                    positions.append(pos)
                else:
                    rest.append(piece)
            found = (torch.cat(rows, 1), torch.cat(positions), rest) if rows else (None, None, rest)
            memo[key] = (patch, found)  # keep the patch alive so its id is not reused
        return memo[key][1]

    def _patch_value(self, edge: Edge, spec: Spec, patch: Spec | Ablation | SumOfParts, memo: dict) -> Tensor:
        if patch is Ablation.ZERO:
            return torch.zeros_like(self.clean_output(edge.sender, spec.input[:1]))
        if patch is Ablation.MEAN:
            return self.mean_output(edge.sender)
        if isinstance(patch, SumOfParts):
            return self._sum_of_parts(edge.sender, patch, memo)
        return self._value(edge.sender, patch, memo)

    def _sum_of_parts(self, sender: Node, rewrite: SumOfParts, memo: dict) -> Tensor:
        key = (sender.name, id(rewrite))
        if key in memo:
            return memo[key][1]
        rest = self._value(sender, rewrite.rest, memo)
        rest_tokens = self.tokens[rewrite.rest.input if rewrite.rest_rows is None else rewrite.rest_rows]
        out = rest
        for part in rewrite.parts:
            value = self._value(sender, part.spec, memo)
            tokens = self.tokens[part.spec.input if part.rows is None else part.rows]
            here, there = part.fn(value, tokens), part.fn(rest, rest_tokens)
            for term in (here, there):
                if not isinstance(term, Tensor) or torch.broadcast_shapes(term.shape, out.shape) != out.shape:
                    got = tuple(term.shape) if isinstance(term, Tensor) else type(term).__name__
                    raise ValueError(
                        f"a part of {sender.name}'s rewrite returned {got}, which does not broadcast to the "
                        f"value's shape {tuple(out.shape)}"
                    )
            out = out + (here - there)
        memo[key] = (rewrite, out)  # keep the rewrite alive so its id is not reused
        return out

    def _slot_input(self, node: Node, slot: Slot, spec: Spec, memo: dict) -> Tensor:
        """The clean input plus, for every edge whose value differs, ``value - clean value``; with post-norms
        a layer's head differences are summed inside its norm: ``+ post_norm(pre + sum) - post_norm(pre)``."""
        x = self.clean_input(node, spec.input)
        post_norms = self.model.cfg.post_norms
        inside: dict[int, Tensor] = {}  # post-norms: layer -> sum of its heads' differences
        for edge in self._edges_into[(node, slot)]:
            value = self._edge_value(edge, spec, memo)
            if value is None:
                continue
            delta = value - self.clean_output(edge.sender, spec.input)
            if post_norms and edge.sender.kind is NodeKind.HEAD:
                layer = edge.sender.layer
                assert layer is not None  # heads have a layer
                inside[layer] = inside[layer] + delta if layer in inside else delta
            else:
                x = x + delta
        for layer, delta in inside.items():
            pre = self._store.get(f"a{layer}.pre", spec.input)
            normed = self.model.blocks[layer].ln1_post(pre + delta)
            x = x + (normed - self._store.get(f"a{layer}.out", spec.input))
        return x

    def _heads(self, layer: int, spec: Spec, memo: dict) -> None:
        """All heads of ``layer`` under ``spec`` at once (each with its own Q, K and V inputs)."""
        model, cfg = self.model, self.model.cfg
        block = model.blocks[layer]
        heads = [n for n in self.graph.nodes if n.kind is NodeKind.HEAD and n.layer == layer]
        split = []
        for slot in (Slot.Q, Slot.K, Slot.V):
            per_head = torch.stack([self._slot_input(h, slot, spec, memo) for h in heads], dim=2)
            split.append(block.ln1(per_head))
        ctx_rows = spec.input if spec.context is None else spec.context
        tokens = self.tokens[ctx_rows]
        ctx = model.context(tokens, self._mask(ctx_rows))
        result = block.attn.head_results(HeadInputs(*split), ctx) + block.attn.b_O / cfg.n_heads
        for h in heads:
            memo[(h.name, id(spec))] = (spec, result[:, :, h.head])
        self.stats.node_evaluations += spec.input.numel() * len(heads)
