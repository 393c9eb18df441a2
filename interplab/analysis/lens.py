"""Lenses: the logit lens, direct logit attribution (DLA) and the residual-stream decomposition.

The logit lens unembeds the residual stream entering every layer (and the final one) exactly as the
model unembeds its last one: the final norm is applied to each intermediate stream with that stream's
own scale.

DLA and the decomposition project components onto a logit-difference direction through the final norm
*linearised at the cached scale*: a component ``c`` contributes ``centre(c) / scale . (w * (W_U[:, a] -
W_U[:, b]))``, where ``scale`` is the final norm's scale on the real residual stream, ``centre``
subtracts the mean (LayerNorm only) and ``w`` is the norm's weight. Because every component uses the
same cached scale, the contributions of all components plus the bias term (norm bias and unembedding
bias) sum exactly to the model's logit difference; what is approximate is reading a single component's
contribution as its effect, since removing it would change the scale. Models with post-attention norms
or a logit soft-cap break the exact sum.

>>> dla = direct_logit_attribution(model, tokens, answer=a, wrong=b)
>>> abs(dla.total - dla.sum_of_components()) < 1e-4     # the components add up to the logit difference
True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interplab import plots
from interplab.analysis.metrics import LogitDiff, _as_index
from interplab.analysis.targets import token_labels
from interplab.hooks.cache import ActivationCache
from interplab.hooks.site import Site, SiteKind
from interplab.model import Transformer

# the global (layer-less) sites the lenses read
EMBED, POS_EMBED, LN_FINAL_SCALE = (
    Site(k).name for k in (SiteKind.EMBED, SiteKind.POS_EMBED, SiteKind.LN_FINAL_SCALE)
)


# ---- logit lens ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogitLensResult:
    """Per layer (the stream entering each block, then the final one) and position."""

    logprob_next: Tensor
    """log-probability of the actual next token [layer+1, pos-1], mean over the batch"""
    top_tokens: tuple[tuple[str, ...], ...]
    """the top prediction of example 0 at each [layer+1][pos]"""
    layer_labels: tuple[str, ...]
    """'L0 pre' ... 'final'"""
    tokens: tuple[str, ...]
    """position labels of example 0"""

    def __repr__(self) -> str:
        return (
            f"LogitLensResult({len(self.layer_labels)} layers x {len(self.tokens) - 1} positions; "
            f"final mean log p(next) {float(self.logprob_next[-1].mean()):.3f})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layer_labels),
            "tokens": list(self.tokens),
            "logprob_next": self.logprob_next.tolist(),
            "top_tokens": [list(r) for r in self.top_tokens],
        }

    def plot(self, title: str = "logit lens: log-prob of the next token (text: top prediction)"):  # noqa: ANN201
        return plots.heatmap(
            self.logprob_next,
            x_labels=self.tokens[:-1],
            y_labels=self.layer_labels,
            x_title="position",
            y_title="layer",
            title=title,
            diverging=False,
            colorbar_title="log p",
            text=[r[:-1] for r in self.top_tokens],
        )

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def _accumulated(model: Transformer, cache: ActivationCache) -> tuple[list[Tensor], tuple[str, ...]]:
    n = model.cfg.n_layers
    streams = [cache[("resid_pre", layer)] for layer in range(n)] + [cache[("resid_post", n - 1)]]
    return streams, tuple([f"L{layer} pre" for layer in range(n)] + ["final"])


def logit_lens(
    model: Transformer, tokens: Int[Tensor, "batch pos"], *, attention_mask: Tensor | None = None
) -> LogitLensResult:
    """Unembed the residual stream at every layer (final norm applied with each stream's own scale)."""
    tokens = model.check_tokens(torch.as_tensor(tokens).to(model.W_E.device), None)
    n = model.cfg.n_layers
    names = [Site(SiteKind.RESID_PRE, layer).name for layer in range(n)] + [
        Site(SiteKind.RESID_POST, n - 1).name
    ]
    _, cache = model.run_with_cache(tokens, names, attention_mask=attention_mask)
    streams, labels = _accumulated(model, cache)
    logprobs, tops = [], []
    tok = getattr(model, "tokenizer", None)
    with torch.no_grad():
        for resid in streams:
            lp = torch.log_softmax(model.unembed_resid(resid).float(), dim=-1)
            nxt = lp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
            if attention_mask is not None:
                w = attention_mask[:, 1:].to(nxt)
                logprobs.append((nxt * w).sum(0) / w.sum(0).clamp(min=1))
            else:
                logprobs.append(nxt.mean(0))
            ids = lp[0].argmax(-1).tolist()
            tops.append(tuple(tok.decode([i]) if tok is not None else str(i) for i in ids))
    return LogitLensResult(
        logprob_next=torch.stack(logprobs).cpu(),
        top_tokens=tuple(tops),
        layer_labels=labels,
        tokens=token_labels(model, tokens[0]),
    )


# ---- direct logit attribution -------------------------------------------------------------------------
def _direction(model: Transformer, answer: Tensor, wrong: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """(norm weight * unembedding difference) [batch d_model] and the bias term [batch]."""
    a, b = _as_index(answer, "answer"), _as_index(wrong, "wrong")
    a, b = a.expand(batch) if a.numel() == 1 else a, b.expand(batch) if b.numel() == 1 else b
    if a.numel() != batch or b.numel() != batch:
        raise ValueError(f"answer/wrong have {a.numel()}/{b.numel()} ids for a batch of {batch}")
    n_out = model.W_U.shape[1]
    for ids in (a, b):
        if bool((ids < 0).any()) or bool((ids >= n_out).any()):
            raise ValueError(f"token ids {ids.tolist()} out of range for d_vocab_out={n_out}")
    dev = model.W_U.device
    a, b = a.to(dev), b.to(dev)
    u = (model.W_U[:, a] - model.W_U[:, b]).T  # batch d_model
    bias = model.unembed.b_U[a] - model.unembed.b_U[b]
    norm = model.ln_final
    w = getattr(norm, "w", None)
    if w is not None:
        bias = bias + (getattr(norm, "b", torch.zeros_like(w)) * u).sum(-1)
        u = u * w
    return u, bias


def _read_positions(positions: Tensor | int | None, batch: int, n_pos: int, device: torch.device) -> Tensor:
    """One read position per example (default: the last; negative counts from the end)."""
    if positions is None:
        return torch.full((batch,), n_pos - 1, dtype=torch.long, device=device)
    read = _as_index(positions, "positions")
    read = read.expand(batch) if read.numel() == 1 else read
    if read.numel() != batch:
        raise ValueError(f"positions has {read.numel()} entries for a batch of {batch}")
    return torch.where(read < 0, read + n_pos, read).to(device)


class _Projector:
    """Projects components at the read position onto the logit-difference direction at the cached scale."""

    def __init__(self, model: Transformer, cache: ActivationCache, u: Tensor, read: Tensor) -> None:
        self.kind = model.cfg.normalization.value
        self.u, self.read = u, read
        rows = torch.arange(u.shape[0], device=u.device)
        self.rows = rows
        self.scale = cache[LN_FINAL_SCALE][rows, read] if self.kind != "none" else None  # batch 1

    def at_read(self, act: Tensor) -> Tensor:
        return act[self.rows, self.read]

    def __call__(self, comp: Tensor) -> Tensor:
        """comp [batch ... d_model] (already at the read position) -> [batch ...]."""
        if self.kind == "layernorm":
            comp = comp - comp.mean(-1, keepdim=True)
        if self.scale is not None:
            comp = comp / self.scale.reshape(-1, *([1] * (comp.dim() - 1)))
        u = self.u.reshape(self.u.shape[0], *([1] * (comp.dim() - 2)), -1)
        return (comp * u).sum(-1)


@dataclass(frozen=True)
class DLAResult:
    """Direct logit attribution to ``logit[answer] - logit[wrong]`` (means over the batch)."""

    heads: Tensor
    """each head's output (z W_O) [layer head]"""
    attn_biases: Tensor
    """each layer's attention output bias b_O [layer]"""
    mlps: Tensor
    """each MLP's output [layer] (zeros for attention-only models)"""
    neurons: Tensor | None
    """each neuron's output (post * W_out row) [layer d_mlp]; MLP output bias excluded"""
    embed: float
    """token embedding"""
    pos_embed: float
    """learned positional embedding (0 without)"""
    biases: float
    """final norm bias and unembedding bias"""
    total: float
    """the model's logit difference"""

    def __repr__(self) -> str:
        lay, h = divmod(int(self.heads.abs().argmax()), self.heads.shape[1])
        return (
            f"DLAResult(total {self.total:.4f}, sum of components {self.sum_of_components():.4f}; "
            f"largest head L{lay}H{h} {float(self.heads[lay, h]):.4f})"
        )

    def sum_of_components(self) -> float:
        return float(
            self.embed
            + self.pos_embed
            + self.heads.sum()
            + self.attn_biases.sum()
            + self.mlps.sum()
            + self.biases
        )

    def components(self) -> tuple[list[str], Tensor]:
        """Labels and values of the non-head components, in the order they join the stream."""
        labels, values = ["embed", "pos_embed"], [self.embed, self.pos_embed]
        for layer in range(self.heads.shape[0]):
            labels += [f"L{layer} attn", f"L{layer} mlp"]
            values += [float(self.heads[layer].sum() + self.attn_biases[layer]), float(self.mlps[layer])]
        labels.append("biases")
        values.append(self.biases)
        return labels, torch.tensor(values)

    def to_dict(self) -> dict[str, Any]:
        labels, values = self.components()
        return {
            "total": self.total,
            "sum_of_components": self.sum_of_components(),
            "heads": self.heads.tolist(),
            "components": dict(zip(labels, values.tolist(), strict=True)),
            "top_neurons": self.top_neurons(10),
        }

    def top_neurons(self, k: int = 10) -> list[tuple[int, int, float]]:
        if self.neurons is None:
            return []
        flat = self.neurons.reshape(-1)
        idx = flat.abs().topk(min(k, flat.numel())).indices
        d = self.neurons.shape[1]
        return [(int(i) // d, int(i) % d, float(flat[i])) for i in idx]

    def plot(self, title: str | None = None):  # noqa: ANN201 - plotly Figure
        """Heads (layer x head heatmap) beside the layer-level components (bars)."""
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1, cols=2, subplot_titles=["heads", "components"], column_widths=[0.45, 0.55]
        )
        n_layers, n_heads = self.heads.shape
        hm = plots.heatmap(
            self.heads,
            x_labels=[f"H{h}" for h in range(n_heads)],
            y_labels=[f"L{layer}" for layer in range(n_layers)],
        )
        fig.add_trace(hm.data[0], row=1, col=1)
        labels, values = self.components()
        fig.add_trace(plots.bars(values, labels).data[0], row=1, col=2)
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=1)
        fig.update_layout(
            template="plotly_white",
            showlegend=False,
            title=title or f"direct logit attribution (total {self.total:.3f})",
        )
        return fig

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def direct_logit_attribution(
    model: Transformer,
    tokens: Int[Tensor, "batch pos"],
    answer: Tensor | int,
    wrong: Tensor | int,
    *,
    positions: Tensor | int | None = None,
    neurons: bool = True,
) -> DLAResult:
    """Each head's, MLP's and neuron's direct contribution to ``logit[answer] - logit[wrong]`` at
    ``positions`` (one per example; default the last), through the final norm at its cached scale (see
    the module docstring: all contributions plus ``biases`` sum exactly to the logit difference)."""
    cfg = model.cfg
    tokens = model.check_tokens(torch.as_tensor(tokens).to(model.W_E.device), None)
    b, n_pos = tokens.shape
    read = _read_positions(positions, b, n_pos, tokens.device)
    names = [EMBED] + [Site(SiteKind.Z, layer).name for layer in range(cfg.n_layers)]
    if cfg.normalization.value != "none":
        names.append(LN_FINAL_SCALE)
    if POS_EMBED in model.hook_names:
        names.append(POS_EMBED)
    if cfg.has_mlp:
        names += [Site(SiteKind.MLP_OUT, layer).name for layer in range(cfg.n_layers)]
        if neurons:
            names += [Site(SiteKind.MLP_POST, layer).name for layer in range(cfg.n_layers)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names)
        u, bias = _direction(model, torch.as_tensor(answer), torch.as_tensor(wrong), b)
        proj = _Projector(model, cache, u, read)
        heads, attn_b, mlps, neuron_vals = [], [], [], []
        for layer, block in enumerate(model.blocks):
            z = proj.at_read(cache[("z", layer)])  # batch head d_head
            heads.append(proj(torch.einsum("bhe,hed->bhd", z, block.attn.W_O)).mean(0))
            attn_b.append(proj(block.attn.b_O.expand(b, -1)).mean(0))
            if cfg.has_mlp:
                mlps.append(proj(proj.at_read(cache[("mlp_out", layer)])).mean(0))
                if neurons:
                    post = proj.at_read(cache[("post", layer)])  # batch d_mlp
                    w_out = block.mlp.W_out
                    # the projection is linear, so project W_out's rows once and scale by the activations
                    per_row = proj(w_out[None].expand(b, -1, -1))  # batch d_mlp
                    neuron_vals.append((post * per_row).mean(0))
            else:
                mlps.append(torch.zeros((), device=u.device))
        pos = proj(proj.at_read(cache[POS_EMBED])).mean(0) if POS_EMBED in names else 0.0
        total = LogitDiff(answer=torch.as_tensor(answer), wrong=torch.as_tensor(wrong), positions=read)(
            logits
        ).mean()
    return DLAResult(
        heads=torch.stack(heads).cpu(),
        attn_biases=torch.stack(attn_b).cpu(),
        mlps=torch.stack(mlps).cpu(),
        neurons=torch.stack(neuron_vals).cpu() if neuron_vals else None,
        embed=float(proj(proj.at_read(cache[EMBED])).mean()),
        pos_embed=float(pos),
        biases=float(bias.mean()),
        total=float(total),
    )


# ---- residual stream decomposition ----------------------------------------------------------------
@dataclass(frozen=True)
class ResidualDecomposition:
    """The logit difference read from the residual stream, layer by layer and component by component."""

    accumulated: Tensor
    """logit difference of the stream entering each layer, then the final one [layer+1] (cached final scale)"""
    accumulated_labels: tuple[str, ...]
    """'L0 pre' ... 'final'"""
    components: Tensor
    """each component's contribution (embed, pos_embed, each attn_out and mlp_out) [component]"""
    component_labels: tuple[str, ...]
    """component names"""
    biases: float
    """final norm bias and unembedding bias"""

    def __repr__(self) -> str:
        final = float(self.accumulated[-1])
        return f"ResidualDecomposition({len(self.component_labels)} components; final logit diff {final:.4f})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "accumulated": dict(zip(self.accumulated_labels, self.accumulated.tolist(), strict=True)),
            "components": dict(zip(self.component_labels, self.components.tolist(), strict=True)),
            "biases": self.biases,
        }

    def plot(self, title: str = "residual stream decomposition"):  # noqa: ANN201 - plotly Figure
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=["accumulated (logit diff)", "per component"])
        fig.add_trace(
            plots.line({"accumulated": self.accumulated}, x_labels=self.accumulated_labels).data[0],
            row=1,
            col=1,
        )
        fig.add_trace(plots.bars(self.components, self.component_labels).data[0], row=1, col=2)
        fig.update_layout(title=title, template="plotly_white", showlegend=False)
        return fig

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def residual_decomposition(
    model: Transformer,
    tokens: Int[Tensor, "batch pos"],
    answer: Tensor | int,
    wrong: Tensor | int,
    *,
    positions: Tensor | int | None = None,
) -> ResidualDecomposition:
    """Accumulated and per-component logit difference at the read position, through the final norm at
    its cached scale (components + biases sum to the final logit difference)."""
    cfg = model.cfg
    tokens = model.check_tokens(torch.as_tensor(tokens).to(model.W_E.device), None)
    b, n_pos = tokens.shape
    read = _read_positions(positions, b, n_pos, tokens.device)
    with torch.no_grad():
        names = [EMBED, POS_EMBED, LN_FINAL_SCALE] + [
            Site(kind, layer).name
            for layer in range(cfg.n_layers)
            for kind in (SiteKind.RESID_PRE, SiteKind.ATTN_OUT, SiteKind.MLP_OUT, SiteKind.RESID_POST)
        ]
        _, cache = model.run_with_cache(tokens, [n for n in names if n in model.hook_names])
        u, bias = _direction(model, torch.as_tensor(answer), torch.as_tensor(wrong), b)
        proj = _Projector(model, cache, u, read)
        streams, acc_labels = _accumulated(model, cache)
        acc = torch.stack([proj(proj.at_read(s)).mean(0) + bias.mean() for s in streams])
        parts = cache.decompose_resid()
        comps = torch.stack([proj(proj.at_read(t)).mean(0) for t in parts.tensor])
    return ResidualDecomposition(
        accumulated=acc.cpu(),
        accumulated_labels=acc_labels,
        components=comps.cpu(),
        component_labels=parts.labels,
        biases=float(bias.mean()),
    )
