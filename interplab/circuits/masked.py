"""`MaskedForward`: a model run with a mask in [0, 1] on every edge of the component graph, differentiably.

Every receiver slot (a head's q, k or v, an MLP's input, the logits) reads

    x_r = sum over its senders s of  m_(s->r) * z_s + (1 - m_(s->r)) * c_s

where ``z_s`` is the sender's output computed in this same masked run (effects flow downstream) and ``c_s``
the sender's value on the task's corrupted input (or its mean / zero ablation). All masks 1 is the model, all
masks 0 the fully corrupted model, a 0/1 mask the edge engine's patched run (``circuit_spec``); a
[batch, n_edges] mask gives every example its own mask. The edges into a receiver group (a layer's heads, an
MLP, the logits) are contiguous in ``graph.edges`` and read as one batched product; all heads of a layer run
in one attention call with per-head q/k/v inputs. `interplab.circuits.masks` learns the masks.

>>> fwd = MaskedForward(model, circuit_task)
>>> logits = fwd(torch.ones(fwd.n_edges))       # the model
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.circuit import DiscoveryTask
from interplab.circuits.engine import Ablation, EdgeEngine
from interplab.circuits.graph import ComponentGraph, Node, NodeKind, Slot
from interplab.circuits.split import kv_per_query_head
from interplab.model.attention import HeadInputs
from interplab.model.transformer import Transformer


@dataclass(frozen=True)
class _Block:
    """The edges into one group of receivers that read the same senders: contiguous in ``graph.edges``."""

    start: int
    """index of the group's first edge"""
    n_receivers: int
    """slots in the group (3 x n_heads for a layer's heads, 1 for an MLP or the logits)"""
    n_senders: int
    """its senders: the first ``n_senders`` of ``graph.senders_all``"""

    @property
    def stop(self) -> int:
        return self.start + self.n_receivers * self.n_senders


def _blocks(graph: ComponentGraph) -> dict[str, _Block]:
    """One block per head layer (``a{l}``), MLP (``m{l}``) and ``logits``, checked against the edge order."""
    senders = graph.senders_all
    blocks: dict[str, _Block] = {}
    start = 0
    for node in graph.nodes:
        if node.kind is NodeKind.HEAD and node.head != 0:
            continue
        if not node.slots:
            continue
        n_s = len(graph.senders(node))
        if senders[:n_s] != graph.senders(node):
            raise ValueError(f"the senders of {node.name} are not a prefix of the graph's senders")
        if node.kind is NodeKind.HEAD:
            heads = [n for n in graph.nodes if n.kind is NodeKind.HEAD and n.layer == node.layer]
            expect = [(h, s) for h in heads for s in (Slot.Q, Slot.K, Slot.V)]
            key, n_r = f"a{node.layer}", 3 * len(heads)
        else:
            expect, key, n_r = [(node, Slot.IN)], node.name, 1
        got = graph.edges[start : start + n_r * n_s]
        want = [(r, slot, s) for r, slot in expect for s in senders[:n_s]]
        if [(e.receiver, e.slot, e.sender) for e in got] != want:
            raise ValueError(
                f"the edges into {key} are not contiguous in graph.edges (receiver, slot, sender)"
            )
        blocks[key] = _Block(start, n_r, n_s)
        start += n_r * n_s
    if start != len(graph.edges):
        raise ValueError(f"{len(graph.edges) - start} edges belong to no receiver group")
    return blocks


