"""Path patching and edge patching, as special cases of the edge engine.

``path_patch(engine, base, source, senders=["a0.1"], receivers=["a1.0.k"])`` runs the model on ``base`` while
the senders' outputs, taken from ``source``, reach the receivers through the direct edges only; the
receivers' changed outputs then flow to the logits through every path (Wang et al. 2022). With
``via=[["m0"], ...]`` the senders' value reaches the receivers only through the chosen intermediate nodes
(each group feeds the next), every other input of those intermediates staying on ``base``.

``patch_edges(engine, base, {edge: source_rows})`` is the ACDC-style patched model: each listed edge carries
its sender's ordinary output on another input (or an `Ablation`), everything downstream recomputed. Edges are
split by position with ``"a0.0->a1.0.k@3"`` (position 3 only) or ``"...@2,5"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from interplab.circuits.engine import Ablation, AtPositions, EdgeEngine, Spec
from interplab.circuits.graph import Edge, Node, NodeKind, Slot


def _receivers(engine: EdgeEngine, names: Iterable[str | Node]) -> list[tuple[Node, Slot | None]]:
    """``a1.0`` (all three inputs), ``a1.0.k`` (one), ``m0``, ``logits``."""
    out: list[tuple[Node, Slot | None]] = []
    for name in names:
        if isinstance(name, Node):
            out.append((name, None))
            continue
        try:
            node = engine.graph.node(name)
            out.append((node, None))
        except ValueError:
            node, slot = engine.graph.slot(name)
            out.append((node, slot))
    for node, _ in out:
        if node.kind in (NodeKind.EMBED, NodeKind.POS_EMBED):
            raise ValueError(f"{node.name} reads nothing and cannot receive a path")
    return out


def _edges_between(
    engine: EdgeEngine, senders: Sequence[Node], receivers: list[tuple[Node, Slot | None]]
) -> list[Edge]:
    edges = [e for r, slot in receivers for e in engine.graph.edges_into(r, slot) if e.sender in senders]
    if not edges:
        raise ValueError(
            f"no direct edge from {[s.name for s in senders]} to {[r.name for r, _ in receivers]}: "
            "senders must come before receivers"
        )
    return edges


def _rows(rows: Tensor | Sequence[int]) -> Tensor:
    return torch.as_tensor(rows, dtype=torch.long)


def path_patch_spec(
    engine: EdgeEngine,
    base: Int[Tensor, " batch"],
    source: Int[Tensor, " batch"] | Ablation,
    senders: Sequence[str | Node],
    receivers: Sequence[str | Node],
    *,
    via: Sequence[Sequence[str | Node]] = (),
) -> Spec:
    """The `Spec` of a path patch (see the module docstring); run it with ``engine.run(spec)``."""
    base = _rows(base)
    sender_nodes = [engine.graph.node(s) for s in senders]
    for s in sender_nodes:
        if not s.is_sender:
            raise ValueError(f"{s.name} writes nothing into the residual stream and cannot send a path")
    value: Spec | Ablation = source if isinstance(source, Ablation) else Spec(_rows(source))
    current = sender_nodes
    for group in via:
        targets = _receivers(engine, group)
        value = Spec(base, {e: value for e in _edges_between(engine, current, targets)})
        current = [n for n, _ in targets]
    final = _receivers(engine, receivers)
    return Spec(base, {e: value for e in _edges_between(engine, current, final)}, propagate=True)


def path_patch(
    engine: EdgeEngine,
    base: Int[Tensor, " batch"],
    source: Int[Tensor, " batch"] | Ablation,
    senders: Sequence[str | Node],
    receivers: Sequence[str | Node],
    *,
    via: Sequence[Sequence[str | Node]] = (),
) -> Tensor:
    """Logits [batch pos d_vocab_out] of ``base`` with the senders' ``source`` values reaching the receivers
    through direct edges (or through the ``via`` groups), the receivers' effect flowing on to the output."""
    return engine.run(path_patch_spec(engine, base, source, senders, receivers, via=via))


def patch_edges_spec(
    engine: EdgeEngine,
    base: Int[Tensor, " batch"],
    patches: Mapping[str | Edge, Int[Tensor, " batch"] | Ablation],
) -> Spec:
    """A patched model: each edge carries its sender's ordinary output on its source rows (or an ablation);
    all other edges carry the patched model's own values."""
    base = _rows(base)
    cache: dict[int, Spec] = {}
    out: dict[Edge, Spec | Ablation | AtPositions] = {}
    for name, src in patches.items():
        positions = None
        if isinstance(name, str) and "@" in name:  # "a0.0->a1.0.k@3" or "...@2,5": only those positions
            name, _, at = name.partition("@")
            try:
                positions = torch.tensor([int(p) for p in at.split(",")])
            except ValueError:
                raise ValueError(
                    f"positions after '@' are integers separated by commas, got {at!r}"
                ) from None
        edge = engine.graph.edge(name)
        if isinstance(src, Ablation):
            value: Spec | Ablation = src
        else:
            src = _rows(src)
            key = id(src)
            if key not in cache:
                cache[key] = Spec(src)
            value = cache[key]
        if edge in out:
            raise ValueError(f"edge {edge.name} is patched twice")
        out[edge] = value if positions is None else AtPositions(value, positions)
    return Spec(base, out, propagate=True)


def patch_edges(
    engine: EdgeEngine,
    base: Int[Tensor, " batch"],
    patches: Mapping[str | Edge, Int[Tensor, " batch"] | Ablation],
) -> Tensor:
    """Logits of the patched model of `patch_edges_spec`."""
    return engine.run(patch_edges_spec(engine, base, patches))
