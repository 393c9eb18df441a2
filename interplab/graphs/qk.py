"""QK attribution (issue 17 item 7): an attention score, in the replacement model of a prompt, as a bilinear form
of the query side's and the key side's source contributions.

With the prompt's norm scales frozen, the residual stream read by head ``h`` of layer ``l`` at the query position
``i`` is the sum of each graph source's contribution (a feature's decoder writes, an error, a token embedding,
carried through the frozen lower layers) plus a constant (biases, positions); so is the key position's. The
query ``Q = sum_s Q_s + Q_0`` and the key ``K = sum_s K_s + K_0`` follow (ln1 and any q/k norm with their scales
frozen, rotated by their positions), and the score ``Q . K / attn_scale`` splits exactly into
``pairs[s, t] = Q_s . K_t / attn_scale`` plus the rows and columns of the constants.

**Smeared keys** (``smear_keys``): the key at ``j`` is ``g k_j + (1 - g) k_{j-1}`` with ``g = sigmoid(smear)``
of its key/value head, ``k_p`` the raw key of position ``p`` (after the q/k norm, before rotary: rotated at
``j``). Each key-side source then reaches the key twice, through the residual stream at ``j`` and at ``j - 1``:
``K_t = rot_j(g k_t(j)) + rot_j((1 - g) k_t(j - 1))``, and the second part is kept apart (``pairs_prev``,
``key_const_prev``): the induction mechanism, a query matching the token *before* the key, is in it.

**q/k norms** (``qk_norm``, an RMSNorm of each head's or all heads' queries and keys): their scales are frozen
at the model's own, as the replacement model freezes ln1's, so the parts are exact for the frozen forward
(they sum to the model's score); they are the linear effects at this prompt, not what a source would do if its
removal changed the scale. Soft-capped scores (``attn_softcap``: ``c tanh(score / c)``) are not a sum of parts
and are refused.

>>> from interplab.sae.clt import CLTConfig, CrossLayerTranscoder
>>> clt = CrossLayerTranscoder(CLTConfig(n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, d_sae=64))
>>> qk = qk_attribution(model, clt, tokens[0], layer=1, head=0, query_pos=5, key_pos=2)
>>> abs(float(qk.total) - qk.score) < 1e-4
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from interplab.graphs.attribution import AttributionGraph, _contract_by_position, _sources, attribute
from interplab.graphs.replacement import CLTLike, ReplacementModel
from interplab.hooks.site import Site, SiteKind
from interplab.model.attention import apply_rotary, rotary_tables
from interplab.model.config import Norm, Positional, QKNorm
from interplab.model.transformer import Transformer


class QKPair(NamedTuple):
    """One part of a score: query-side node, key-side node, the part, and the position whose raw key it came
    through (``key_pos``, or ``key_pos - 1`` through the smear)."""

    query: str
    key: str
    part: float
    through: int


@dataclass(frozen=True)
class QKAttribution:
    """``pairs[s, t]``: the part of the score from query-side source s and key-side source t (the graph's
    feature, error and token nodes, in its order) through the key position's own raw key; ``pairs_prev[s, t]``
    the part through the previous position's (smeared keys; None without them or at key position 0);
    ``query_const`` [source]: each query-side source against the key's constant (biases, positions);
    ``key_const`` [source]: the query's constant against each key-side source; ``const``: constant against
    constant. Each ``*_prev`` is its twin through the previous position's raw key, so the score is
    ``current + through_previous``."""

    graph: AttributionGraph
    layer: int
    head: int
    query_pos: int
    key_pos: int
    pairs: Tensor
    query_const: Tensor
    key_const: Tensor
    const: float
    score: float
    """the model's pre-softmax score (``attn.hook_attn_scores``)"""
    pairs_prev: Tensor | None = None
    query_const_prev: Tensor | None = None
    key_const_prev: Tensor | None = None
    const_prev: float = 0.0
    gate: float | None = None
    """smeared keys: the key head's ``g = sigmoid(smear)``, the weight of the key position's own raw key"""

    @property
    def total(self) -> Tensor:
        """Every part summed: the score (to float precision)."""
        return self.current + self.through_previous

    @property
    def current(self) -> Tensor:
        """The part of the score through the key position's own raw key (all of it without smeared keys)."""
        return self.pairs.sum() + self.query_const.sum() + self.key_const.sum() + self.const

    @property
    def through_previous(self) -> Tensor:
        """The part of the score through the previous position's raw key (smeared keys; 0 without)."""
        if self.pairs_prev is None or self.query_const_prev is None or self.key_const_prev is None:
            return torch.zeros((), dtype=self.pairs.dtype)
        return (
            self.pairs_prev.sum() + self.query_const_prev.sum() + self.key_const_prev.sum() + self.const_prev
        )

    def top(self, k: int = 10) -> list[QKPair]:
        """The k (query node, key node, part, position the key part came through) of largest magnitude, by
        Neuronpedia node id, over both routes (parts that are exactly zero left out)."""
        ids = self.graph.node_ids()
        blocks = [(self.pairs, self.key_pos)]
        if self.pairs_prev is not None:
            blocks.append((self.pairs_prev, self.key_pos - 1))
        flat = torch.cat([b.flatten() for b, _ in blocks])
        order = flat.abs().argsort(descending=True)[:k]
        order = order[flat[order] != 0]
        n, size = self.pairs.shape[1], self.pairs.numel()
        out = []
        for i in order.tolist():
            route, j = divmod(i, size)
            out.append(QKPair(ids[j // n], ids[j % n], float(flat[i]), blocks[route][1]))
        return out

    def to_dict(self, k: int = 10) -> dict[str, Any]:
        """The score, its routes and the k largest pairs (JSON-ready)."""
        return {
            "layer": self.layer,
            "head": self.head,
            "query_pos": self.query_pos,
            "key_pos": self.key_pos,
            "score": self.score,
            "total": float(self.total),
            "gate": self.gate,
            "current": float(self.current),
            "through_previous": float(self.through_previous),
            "top": [p._asdict() for p in self.top(k)],
        }


def qk_attribution(
    model: Transformer,
    clt: CLTLike,
    tokens: Tensor | Sequence[int],
    *,
    layer: int,
    head: int,
    query_pos: int,
    key_pos: int,
    graph: AttributionGraph | None = None,
) -> QKAttribution:
    """Split the score of head ``head`` of ``layer`` from ``query_pos`` to ``key_pos`` (see the module)."""
    cfg = model.cfg
    if cfg.attn_softcap is not None:
        raise ValueError(
            f"QK attribution needs scores that are a sum of parts: this model soft-caps them (attn_softcap="
            f"{cfg.attn_softcap}: c tanh(score / c)), which is not; valid: attn_softcap None (smeared keys and "
            "q/k norms are fine)"
        )
    tokens = torch.as_tensor(tokens).reshape(-1)
    n_pos = len(tokens)
    if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads and 0 <= key_pos <= query_pos < n_pos):
        raise ValueError(
            f"layer {layer}, head {head}, query {query_pos}, key {key_pos}: the model has {cfg.n_layers} layers and "
            f"{cfg.n_heads} heads, the prompt {n_pos} positions (the key at or before the query)"
        )
    graph = graph if graph is not None else attribute(model, clt, tokens, targets=1)
    rm = ReplacementModel(model, clt)
    smear = cfg.smear_keys and key_pos > 0
    qk_norm = cfg.qk_norm is not QKNorm.NONE
    names = [Site(SiteKind.RESID_PRE, layer).name, Site(SiteKind.ATTN_SCORES, layer).name]
    if qk_norm:
        names += [Site(SiteKind.Q_NORM_SCALE, layer).name, Site(SiteKind.K_NORM_SCALE, layer).name]
    with torch.no_grad():
        run = rm.run(tokens[None])
        _, cache = model.run_with_cache(run.tokens, names=names)
        resid = cache[names[0]][0].to(rm.dtype)  # half precision: in float32
        score = float(cache[names[1]][0, head, query_pos, key_pos])
        feats = graph.nodes[: graph.n_features]
        idx = [
            torch.tensor(v, dtype=torch.long)
            for v in zip(*[(f.layer, f.position, f.feature) for f in feats], strict=True)
        ]
        layer_i, pos_i, feat_i = idx if feats else [torch.zeros(0, dtype=torch.long)] * 3
        values = torch.tensor([f.value for f in feats], dtype=run.embed.dtype)
        sources = _sources(rm, run, layer_i, pos_i, feat_i, values)
        positions = sorted({query_pos, key_pos} | ({key_pos - 1} if smear else set()))
        contrib = dict(zip(positions, _contributions(rm, run, sources, layer, positions), strict=True))
        block = model.blocks[layer]
        attn: Any = block.attn
        kv = head // cfg.n_groups
        W_Q, b_Q = rm.weight(attn.W_Q[head]), rm.weight(attn.b_Q[head])
        W_K, b_K = rm.weight(attn.W_K[kv]), rm.weight(attn.b_K[kv])

        def qk_scale(kind: SiteKind, pos: int, h: int, norm: Any) -> tuple[Tensor, Tensor] | None:
            """A q/k norm's frozen scale at ``pos`` and its weight, for head (or key head) ``h``."""
            if not qk_norm:
                return None
            s = cache[Site(kind, layer).name][0, pos]  # [heads 1] or [1 1]
            s = s[h if s.shape[0] > 1 else 0].to(rm.dtype)
            w = rm.weight(norm.w)
            return s, (w[h] if w.dim() == 2 else w)

        def project(
            pos: int, W: Tensor, b: Tensor, kind: SiteKind, h: int, norm: Any
        ) -> tuple[Tensor, Tensor]:
            """Each source's part of the raw query or key at ``pos`` [source d_head] (after a q/k norm, before
            rotary), and the constant's [d_head]."""
            c = contrib[pos]
            scale = run.frozen.ln1_scale[layer]
            ln1: Any = block.ln1
            s = scale[0, pos] if scale is not None else None
            parts = (_centre(ln1, c) / s * rm.weight(ln1.w) if s is not None else c) @ W
            whole = _apply_norm(ln1, resid[pos], s, rm) @ W + b
            qs = qk_scale(kind, pos, h, norm)
            if qs is not None:
                parts, whole = parts / qs[0] * qs[1], whole / qs[0] * qs[1]
            return parts, whole - parts.sum(0)

        def rotate(x: Tensor, pos: int) -> Tensor:
            if cfg.positional is not Positional.ROTARY:
                return x
            cos, sin = rotary_tables(cfg.rotary_config(layer), torch.tensor([[pos]]), x.dtype)
            return apply_rotary(x[None, None], cos, sin, cfg.rotary_style)[0, 0]

        def rotated(pos: int, W: Tensor, b: Tensor, kind: SiteKind, h: int, norm: Any, at: int, w: float):
            parts, const = project(pos, W, b, kind, h, norm)
            return rotate(w * parts, at), rotate(w * const[None], at)[0]

        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        q, q0 = rotated(query_pos, W_Q, b_Q, SiteKind.Q_NORM_SCALE, head, q_norm, query_pos, 1.0)
        gate = float(torch.sigmoid(attn.smear[kv].float())) if cfg.smear_keys else None
        k, k0 = rotated(
            key_pos, W_K, b_K, SiteKind.K_NORM_SCALE, kv, k_norm, key_pos, 1.0 if gate is None else gate
        )
        a = cfg.attn_scale
        prev: tuple[Tensor | None, Tensor | None, Tensor | None, float] = (None, None, None, 0.0)
        if smear:
            assert gate is not None
            kp, kp0 = rotated(key_pos - 1, W_K, b_K, SiteKind.K_NORM_SCALE, kv, k_norm, key_pos, 1.0 - gate)
            prev = (q @ kp.T / a, q @ kp0 / a, q0 @ kp.T / a, float(q0 @ kp0 / a))
        pairs = q @ k.T / a
    return QKAttribution(
        graph,
        layer,
        head,
        query_pos,
        key_pos,
        pairs,
        q @ k0 / a,
        q0 @ k.T / a,
        float(q0 @ k0 / a),
        score,
        *prev,
        gate=gate,
    )


def _centre(norm: object, x: Tensor) -> Tensor:
    return x - x.mean(-1, keepdim=True) if getattr(norm, "kind", None) is Norm.LAYERNORM else x


def _apply_norm(norm: object, x: Tensor, scale: Tensor | None, rm: ReplacementModel) -> Tensor:
    if scale is None:
        return x
    out = _centre(norm, x) / scale * rm.weight(norm.w)  # type: ignore[attr-defined]
    return out + rm.weight(norm.b) if getattr(norm, "kind", None) is Norm.LAYERNORM else out  # type: ignore[attr-defined]


def _contributions(rm: ReplacementModel, run, sources, layer: int, positions: list[int]) -> list[Tensor]:  # noqa: ANN001
    """Per position, [source d_model]: each graph source's contribution to ``resid_pre`` of ``layer`` there, by
    the transpose of the frozen forward applied to the d_model basis vectors at those positions (one backward)."""
    d, n = rm.cfg.d_model, len(positions)
    rows = n * d
    basis = torch.zeros(rows, run.tokens.shape[1], d, dtype=run.embed.dtype)
    r = torch.arange(rows)
    basis[r, torch.tensor(positions).repeat_interleave(d), r % d] = 1.0
    feats = torch.zeros(rows, sources.n_features, dtype=basis.dtype)
    errors = torch.zeros(rows, rm.cfg.n_layers, run.tokens.shape[1], dtype=basis.dtype)

    def on_mlp_out(m: int, g: Tensor) -> None:
        index, p, vec = sources.decoders[m]
        if index.numel():
            feats.index_add_(1, index, _contract_by_position(g, p, vec))
        errors[:, m] = (g * sources.errors[:, m]).sum(-1)

    g_embed = rm.backward(run.frozen, lambda _l: None, None, on_mlp_out, resid_pre=(layer, basis))
    tokens = (g_embed * sources.embed).sum(-1)
    out = torch.cat([feats, errors.reshape(rows, -1), tokens], dim=1)  # [rows source]
    return [out[i * d : (i + 1) * d].T for i in range(n)]


__all__ = ["QKAttribution", "QKPair", "qk_attribution"]