class MaskedForward:
    """The model on ``task.clean`` with a mask on every edge; see the module docstring.

    >>> fwd = MaskedForward(model, circuit_task)
    >>> logits = fwd(torch.ones(fwd.n_edges))       # the model
    >>> logits = fwd(torch.zeros(fwd.n_edges))      # the fully corrupted model
    """

    def __init__(self, model: Transformer, task: DiscoveryTask, *, engine: EdgeEngine | None = None) -> None:
        if model.cfg.post_norms:
            raise ValueError(
                "the masked forward needs head outputs that add into the residual stream; post_norms=True "
                "(Gemma-2) normalises the sum of each layer's heads (use the edge engine or EAP-IG there)"
            )
        self.task = task
        self.model = kv_per_query_head(model)  # GQA: the same function with one key/value head per query head
        self.engine = engine or task.engine(model)
        self.graph = self.engine.graph
        self.senders: tuple[Node, ...] = self.graph.senders_all
        self.blocks = _blocks(self.graph)
        if not isinstance(task.corrupt, Ablation) and task.corrupt.shape != task.clean.shape:
            raise ValueError(
                f"task.corrupt has {task.corrupt.numel()} rows, task.clean {task.clean.numel()}: "
                "each clean example needs one corrupted example"
            )
        self._index = {n: i for i, n in enumerate(self.senders)}
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.edge_ends = (
            torch.tensor([order[e.sender] for e in self.graph.edges]),
            torch.tensor([order[e.receiver] for e in self.graph.edges]),
        )
        """(sender, receiver) of every edge, as node indices into ``graph.nodes``"""

    @property
    def n_edges(self) -> int:
        return len(self.graph.edges)

    @property
    def n_examples(self) -> int:
        return self.task.clean.numel()

    def corrupted(self, idx: Int[Tensor, " batch"]) -> Corrupted:
        """Every sender's corrupted value for examples ``idx`` (indices into ``task.clean``)."""
        corrupt, engine = self.task.corrupt, self.engine
        rows = self.task.clean[idx]
        if corrupt is Ablation.ZERO:
            ref = engine.clean_output(self.senders[0], rows)
            values = ref.new_zeros(ref.shape[0], len(self.senders), *ref.shape[1:])
        elif corrupt is Ablation.MEAN:
            means = torch.stack([engine.mean_output(s) for s in self.senders])
            values = means.expand(rows.numel(), *means.shape)
        else:
            assert isinstance(corrupt, Tensor)
            values = torch.stack([engine.clean_output(s, corrupt[idx]) for s in self.senders], dim=1)
        return Corrupted(values, values.cumsum(dim=1))

    def __call__(
        self,
        mask: Float[Tensor, " n_edges"] | Float[Tensor, "batch n_edges"],
        idx: Int[Tensor, " batch"] | None = None,
        *,
        corrupted: Corrupted | None = None,
    ) -> Float[Tensor, "batch pos d_vocab_out"]:
        """Logits of examples ``idx`` (indices into ``task.clean``, repeats allowed; default all) under
        ``mask`` (one mask for all, or one row per example). ``corrupted``: `corrupted(idx)`, if at hand."""
        idx = torch.arange(self.n_examples) if idx is None else idx.long()
        if mask.shape[-1] != self.n_edges or mask.dim() not in (1, 2):
            raise ValueError(
                f"mask must be [n_edges={self.n_edges}] or [batch, n_edges], got {tuple(mask.shape)}"
            )
        if mask.dim() == 2 and mask.shape[0] != idx.numel():
            raise ValueError(
                f"a per-example mask needs {idx.numel()} rows (one per example), got {mask.shape[0]}"
            )
        model, cfg, engine = self.model, self.model.cfg, self.engine
        rows = self.task.clean[idx]
        corrupted = self.corrupted(idx) if corrupted is None else corrupted
        c, c_sum = corrupted.values, corrupted.prefix_sums
        n_fixed = 1 + (len(self.senders) > 1 and self.senders[1].kind is NodeKind.POS_EMBED)
        z = torch.stack([engine.clean_output(s, rows) for s in self.senders[:n_fixed]], dim=1)
        diffs = [z - c[:, :n_fixed]]  # z_s - c_s [batch sender pos d_model] of every sender computed so far
        tokens = engine.tokens[rows]
        ctx = model.context(tokens, None if engine.attention_mask is None else engine.attention_mask[rows])

        def read(key: str) -> Tensor:
            """[batch receiver pos d_model]: the inputs of a receiver group, sum_s c_s + m_s (z_s - c_s)."""
            b = self.blocks[key]
            m = mask[..., b.start : b.stop].unflatten(-1, (b.n_receivers, b.n_senders))
            d = torch.cat(diffs, dim=1) if len(diffs) > 1 else diffs[0]
            d = d[:, : b.n_senders]  # parallel blocks: an MLP does not read its own layer's heads
            m = m.to(d.dtype).expand(
                d.shape[0], -1, -1
            )  # a shared mask as a batch of views: bmm's backward is
            mixed = torch.bmm(m, d.flatten(2)).unflatten(2, d.shape[2:])  # 3x faster than broadcast matmul's
            return mixed + c_sum[:, b.n_senders - 1, None]

        for layer in range(cfg.n_layers):
            block = model.blocks[layer]
            h = cfg.n_heads
            x = read(f"a{layer}").unflatten(1, (h, 3))  # [batch head slot pos d_model]
            inputs = HeadInputs(*(block.ln1(x[:, :, i].transpose(1, 2)) for i in range(3)))
            result = block.attn.head_results(inputs, ctx) + block.attn.b_O / h
            first = self._index[self.graph.node(f"a{layer}.0")]
            diffs.append(result.transpose(1, 2) - c[:, first : first + h])
            if cfg.has_mlp:
                out = block.mlp(block.ln2(read(f"m{layer}")[:, 0]))
                i = self._index[self.graph.node(f"m{layer}")]
                diffs.append((out - c[:, i])[:, None])
        return model.unembed_resid(read("logits")[:, 0])


@dataclass(frozen=True)
class Corrupted:
    """The senders' corrupted values of some examples, and their running sums over the senders."""

    values: Float[Tensor, "batch sender pos d_model"]
    prefix_sums: Float[Tensor, "batch sender pos d_model"]
    """``prefix_sums[:, n - 1]``: the input of a receiver reading the first n senders, all corrupted"""

    def select(self, idx: Int[Tensor, " batch"]) -> Corrupted:
        return Corrupted(self.values[idx], self.prefix_sums[idx])


def connected(fwd: MaskedForward, keep: Tensor) -> Tensor:
    """``keep`` [samples n_edges] (bool) without edges whose sender the input does not reach or whose
    receiver does not reach the logits through kept edges."""
    nodes = fwd.graph.nodes
    send, recv = fwd.edge_ends
    rows, n_nodes = keep.shape[0], len(nodes)
    # forward: a node is reached when it is an embedding or a kept edge from a reached sender enters it
    reached = torch.zeros(rows, n_nodes, dtype=torch.bool)
    for i, node in enumerate(nodes):
        if node.kind in (NodeKind.EMBED, NodeKind.POS_EMBED):
            reached[:, i] = True
        else:
            into = recv == i
            reached[:, i] = (keep[:, into] & reached[:, send[into]]).any(dim=1)
    # backward: a node reaches the logits when a kept edge leaves it into a node that does
    reaches = torch.zeros(rows, n_nodes, dtype=torch.bool)
    reaches[:, -1] = True
    for i in range(n_nodes - 2, -1, -1):
        out = send == i
        reaches[:, i] = (keep[:, out] & reaches[:, recv[out]]).any(dim=1)
    return keep & reached[:, send] & reaches[:, recv]


__all__ = ["Corrupted", "MaskedForward", "connected"]
