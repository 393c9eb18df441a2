"""Validating a graph by intervention: clamp or scale features (or supernodes, lists of features) and compare the
change of the target logits with what the graph predicts.

Two places to intervene (``mode``):

- ``"replacement"``: the local replacement model of the prompt (attention patterns and norm scales frozen, the
  error terms held at their values): every layer's features are re-encoded from the new residual stream, the
  intervened ones set, and the MLP output is the CLT's reconstruction plus the error. Without interventions it
  is the original forward exactly.
- ``"model"``: the real model, with each intervened feature's change of activation written through the CLT's
  decoder into every MLP output it writes (``blocks.{m}.hook_mlp_out``, m >= its layer) at its position; the
  model's own MLPs, attention and norms respond.

The graph's prediction propagates the change linearly through the graph's edges: a feature whose activation
changes by a fraction ``r_s`` of itself changes each later active feature's pre-activation (and, while it stays
active, its activation) and each target by ``A[t, s] r_s``; clamped features keep their value. A feature that is
not active in the graph has no edges: its prediction is NaN.

>>> from interplab.sae.clt import CLTConfig, CrossLayerTranscoder
>>> clt = CrossLayerTranscoder(CLTConfig(n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, d_sae=64))
>>> graph = attribute(model, clt, tokens[0], targets=3)
>>> f = graph.nodes[0]  # the first active feature
>>> result = intervene(model, clt, tokens[0], [Intervention(f.layer, f.position, f.feature, scale=1.0)], graph=graph)
>>> bool(result.actual.abs().max() < 1e-4), bool(result.predicted.abs().max() < 1e-9)
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from interplab.graphs.attribution import AttributionGraph, attribute
from interplab.graphs.nodes import NodeKind, Target
from interplab.graphs.replacement import CLTLike, ReplacementModel, writes_to
from interplab.hooks.site import Site, SiteKind
from interplab.model.transformer import Transformer
from interplab.plots import save_result

if TYPE_CHECKING:
    import plotly.graph_objects as go

Mode = Literal["replacement", "model"]


@dataclass(frozen=True)
class Intervention:
    """Set feature ``feature`` of layer ``layer`` at ``position`` to ``value``, or multiply it by ``scale``
    (exactly one of the two)."""

    layer: int
    position: int
    feature: int
    value: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.scale is None):
            raise ValueError(
                f"Intervention on feature {self.feature} of layer {self.layer}: give exactly one of value= "
                f"(clamp) or scale=, got value={self.value}, scale={self.scale}"
            )

    def new_value(self, activation: float) -> float:
        return float(self.value) if self.value is not None else float(self.scale) * activation  # type: ignore[arg-type]

    @classmethod
    def parse(cls, text: str) -> Intervention:
        """``LAYER:POS:FEATURE=VALUE`` (clamp) or ``LAYER:POS:FEATURE*SCALE``, as the CLI takes them."""
        try:
            if "*" in text:
                where, amount = text.split("*")
                kw: dict[str, float] = {"scale": float(amount)}
            else:
                where, amount = text.split("=")
                kw = {"value": float(amount)}
            layer, position, feature = (int(x) for x in where.split(":"))
        except ValueError:
            raise ValueError(
                f"intervention {text!r}: write LAYER:POS:FEATURE=VALUE to clamp or LAYER:POS:FEATURE*SCALE to scale"
            ) from None
        return cls(layer, position, feature, **kw)


def supernode(
    features: Sequence[tuple[int, int, int]], *, value: float | None = None, scale: float | None = None
) -> list[Intervention]:
    """The same clamp or scale applied to every (layer, position, feature) of a supernode."""
    if not features:
        raise ValueError("a supernode needs at least one (layer, position, feature)")
    return [Intervention(layer, pos, feat, value=value, scale=scale) for layer, pos, feat in features]


@dataclass(frozen=True)
class InterventionResult:
    """Each target's read-out (a logit minus the mean logit, or a logit difference) at the last position before
    and after the interventions, and the graph's linear prediction of the change."""

    labels: list[str]
    before: Tensor
    after: Tensor
    predicted: Tensor
    """the predicted change (NaN where an intervened feature is not in the graph)"""
    mode: str
    interventions: list[Intervention]

    @property
    def actual(self) -> Tensor:
        """the measured change"""
        return self.after - self.before

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "labels": self.labels,
            "before": self.before.tolist(),
            "after": self.after.tolist(),
            "actual": self.actual.tolist(),
            "predicted": [None if math.isnan(v) else v for v in self.predicted.tolist()],
            "interventions": [vars(i) for i in self.interventions],
        }

    def save(self, path: str | Path) -> Path:
        """``.json`` (a result document) or a picture (``.html``, ``.png``, ``.svg``)."""
        return save_result(self, path)

    def plot(self) -> go.Figure:
        """The measured change of each target beside the graph's prediction."""
        import plotly.graph_objects as go

        fig = go.Figure(
            [
                go.Bar(name="measured", x=self.labels, y=self.actual.tolist()),
                go.Bar(name="graph's prediction", x=self.labels, y=self.predicted.tolist()),
            ]
        )
        fig.update_layout(
            barmode="group",
            template="plotly_white",
            title=f"interventions in the {self.mode}: change of the target logits",
            yaxis_title="change",
        )
        return fig

    def __repr__(self) -> str:
        rows = ", ".join(
            f"{label}: {a:+.4g} (graph {p:+.4g})"
            for label, a, p in zip(self.labels, self.actual.tolist(), self.predicted.tolist(), strict=True)
        )
        return f"InterventionResult({self.mode}: {rows})"


