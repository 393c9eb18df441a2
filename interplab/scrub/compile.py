"""The hypothesis compiler: a `Hypothesis` checked against a model (`compile_hypothesis`), then, for each batch
of reference rows, the treeified model it describes as an engine `Spec` (`CompiledHypothesis.spec`).

Each claim gets a datum (rows of the task's data set, one per reference) drawn to agree with its parent's
datum on the claim's feature; an internal claim also draws an other-inputs datum. The datums become the specs
the edge engine runs (`interplab.circuits.engine`):

- a leaf on a component: ``Spec(datum)`` (its whole upstream computation, masks included, on the datum);
- an internal claim on a component: ``Spec(others, patches)``, its claimed inputs patched by its children,
  its attention mask from the others datum (or from a ``.mask`` claim's datum);
- a claim at positions: its edges patched only there (`AtPositions`, several per edge: `PositionPieces`);
- a node-level claim (``paths="all"``): the component's one spec on every path down from its parent, the
  unclaimed components in between recomputed on the parent's other-inputs datum (one spec per component and
  set of claims reaching it, shared by every edge that reads it);
- a rewrite: `SumOfParts`, each part computed under its own claim's spec.

The same datum is always the same `Spec` object, so the engine computes each (node, datum) once.

Tests and notebooks can fix the rows every claim runs on (``data={path: rows}``, paths as in error messages
and `ScrubResult.samples`) and compare the engine's logits with a hand-written computation:

>>> import torch
>>> from interplab.circuits.engine import EdgeEngine
>>> from interplab.circuits.planted import induction_data, planted_induction
>>> from interplab.scrub.hypothesis import Claim, Hypothesis
>>> tokens, _, _ = induction_data(20)
>>> engine = EdgeEngine(planted_induction(), tokens)
>>> compiled = compile_hypothesis(engine, Hypothesis(Claim("logits", children=[Claim("a1.0@-1")])))
>>> refs = torch.arange(4)
>>> spec = compiled.spec(refs, torch.Generator(), data={"logits (others)": refs + 4, "logits/a1.0@9": refs + 8})
>>> engine.run(spec).shape
torch.Size([4, 10, 16])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import torch
from torch import Tensor

from interplab.circuits.engine import AtPositions, EdgeEngine, Part, PositionPieces, Spec, SumOfParts
from interplab.circuits.graph import ComponentGraph, Edge, Node, NodeKind, Slot, slot_name
from interplab.hooks.site import suggest
from interplab.scrub.hypothesis import Claim, Feature, Hypothesis, format_positions
from interplab.scrub.result import OTHERS  # an internal claim's other-inputs datum in ``data`` and samples
from interplab.scrub.sampling import FeatureGroups, ScrubError, evaluate, position_columns


class TargetKind(str, Enum):
    COMPONENT = "component"  # a node's output (logits: its input)
    SLOT = "slot"  # one or all of a head's q, k, v inputs
    MASK = "mask"  # a head's attention mask and positions
    PART = "part"  # a part of a rewritten component


@dataclass(eq=False)
class CompiledClaim:
    """One claim checked against the model (per-position claims: one per position)."""

    claim: Claim
    path: str
    """``logits/a1.0/a1.0.in@1``, as error messages and samples name it"""
    kind: TargetKind
    node: Node
    """the component; for a head input or mask, the head; for a part, the rewritten component"""
    slots: tuple[Slot, ...] = ()
    part: str | None = None
    positions: tuple[int, ...] | None = None
    """non-negative sequence positions, or None: all (those the parent covers)"""
    groups: FeatureGroups | None = None
    """how the datum is drawn from the parent's (None: the parent's datum)"""
    avoid: frozenset[Node] = frozenset()
    children: list[CompiledClaim] = field(default_factory=list)

    @property
    def leaf(self) -> bool:
        return bool(self.claim.leaf)

    @property
    def all_paths(self) -> bool:
        return self.claim.paths == "all"

    @property
    def where(self) -> str:
        return f"'{self.path}'"


_C = TypeVar("_C", bound="CompiledClaim | Any")


def depth_first(root: _C) -> list[_C]:
    """``root`` and every claim below it (anything with a ``children`` list), parents before children."""
    out, todo = [], [root]
    while todo:
        c = todo.pop(0)
        out.append(c)
        todo = list(c.children) + todo
    return out


def _overlap(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> bool:
    return a is None or b is None or bool(set(a) & set(b))


class _Compiler:
    def __init__(self, engine: EdgeEngine, pool: Tensor, groups: dict[str, Any]) -> None:
        self.engine, self.graph, self.pool, self.cache = engine, engine.graph, pool, groups
        self.n_pos = engine.tokens.shape[1]

    # ---- targets -----------------------------------------------------------------------------------
    def _valid_under(self, parent: CompiledClaim) -> list[str]:
        """The targets a child of ``parent`` may name (for messages)."""
        node = parent.node
        if parent.kind is TargetKind.MASK:
            return []
        if parent.kind is TargetKind.COMPONENT and parent.claim.rewrite is not None:
            return [f"{node.name}:{p}" for p in (*parent.claim.rewrite.parts, "residual")]
        if parent.kind in (TargetKind.COMPONENT, TargetKind.PART) and node.kind is NodeKind.HEAD:
            return [f"{node.name}.{s}" for s in ("q", "k", "v", "in", "mask")]
        slots = parent.slots or (Slot.IN,)
        return [s.name for s in self.graph.senders(node)] if slots else []

    def _target(
        self, claim: Claim, parent: CompiledClaim | None
    ) -> tuple[TargetKind, Node, tuple, str | None]:
        graph, name = self.graph, claim.target
        if parent is None:
            return TargetKind.COMPONENT, graph.logits, (), None
        valid = self._valid_under(parent)
        if parent.kind is TargetKind.MASK:
            raise ValueError(f"a mask claim ({parent.claim.name}) is a leaf: it cannot have children")
        rewrite = parent.claim.rewrite if parent.kind is TargetKind.COMPONENT else None
        if rewrite is not None:
            comp, _, part = name.partition(":")
            if comp != parent.node.name or part not in (*rewrite.parts, "residual"):
                raise ValueError(
                    f"the children of a rewritten claim are its parts: {', '.join(valid)}; got {name!r} "
                    "(claim the component's inputs under a part)"
                )
            return TargetKind.PART, parent.node, (), part
        if ":" in name:
            raise ValueError(
                f"{name!r} names a part of a rewrite, but the parent claim {parent.claim.name!r} has no "
                "rewrite: parts are children of the claim that carries `rewrite=`"
            )
        if parent.node.kind is NodeKind.HEAD and parent.kind in (TargetKind.COMPONENT, TargetKind.PART):
            head, _, slot = name.rpartition(".")
            if head != parent.node.name or slot not in ("q", "k", "v", "in", "mask"):
                close = suggest(name, valid)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(
                    f"a child of head {head if head == parent.node.name else parent.node.name} names one of its "
                    f"inputs ({', '.join(valid)}), not {name!r}{hint}"
                )
            if slot == "mask":
                return TargetKind.MASK, parent.node, (), None
            slots = (Slot.Q, Slot.K, Slot.V) if slot == "in" else (Slot(slot),)
            return TargetKind.SLOT, parent.node, slots, None
        node = graph.node(name)
        into = parent.node if parent.kind is not TargetKind.SLOT else parent.node
        for slot in parent.slots or (Slot.IN,):
            graph.edge(f"{node.name}->{slot_name(into, slot)}")  # raises naming the valid senders
        return TargetKind.COMPONENT, node, (), None

    def _positions(self, claim: Claim, path: str) -> tuple[int, ...] | None:
        if claim.positions is None:
            return None
        out = []
        for p in claim.positions:  # type: ignore[union-attr]
            q = p + self.n_pos if p < 0 else p
            if not 0 <= q < self.n_pos:
                raise ScrubError(
                    f"claim '{path}': position {p} is out of range: the inputs have {self.n_pos} positions, "
                    f"valid 0..{self.n_pos - 1} (or -{self.n_pos}..-1 from the end)"
                )
            out.append(q)
        if len(set(out)) != len(out):
            raise ScrubError(f"claim '{path}': positions {list(claim.positions)} name a position twice")  # type: ignore[arg-type]
        return tuple(sorted(out))

    # ---- features ----------------------------------------------------------------------------------
    def _groups(self, feature: Feature, where: str, column: int | None) -> FeatureGroups:
        key = f"{feature.name}@{id(feature.fn)}"
        if column is None:
            if key not in self.cache:
                self.cache[key] = FeatureGroups.build(feature, self.engine.tokens, where, self.pool)
            return self.cache[key]
        raw_key = key + "#raw"
        if raw_key not in self.cache:
            raw = evaluate(feature, self.engine.tokens, where)
            self.cache[raw_key] = position_columns(feature, raw, self.engine.tokens, where)
        col_key = f"{key}#{column}"
        if col_key not in self.cache:
            values = self.cache[raw_key][:, column]
            try:
                self.cache[col_key] = FeatureGroups.from_values(
                    feature, values, values.shape[0], where, self.pool
                )
            except ScrubError as err:
                raise ScrubError(f"{err} (at position {column})") from None
        return self.cache[col_key]

    # ---- the tree ----------------------------------------------------------------------------------
    def compile(
        self, claim: Claim, parent: CompiledClaim | None, path: str, anchor: tuple[int, ...] | None
    ) -> list[CompiledClaim]:
        try:
            kind, node, slots, part = self._target(claim, parent)
        except ValueError as err:
            raise ScrubError(f"claim '{path}': {err}") from None
        positions = self._positions(claim, path)
        if positions is not None and kind in (TargetKind.MASK, TargetKind.PART):
            raise ScrubError(
                f"claim '{path}': a {kind.value} claim covers its whole target; give positions to "
                f"{'the rewritten claim' if kind is TargetKind.PART else 'the head inputs'} instead"
            )
        if parent is not None and parent.kind is TargetKind.SLOT and positions is not None:
            if parent.positions is not None and not set(positions) <= set(parent.positions):
                raise ScrubError(
                    f"claim '{path}': positions {list(positions)} are not all covered by its parent "
                    f"{parent.claim.name!r} (positions {list(parent.positions)})"
                )
        if claim.paths == "all" and (kind is not TargetKind.COMPONENT or parent is None):
            raise ScrubError(
                f"claim '{path}': paths='all' is for components under an input, not {kind.value}s"
            )
        if claim.rewrite is not None and (kind is not TargetKind.COMPONENT or node.kind is NodeKind.LOGITS):
            raise ScrubError(f"claim '{path}': only a component's output can be rewritten")
        if kind is TargetKind.MASK and claim.children:
            raise ScrubError(f"claim '{path}': a mask claim is a leaf: it cannot have children")
        avoid: frozenset[Node] = frozenset()
        if claim.avoid:
            try:
                avoid = frozenset(self.graph.node(a) for a in claim.avoid)
            except ValueError as err:
                raise ScrubError(f"claim '{path}': avoid: {err}") from None
        feature = claim.feature if isinstance(claim.feature, Feature) else None
        copies: list[tuple[int, ...] | None]
        if feature is not None and feature.per_position:
            if positions is not None:
                copies = [(p,) for p in positions]
            elif anchor is not None and len(anchor) == 1:
                copies = [None]
            else:
                raise ScrubError(
                    f"claim '{path}': feature {feature.name!r} is per-position: give the claim positions "
                    "(or put it under a claim with exactly one position)"
                    + ("" if anchor is None else f"; its nearest positioned ancestor has {len(anchor)}")
                )
        else:
            copies = [positions]
        parent_path = path.rpartition("/")[0]
        out = []
        for pos in copies:
            here = (
                path
                if len(copies) == 1 or pos is None
                else f"{parent_path}/{claim.target}{format_positions(pos)}"
            )
            groups = None
            if feature is not None:
                column = None
                if feature.per_position:
                    column = pos[0] if pos is not None else anchor[0]  # type: ignore[index]  # checked above
                groups = self._groups(feature, f"'{here}'", column)
            c = CompiledClaim(claim, here, kind, node, slots, part, pos, groups, avoid)
            below = pos if pos is not None else anchor
            for child in claim.children:
                c.children += self.compile(child, c, f"{here}/{child.name}", below)
            self._check_siblings(c)
            out.append(c)
        return out

    def _check_siblings(self, c: CompiledClaim) -> None:
        seen: list[CompiledClaim] = []
        for child in c.children:
            for other in seen:
                if child.kind is not other.kind:
                    if {child.kind, other.kind} == {TargetKind.SLOT, TargetKind.MASK}:
                        continue
                if child.kind is TargetKind.PART:
                    clash = child.part == other.part
                elif child.kind is TargetKind.MASK:
                    clash = other.kind is TargetKind.MASK
                elif child.kind is TargetKind.SLOT:
                    clash = bool(set(child.slots) & set(other.slots)) and _overlap(
                        child.positions, other.positions
                    )
                else:
                    clash = child.node == other.node and _overlap(child.positions, other.positions)
                if clash:
                    what = (
                        "/".join(slot_name(child.node, s) for s in child.slots)
                        if child.kind is TargetKind.SLOT
                        else child.claim.target
                    )
                    raise ScrubError(
                        f"claim '{child.path}': {what} is already claimed by '{other.path}' (no precedence "
                        f"between '{other.path}' and '{child.path}': claim different positions or components)"
                    )
            seen.append(child)


@dataclass(frozen=True, eq=False)
class CompiledHypothesis:
    """A hypothesis checked against an engine's model and data: `spec` builds its treeified model."""

    hypothesis: Hypothesis
    root: CompiledClaim
    engine: EdgeEngine
    pool: Tensor
    """rows data are drawn from"""
    random_per_path: bool = False
    upstream: dict[Node, frozenset[Node]] = field(default_factory=dict)
    """for every node, the nodes with a path into it"""

    def claims(self) -> list[CompiledClaim]:
        return depth_first(self.root)

    def spec(
        self,
        refs: Tensor,
        generator: torch.Generator,
        *,
        data: Mapping[str, Tensor] | None = None,
        record: dict[str, Tensor] | None = None,
    ) -> Spec:
        """The logits' spec for reference rows ``refs``: each claim's datum drawn with ``generator`` unless
        ``data`` gives it (keys: claim paths, ``path (others)`` for other-inputs data); ``record`` receives
        every datum used, by the same keys."""
        return self.builder(refs, generator, data=data, record=record).root()

    def builder(
        self,
        refs: Tensor,
        generator: torch.Generator,
        *,
        data: Mapping[str, Tensor] | None = None,
        record: dict[str, Tensor] | None = None,
    ) -> _Builder:
        """`spec`'s builder (``.root()`` gives the spec, ``.n_forwards`` counts the inputs it runs on)."""
        return _Builder(self, refs, generator, data or {}, record)

    def rows_per_reference(self) -> int:
        """How many data rows one reference example may need (references, data and other-inputs data)."""
        n = 1
        for c in self.claims():
            n += (c.groups is not None) + (not c.leaf and c.claim.others == "random")
        if self.random_per_path:
            n += sum(len(self.engine.graph.edges_into(c.node)) for c in self.claims() if not c.leaf)
        return n


