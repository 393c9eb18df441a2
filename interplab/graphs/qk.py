"""QK attribution (issue 17 item 7): an attention score, in the replacement model of a prompt, as a bilinear form
of the query side's and the key side's source contributions.

With the prompt's norm scales frozen, the residual stream read by head ``h`` of layer ``l`` at the query position
``q`` is the sum of each graph source's contribution (a feature's decoder writes, an error, a token embedding,
carried through the frozen lower layers) plus a constant (biases, positions); so is the key position's. The
query ``Q = sum_i Q_i + Q_0`` and the key ``K = sum_j K_j + K_0`` follow (ln1 frozen, rotated by their
positions), and the score ``Q . K / attn_scale`` splits exactly into ``pairs[i, j] = Q_i . K_j / attn_scale``
plus the rows and columns of the constants.

>>> from interplab.sae.clt import CLTConfig, CrossLayerTranscoder
>>> clt = CrossLayerTranscoder(CLTConfig(n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, d_sae=64))
>>> qk = qk_attribution(model, clt, tokens[0], layer=1, head=0, query_pos=5, key_pos=2)
>>> abs(float(qk.total) - qk.score) < 1e-4
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from interplab.graphs.attribution import AttributionGraph, _contract_by_position, _sources, attribute
from interplab.graphs.replacement import CLTLike, ReplacementModel
from interplab.hooks.site import Site, SiteKind
from interplab.model.attention import apply_rotary, rotary_tables
from interplab.model.config import Norm, Positional, QKNorm
from interplab.model.transformer import Transformer


@dataclass(frozen=True)
class QKAttribution:
    """``pairs[i, j]``: the part of the score from query-side source i and key-side source j (the graph's
    feature, error and token nodes, in its order); ``query_const`` [source] / ``key_const`` [source] /
    ``const``: the parts with the other side's constant (biases, positions)."""

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

    @property
    def total(self) -> Tensor:
        return self.pairs.sum() + self.query_const.sum() + self.key_const.sum() + self.const

    def top(self, k: int = 10) -> list[tuple[str, str, float]]:
        """The k (query node, key node, part) pairs of largest magnitude, by Neuronpedia node id."""
        ids = self.graph.node_ids()
        flat = self.pairs.flatten()
        order = flat.abs().argsort(descending=True)[:k]
        n = self.pairs.shape[1]
        return [(ids[int(i) // n], ids[int(i) % n], float(flat[i])) for i in order]


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
    if cfg.smear_keys or cfg.attn_softcap is not None or cfg.qk_norm is not QKNorm.NONE:
        raise ValueError(
            "QK attribution needs scores bilinear in the residual stream: no smeared keys, no softcap, no q/k "
            f"norms (this model has smear_keys={cfg.smear_keys}, attn_softcap={cfg.attn_softcap}, "
            f"qk_norm={cfg.qk_norm.value!r})"
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
    with torch.no_grad():
        run = rm.run(tokens[None])
        _, cache = model.run_with_cache(
            run.tokens, names=[Site(SiteKind.RESID_PRE, layer).name, Site(SiteKind.ATTN_SCORES, layer).name]
        )
        resid = cache[Site(SiteKind.RESID_PRE, layer).name][0].to(rm.dtype)  # half precision: in float32
        score = float(cache[Site(SiteKind.ATTN_SCORES, layer).name][0, head, query_pos, key_pos])
        feats = graph.nodes[: graph.n_features]
        idx = [
            torch.tensor(v, dtype=torch.long)
            for v in zip(*[(f.layer, f.position, f.feature) for f in feats], strict=True)
        ]
        layer_i, pos_i, feat_i = idx if feats else [torch.zeros(0, dtype=torch.long)] * 3
        values = torch.tensor([f.value for f in feats], dtype=run.embed.dtype)
        sources = _sources(rm, run, layer_i, pos_i, feat_i, values)
        contrib = {p: _contributions(rm, run, sources, layer, p) for p in {query_pos, key_pos}}
        block = model.blocks[layer]
        W_Q, b_Q = rm.weight(block.attn.W_Q[head]), rm.weight(block.attn.b_Q[head])
        kv = head // cfg.n_groups
        W_K, b_K = rm.weight(block.attn.W_K[kv]), rm.weight(block.attn.b_K[kv])

        def project(pos: int, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
            """Each source's part of the projection at ``pos`` [source d_head], and the constant's [d_head]."""
            c = contrib[pos]
            scale = run.frozen.ln1_scale[layer]
            norm: Any = block.ln1
            s = scale[0, pos] if scale is not None else None
            parts = (_centre(norm, c) / s * norm.w if s is not None else c) @ W
            whole = _apply_norm(norm, resid[pos], s) @ W + b
            const = whole - parts.sum(0)
            if cfg.positional is Positional.ROTARY:
                cos, sin = rotary_tables(cfg.rotary_config(layer), torch.tensor([[pos]]), parts.dtype)
                rot = lambda x: apply_rotary(x[None, None], cos, sin, cfg.rotary_style)[0, 0]  # noqa: E731
                parts, const = rot(parts), rot(const[None])[0]
            return parts, const

        q, q0 = project(query_pos, W_Q, b_Q)
        k, k0 = project(key_pos, W_K, b_K)
        a = cfg.attn_scale
        pairs = q @ k.T / a
    return QKAttribution(
        graph, layer, head, query_pos, key_pos, pairs, q @ k0 / a, q0 @ k.T / a, float(q0 @ k0 / a), score
    )


def _centre(norm: object, x: Tensor) -> Tensor:
    return x - x.mean(-1, keepdim=True) if getattr(norm, "kind", None) is Norm.LAYERNORM else x


def _apply_norm(norm: object, x: Tensor, scale: Tensor | None) -> Tensor:
    if scale is None:
        return x
    out = _centre(norm, x) / scale * norm.w  # type: ignore[attr-defined]
    return out + norm.b if getattr(norm, "kind", None) is Norm.LAYERNORM else out  # type: ignore[attr-defined]


def _contributions(rm: ReplacementModel, run, sources, layer: int, pos: int) -> Tensor:  # noqa: ANN001
    """[source d_model]: each graph source's contribution to ``resid_pre`` of ``layer`` at ``pos``, by the
    transpose of the frozen forward applied to the d_model basis vectors there."""
    d = rm.cfg.d_model
    basis = torch.zeros(d, run.tokens.shape[1], d, dtype=run.embed.dtype)
    basis[torch.arange(d), pos, torch.arange(d)] = 1.0
    feats = torch.zeros(d, sources.n_features, dtype=basis.dtype)
    errors = torch.zeros(d, rm.cfg.n_layers, run.tokens.shape[1], dtype=basis.dtype)

    def on_mlp_out(m: int, g: Tensor) -> None:
        index, p, vec = sources.decoders[m]
        if index.numel():
            feats.index_add_(1, index, _contract_by_position(g, p, vec))
        errors[:, m] = (g * sources.errors[:, m]).sum(-1)

    g_embed = rm.backward(run.frozen, lambda _l: None, None, on_mlp_out, resid_pre=(layer, basis))
    tokens = (g_embed * sources.embed).sum(-1)
    return torch.cat([feats, errors.reshape(d, -1), tokens], dim=1).T
