"""The component graph: a `Transformer` seen as nodes that write into and read from the residual stream.

Nodes, in topological order: ``embed`` (token embedding), ``pos_embed`` (learned positions, if any), every
attention head ``a{layer}.{head}``, every MLP ``m{layer}``, and ``logits`` (the input of the final norm).
Senders write into the residual stream; receivers read it through *input slots*: a head has three
(``q``, ``k``, ``v``, normalised separately by ``ln1``), an MLP and the logits have one (``in``).
An `Edge` is one sender's write as read by one receiver slot: ``a0.1->a1.2.k``, ``embed->m0``.

Conventions (chosen here, used by every engine and report):
- a head's output is its ``attn.hook_result`` plus ``b_O / n_heads``, so the heads of a layer sum exactly
  to ``hook_attn_out`` (to the attention output before the post-norm, in models that have one);
  zero-ablating a head removes its share of the bias;
- with parallel attention and MLP, an MLP reads the same residual stream as its layer's heads, so
  heads of layer ``l`` do not send to ``m{l}``;
- grouped-query (and multi-query) attention: every *query* head still has its own ``q``, ``k`` and ``v``
  slots; ``a2.1.k`` is head 2.1's own copy of the key input, made into keys with the weights its group
  shares, so an edge into it changes no other head of the group (the ordinary forward is unchanged: every
  copy of the group is the same);
- post-norms (Gemma-2, ``post_norms=True``): the heads of a layer do not add into the residual stream, their
  normalised sum does. A head's output is its share of the attention output before the post-norm (the
  convention above), and what a receiver slot gets from layer ``l``'s attention is
  ``ln1_post(sum over the heads of each head's output as its edge to that slot carries it)``: patching or
  ablating one head's edge changes that head's term inside the norm, zero-ablating every head of a layer
  gives ``ln1_post(0)``. An MLP's post-norm is part of the MLP node (its output is ``hook_mlp_out``).

>>> graph = ComponentGraph.from_config(model.cfg)
>>> graph.edge("a0.1->a1.2.k")
Edge('a0.1->a1.2.k')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

from interplab.hooks.site import suggest
from interplab.model.config import ModelConfig, Positional
from interplab.model.transformer import Transformer


class NodeKind(str, Enum):
    EMBED = "embed"
    POS_EMBED = "pos_embed"
    HEAD = "head"
    MLP = "mlp"
    LOGITS = "logits"


class Slot(str, Enum):
    """The input of a receiving node that an edge feeds."""

    Q = "q"
    K = "k"
    V = "v"
    IN = "in"


@dataclass(frozen=True)
class Node:
    """One component. ``order`` is its topological rank (senders always come before receivers)."""

    kind: NodeKind
    layer: int | None = None
    head: int | None = None
    order: int = 0

    @property
    def name(self) -> str:
        if self.kind is NodeKind.HEAD:
            return f"a{self.layer}.{self.head}"
        if self.kind is NodeKind.MLP:
            return f"m{self.layer}"
        return self.kind.value

    @property
    def slots(self) -> tuple[Slot, ...]:
        if self.kind is NodeKind.HEAD:
            return (Slot.Q, Slot.K, Slot.V)
        if self.kind in (NodeKind.MLP, NodeKind.LOGITS):
            return (Slot.IN,)
        return ()

    @property
    def is_sender(self) -> bool:
        return self.kind is not NodeKind.LOGITS

    def __repr__(self) -> str:
        return f"Node({self.name!r})"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Edge:
    """``sender``'s output as read by ``receiver``'s input ``slot``."""

    sender: Node
    receiver: Node
    slot: Slot

    @property
    def name(self) -> str:
        return f"{self.sender.name}->{slot_name(self.receiver, self.slot)}"

    def __repr__(self) -> str:
        return f"Edge({self.name!r})"

    def __str__(self) -> str:
        return self.name


def slot_name(node: Node, slot: Slot) -> str:
    """``a1.2.k`` for a head's slot; the node's own name for single-input nodes."""
    return f"{node.name}.{slot.value}" if node.kind is NodeKind.HEAD else node.name


_HEAD = re.compile(r"^a(\d+)\.(\d+)$")
_MLP = re.compile(r"^m(\d+)$")


class ComponentGraph:
    """Every node and edge of one model architecture. Build with `from_config` (or `from_model`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        nodes = [Node(NodeKind.EMBED)]
        if cfg.positional is Positional.LEARNED:
            nodes.append(Node(NodeKind.POS_EMBED))
        for layer in range(cfg.n_layers):
            nodes += [Node(NodeKind.HEAD, layer, h) for h in range(cfg.n_heads)]
            if cfg.has_mlp:
                nodes.append(Node(NodeKind.MLP, layer))
        nodes.append(Node(NodeKind.LOGITS))
        self.nodes: tuple[Node, ...] = tuple(
            Node(n.kind, n.layer, n.head, order=i) for i, n in enumerate(nodes)
        )
        self._by_name = {n.name: n for n in self.nodes}

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ComponentGraph:
        return cls(cfg)

    @classmethod
    def from_model(cls, model: Transformer) -> ComponentGraph:
        return cls(model.cfg)

    # ---- lookup --------------------------------------------------------------------------------
    def node(self, name: str | Node) -> Node:
        """The node called ``name`` (``embed``, ``pos_embed``, ``a1.2``, ``m0``, ``logits``)."""
        if isinstance(name, Node):
            name = name.name
        node = self._by_name.get(name)
        if node is None:
            raise ValueError(self._unknown("node", name, list(self._by_name)))
        return node

    def slot(self, name: str) -> tuple[Node, Slot]:
        """Parse ``a1.2.k`` (a head's input) or ``m0`` / ``logits`` (a single-input node)."""
        if name in self._by_name:
            node = self._by_name[name]
            if node.kind is NodeKind.HEAD:
                raise ValueError(
                    f"{name!r} is a head with three inputs: name one of {name}.q, {name}.k, {name}.v"
                )
            if not node.slots:
                raise ValueError(f"{name!r} reads nothing (it is an embedding), so it has no input")
            return node, Slot.IN
        head, _, slot = name.rpartition(".")
        if head in self._by_name and slot in ("q", "k", "v") and self._by_name[head].kind is NodeKind.HEAD:
            return self._by_name[head], Slot(slot)
        valid = [slot_name(n, s) for n in self.nodes for s in n.slots]
        raise ValueError(self._unknown("node input", name, valid))

    def edge(self, name: str | Edge) -> Edge:
        """Parse ``sender->receiver_slot``, e.g. ``a0.1->a1.2.k`` or ``m1->logits``."""
        if isinstance(name, Edge):
            return name
        if "->" not in name:
            raise ValueError(f"an edge is written 'sender->receiver', e.g. 'a0.1->a1.2.k'; got {name!r}")
        left, right = (s.strip() for s in name.split("->", 1))
        sender = self.node(left)
        receiver, slot = self.slot(right)
        edge = Edge(sender, receiver, slot)
        if edge not in self._edge_set:
            raise ValueError(
                f"no edge {name!r}: {sender.name} does not write before {receiver.name} reads "
                f"(senders of {slot_name(receiver, slot)}: "
                f"{', '.join(s.name for s in self.senders(receiver))})"
            )
        return edge

    def _unknown(self, what: str, name: str, valid: list[str]) -> str:
        close = suggest(name, valid)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"unknown {what} {name!r}{hint} (the model has {self.cfg.n_layers} layers x "
            f"{self.cfg.n_heads} heads; nodes: {', '.join(valid[:6])}, ...)"
        )

    # ---- structure -----------------------------------------------------------------------------
    def senders(self, receiver: Node) -> tuple[Node, ...]:
        """The nodes whose outputs are in the residual stream ``receiver`` reads."""
        if receiver.kind is NodeKind.LOGITS:
            return tuple(n for n in self.nodes if n.is_sender)
        out = []
        for n in self.nodes:
            if not n.is_sender:
                continue
            if n.kind in (NodeKind.EMBED, NodeKind.POS_EMBED):
                out.append(n)
            elif n.layer < receiver.layer:  # type: ignore[operator]
                out.append(n)
            elif (
                receiver.kind is NodeKind.MLP
                and n.kind is NodeKind.HEAD
                and n.layer == receiver.layer
                and not self.cfg.parallel_attn_mlp
            ):
                out.append(n)
        return tuple(out)

    @cached_property
    def edges(self) -> tuple[Edge, ...]:
        """Every edge, grouped by receiver in topological order, senders in order within a slot."""
        return tuple(Edge(s, r, slot) for r in self.nodes for slot in r.slots for s in self.senders(r))

    @cached_property
    def _edge_set(self) -> frozenset[Edge]:
        return frozenset(self.edges)

    def edges_into(self, receiver: Node, slot: Slot | None = None) -> tuple[Edge, ...]:
        return tuple(e for e in self.edges if e.receiver == receiver and (slot is None or e.slot == slot))

    @property
    def senders_all(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.is_sender)

    @property
    def logits(self) -> Node:
        return self.nodes[-1]

    def __repr__(self) -> str:
        return f"ComponentGraph({len(self.nodes)} nodes, {len(self.edges)} edges)"