def intervene(
    model: Transformer,
    clt: CLTLike,
    tokens: Tensor | Sequence[int],
    interventions: Sequence[Intervention],
    *,
    mode: Mode = "replacement",
    graph: AttributionGraph | None = None,
    targets: Any = None,
) -> InterventionResult:
    """Apply ``interventions`` to the prompt ``tokens`` in ``mode`` (see the module docstring) and measure the
    targets of ``graph`` (computed with ``targets`` when not given) against its prediction."""
    if mode not in ("replacement", "model"):
        raise ValueError(f"mode={mode!r}: choose 'replacement' or 'model'")
    interventions = list(interventions)
    if not interventions:
        raise ValueError("no interventions given")
    tokens = torch.as_tensor(tokens).reshape(-1)
    rm = ReplacementModel(model, clt)
    n_layers, n_pos, d_sae = model.cfg.n_layers, len(tokens), clt.cfg.d_sae
    for iv in interventions:
        if not (0 <= iv.layer < n_layers and 0 <= iv.position < n_pos and 0 <= iv.feature < d_sae):
            raise ValueError(
                f"intervention at layer {iv.layer}, position {iv.position}, feature {iv.feature}: the model has "
                f"{n_layers} layers, the prompt {n_pos} positions, the CLT {d_sae} features per layer"
            )
    if graph is None:
        graph = attribute(model, clt, tokens, targets)
    with torch.no_grad():
        run = rm.run(tokens[None])
        # the replacement model's own logits (a half-precision model's differ from them by its rounding)
        unchanged = run.logits if mode == "replacement" else run.original_logits
        before = _readouts(unchanged[0, -1], graph.targets, model)
        if mode == "replacement":
            logits = _replacement_logits(rm, run, interventions)
        else:
            logits = _model_logits(model, clt, run.tokens, run.acts, interventions)
        after = _readouts(logits[0, -1], graph.targets, model)
    return InterventionResult(
        labels=[t.label for t in graph.targets],
        before=before,
        after=after,
        predicted=predict(graph, interventions),
        mode=mode,
        interventions=interventions,
    )


def _readouts(logits: Tensor, targets: list[Target], model: Transformer) -> Tensor:
    """Each target's read-out of the last position's logits: logit minus the mean logit, or a difference."""
    out = []
    for t in targets:
        if t.token_b is not None:
            out.append(logits[t.token] - logits[t.token_b])
        else:
            out.append(logits[t.token] - logits.mean())
    return torch.stack(out).detach().double().cpu()


def _replacement_logits(rm: ReplacementModel, run: Any, interventions: list[Intervention]) -> Tensor:
    clt, errors = rm.clt, run.errors
    acts: dict[int, Tensor] = {}

    def mlp_out(layer: int, x: Tensor) -> Tensor:
        a = clt.encode_layer(layer, x).to(x.dtype)
        for iv in interventions:
            if iv.layer == layer:
                a[:, iv.position, iv.feature] = iv.new_value(float(a[0, iv.position, iv.feature]))
        acts[layer] = a
        out = rm.weight(clt.b_dec[layer]) + errors[:, :, layer]
        for src in range(layer + 1):
            if layer in writes_to(clt, src):
                out = out + acts[src] @ rm.weight(clt.decoder(src, layer))
        return out

    return rm.forward(run.tokens, run.frozen, run.embed, mlp_out).logits


def _model_logits(
    model: Transformer, clt: CLTLike, tokens: Tensor, acts: Tensor, interventions: list[Intervention]
) -> Tensor:
    """The real model with each intervention's change of activation written through the decoders."""
    deltas: dict[int, Tensor] = {}
    for iv in interventions:
        old = float(acts[0, iv.position, iv.layer, iv.feature])
        change = iv.new_value(old) - old
        for m in writes_to(clt, iv.layer):
            d = deltas.setdefault(m, torch.zeros(tokens.shape[1], model.cfg.d_model, dtype=acts.dtype))
            d[iv.position] += change * clt.decoder(iv.layer, m)[iv.feature].detach()

    def add(layer: int):  # noqa: ANN202
        def hook(act: Tensor, _site: Site) -> Tensor:
            return act + deltas[layer].to(act.dtype)

        return hook

    hooks = [(Site(SiteKind.MLP_OUT, m).name, add(m)) for m in deltas]
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


def predict(graph: AttributionGraph, interventions: Sequence[Intervention]) -> Tensor:
    """The graph's linear prediction of each target's change (see the module docstring)."""
    A = graph.adjacency.double()
    n = len(graph.nodes)
    rel = torch.zeros(n, dtype=torch.float64)
    fixed = torch.zeros(n, dtype=torch.bool)
    for iv in interventions:
        try:
            i = graph.feature_index(iv.layer, iv.position, iv.feature)
        except KeyError:
            return torch.full((graph.n_logits,), math.nan, dtype=torch.float64)
        a = graph.nodes[i].value or 0.0
        rel[i] = (iv.new_value(a) - a) / a
        fixed[i] = True
    feats = graph.nodes[: graph.n_features]
    values = torch.tensor([f.value or 0.0 for f in feats], dtype=torch.float64)
    layers = torch.tensor([f.layer if f.layer is not None else -1 for f in feats])
    for layer in range(graph.n_layers):
        idx = torch.nonzero((layers == layer) & ~fixed[: graph.n_features]).flatten()
        if idx.numel():
            rel[idx] = (A[idx] @ rel) / values[idx]
    assert all(node.kind is NodeKind.LOGIT for node in graph.nodes[graph.logit_slice])
    return A[graph.logit_slice] @ rel