def compile_hypothesis(
    engine: EdgeEngine,
    hypothesis: Hypothesis,
    *,
    pool: Tensor | None = None,
    random_per_path: bool = False,
    groups: dict[str, Any] | None = None,
) -> CompiledHypothesis:
    """Check ``hypothesis`` against ``engine``'s model (targets, positions, overlaps, features on the engine's
    rows) and return it compiled; raises `ScrubError` naming the claim's path. ``groups`` caches feature
    groupings across hypotheses on the same engine."""
    if hypothesis.output != "logits":
        raise ScrubError(
            f"hypothesis {hypothesis.name!r} is rooted at {hypothesis.output!r}: a model's hypothesis is rooted at "
            "'logits' (graphs: interplab.scrub.graph.scrub_graph)"
        )
    pool = torch.arange(engine.tokens.shape[0]) if pool is None else torch.as_tensor(pool).long()
    compiler = _Compiler(engine, pool, {} if groups is None else groups)
    (root,) = compiler.compile(hypothesis.root, None, "logits", None)
    return CompiledHypothesis(hypothesis, root, engine, pool, random_per_path, _upstream(engine.graph))


class _Builder:
    """Draws every claim's datum for one batch of references and assembles the specs."""

    def __init__(
        self,
        compiled: CompiledHypothesis,
        refs: Tensor,
        gen: torch.Generator,
        data: Mapping[str, Tensor],
        record: dict[str, Tensor] | None,
    ) -> None:
        self.c, self.refs, self.gen, self.data, self.record = compiled, refs, gen, data, record
        self.graph: ComponentGraph = compiled.engine.graph
        self.n_pos = compiled.engine.tokens.shape[1]
        self.n_forwards = 0  # example-inputs the treeified model runs on (a naive implementation's forwards)
        self.rows: list[Tensor] = [refs]
        """every datum drawn (to compute their clean forwards in large batches up front)"""

    # ---- data ------------------------------------------------------------------------------------
    def _given(self, key: str) -> Tensor | None:
        rows = self.data.get(key)
        if rows is None:
            return None
        rows = torch.as_tensor(rows).long()
        if rows.shape != self.refs.shape:
            raise ValueError(
                f"data[{key!r}] has shape {tuple(rows.shape)}, the references {tuple(self.refs.shape)}"
            )
        return rows

    def _keep(self, key: str, rows: Tensor) -> Tensor:
        self.rows.append(rows)
        if self.record is not None:
            self.record[key] = rows
        return rows

    def random(self) -> Tensor:
        self.n_forwards += self.refs.numel()
        pool = self.c.pool
        rows = pool[torch.randint(0, pool.numel(), self.refs.shape, generator=self.gen)]
        self.rows.append(rows)
        return rows

    def datum(self, c: CompiledClaim, parent: Tensor) -> Tensor:
        given = self._given(c.path)
        if given is not None:
            return self._keep(c.path, given)
        return self._keep(c.path, parent if c.groups is None else c.groups.agreeing(parent, self.gen))

    def others(self, c: CompiledClaim, d: Tensor) -> Tensor:
        key = c.path + OTHERS
        if c.claim.others == "same":
            return self._keep(key, d)
        given = self._given(key)
        return self._keep(key, given if given is not None else self.random())

    def leaf(self, d: Tensor) -> Spec:
        self.n_forwards += d.numel()
        return Spec(d)

    # ---- specs -----------------------------------------------------------------------------------
    def root(self) -> Spec:
        root = self.c.root
        d = self._keep(root.path, self.refs)
        value = self.component(root, d)
        assert isinstance(value, Spec)  # the logits are not rewritten
        return value

    def component(self, c: CompiledClaim, d: Tensor) -> Spec | SumOfParts:
        """What claim ``c`` (on a component, or a part) computes its component as, on datum ``d``."""
        if c.leaf:
            return self.leaf(d)
        o = self.others(c, d)
        if c.kind is TargetKind.COMPONENT and c.claim.rewrite is not None:
            return self.rewritten(c, d, o)
        pieces: dict[Edge, list[tuple[tuple[int, ...] | None, Spec | SumOfParts]]] = {}
        context = None
        if c.node.kind is NodeKind.HEAD:
            for child in c.children:
                dc = self.datum(child, d)
                if child.kind is TargetKind.MASK:
                    context = dc
                    continue
                if child.leaf:
                    whole = self.leaf(dc)
                    for slot in child.slots:
                        for edge in self.graph.edges_into(c.node, slot):
                            pieces.setdefault(edge, []).append((child.positions, whole))
                else:
                    oc = self.others(child, dc)
                    self.into(c.node, child.slots, child.positions, oc, child.children, dc, pieces, Spec(oc))
        else:
            self.into(c.node, (Slot.IN,), None, o, c.children, d, pieces, None)
        patches = {edge: self._assemble(edge, ps) for edge, ps in pieces.items()}
        if self.c.random_per_path:
            for edge in self.graph.edges_into(c.node):
                if edge not in patches:
                    patches[edge] = Spec(self.random())
        return Spec(o, patches, context=context)

    def rewritten(self, c: CompiledClaim, d: Tensor, o: Tensor) -> SumOfParts:
        rewrite = c.claim.rewrite
        assert rewrite is not None
        default = Spec(o)
        by_part: dict[str, tuple[Spec, Tensor]] = {}
        for child in c.children:
            dp = self.datum(child, d)
            value = self.component(child, dp)
            assert isinstance(value, Spec)  # parts are not rewritten again
            by_part[child.part] = (value, dp)  # type: ignore[index]
        parts = tuple(Part(fn, *by_part.get(name, (default, o))) for name, fn in rewrite.parts.items())
        rest, rest_rows = by_part.get("residual", (default, o))
        return SumOfParts(parts, rest, rest_rows)

    def into(
        self,
        receiver: Node,
        slots: tuple[Slot, ...],
        positions: tuple[int, ...] | None,
        others: Tensor,
        children: list[CompiledClaim],
        d: Tensor,
        pieces: dict[Edge, list],
        default: Spec | None,
    ) -> None:
        """Add the pieces for the edges into ``receiver``'s ``slots`` at ``positions`` (None: all) that the
        component claims ``children`` (drawn from ``d``) describe; unclaimed edges there get ``default``
        (None: left to the receiver's own input), intermediate components run on ``others``."""
        values = {id(k): self.component(k, self.datum(k, d)) for k in children}
        cover = [(k, k.positions if k.positions is not None else positions) for k in children]
        if all(p == positions for _, p in cover):
            groups = [(positions, children)]
        else:
            by_set: dict[tuple[int, ...], list[int]] = {}
            for p in positions if positions is not None else range(self.n_pos):
                owners = tuple(i for i, (_, cp) in enumerate(cover) if cp is None or p in cp)
                by_set.setdefault(owners, []).append(p)
            groups = [(tuple(ps), [children[i] for i in owners]) for owners, ps in by_set.items()]
        upstream = self.c.upstream
        memo: dict[tuple[Node, frozenset[int]], Spec] = {}
        for group_positions, active in groups:

            def walk(node: Node, node_slots: tuple[Slot, ...], live: list[CompiledClaim], top: bool) -> dict:
                out: dict[Edge, Spec | SumOfParts | PositionPieces] = {}
                spread = [k for k in live if k.all_paths]
                for slot in node_slots:
                    for edge in self.graph.edges_into(node, slot):
                        sender = edge.sender
                        owner = [k for k in (live if top else spread) if k.node == sender]
                        if owner:
                            value = values[id(owner[0])]
                            if not top and owner[0].positions is not None:  # a0.0@1 on every path: there only
                                at = torch.tensor(owner[0].positions, dtype=torch.long)
                                out[edge] = PositionPieces((AtPositions(value, at),))
                            else:
                                out[edge] = value
                            continue
                        through = [k for k in spread if sender not in k.avoid and k.node in upstream[sender]]
                        if through:
                            key = (sender, frozenset(id(k) for k in through))
                            if key not in memo:
                                memo[key] = Spec(others, walk(sender, sender.slots, through, False))
                            out[edge] = memo[key]
                return out

            claimed = walk(receiver, slots, active, True)
            for slot in slots:
                for edge in self.graph.edges_into(receiver, slot):
                    value = claimed.get(edge, default)
                    if value is not None:
                        pieces.setdefault(edge, []).append((group_positions, value))

    def _assemble(self, edge: Edge, ps: list[tuple[tuple[int, ...] | None, Spec | SumOfParts]]):
        if len(ps) == 1 and ps[0][0] is None:
            return ps[0][1]
        if any(p is None for p, _ in ps):
            raise ScrubError(
                f"edge {edge.name} is claimed at all positions and at some positions"
            )  # checked before
        return PositionPieces(tuple(AtPositions(v, torch.tensor(p, dtype=torch.long)) for p, v in ps))


def _upstream(graph: ComponentGraph) -> dict[Node, frozenset[Node]]:
    """For every node, the nodes with a path into it."""
    out: dict[Node, frozenset[Node]] = {}
    for node in graph.nodes:  # topological order: senders first
        ups: set[Node] = set()
        for s in graph.senders(node) if node.slots else ():
            ups |= {s} | out[s]
        out[node] = frozenset(ups)
    return out
