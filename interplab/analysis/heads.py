"""Head scores (previous-token, induction, duplicate-token, OV copying) and attention-pattern views.

Pattern scores are the attention a head pays to the positions a behaviour predicts, averaged over the
queries that have such a position:

- previous-token: query ``i`` -> key ``i - 1``;
- duplicate-token: query ``i`` -> every earlier key holding the same token;
- induction: query ``i`` -> every key ``j`` whose *previous* token equals token ``i`` (the token after
  an earlier occurrence).

The built-in probe input is a batch of random token sequences repeated twice, where induction and
duplicate-token heads are unambiguous. The copying score of a head's OV circuit ``W_E W_V W_O W_U`` is
``sum(Re eig) / sum(|eig|)`` (1: pure copying, -1: pure anti-copying; norms ignored), computed on the
small ``d_head x d_head`` matrix ``W_O W_U W_E W_V`` that shares its non-zero eigenvalues.

>>> from interplab.circuits.planted import planted_induction   # a 2-layer model with a planted induction head
>>> scores = head_scores(planted_induction())
>>> [(layer, head, round(score, 2)) for layer, head, score in scores.top("induction", 2)]
[(1, 0, 0.9), (1, 1, 0.13)]
>>> scores.save("heads.html")
PosixPath('heads.html')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.analysis.targets import token_labels

SCORE_NAMES = ("previous_token", "induction", "duplicate_token", "copying")


def repeated_random_tokens(
    d_vocab: int, seq_len: int = 20, batch: int = 8, *, seed: int = 0, bos: int | None = None
) -> Int[Tensor, "batch pos"]:
    """``batch`` random sequences of ``seq_len`` tokens, each repeated twice (optionally after a BOS token).
    Tokens within a sequence are distinct when the vocabulary allows, so every target position is unique."""
    g = torch.Generator().manual_seed(seed)
    if seq_len <= d_vocab:
        half = torch.stack([torch.randperm(d_vocab, generator=g)[:seq_len] for _ in range(batch)])
    else:
        half = torch.randint(0, d_vocab, (batch, seq_len), generator=g)
    tokens = torch.cat([half, half], dim=1)
    if bos is not None:
        tokens = torch.cat([torch.full((batch, 1), bos), tokens], dim=1)
    return tokens


def _masked_score(pattern: Tensor, mask: Tensor) -> Tensor:
    """pattern [batch head q k], mask [batch q k] -> mean over (batch, query with a target) [head]."""
    mass = (pattern * mask[:, None].to(pattern)).sum(-1)  # batch head q
    has = mask.any(-1)  # batch q
    n = has.sum().clamp(min=1)
    return (mass * has[:, None].to(mass)).sum((0, 2)) / n


def pattern_masks(tokens: Tensor) -> dict[str, Tensor]:
    """Boolean [batch q k] masks of the keys each behaviour attends to."""
    b, p = tokens.shape
    q = torch.arange(p)[:, None]
    k = torch.arange(p)[None, :]
    earlier = (k < q)[None].expand(b, p, p)
    same = tokens[:, :, None] == tokens[:, None, :]
    prev_tok = torch.cat([torch.full((b, 1), -1, dtype=tokens.dtype), tokens[:, :-1]], dim=1)
    induction = (tokens[:, :, None] == prev_tok[:, None, :]) & earlier & (k >= 1)[None]
    return {
        "previous_token": (k == q - 1)[None].expand(b, p, p),
        "duplicate_token": same & earlier,
        "induction": induction,
    }


def copying_scores(model: Any) -> Float[Tensor, "layer head"]:
    """``sum(Re eig) / sum(|eig|)`` of every head's OV circuit ``W_E W_V W_O W_U`` (0 for a zero circuit)."""
    cfg = model.cfg
    if cfg.d_vocab_out != cfg.d_vocab:
        return torch.full((cfg.n_layers, cfg.n_heads), float("nan"))
    with torch.no_grad():
        ue = model.W_U.double() @ model.W_E.double()  # d_model d_model
        out = torch.zeros(cfg.n_layers, cfg.n_heads)
        for layer, block in enumerate(model.blocks):
            w_v = block.attn.W_V.double().repeat_interleave(cfg.n_groups, dim=0)
            small = block.attn.W_O.double() @ ue @ w_v  # head d_head d_head
            eig = torch.linalg.eigvals(small)
            total = eig.abs().sum(-1)
            out[layer] = torch.where(total > 1e-12, eig.real.sum(-1) / total.clamp(min=1e-300), 0.0).float()
    return out


@dataclass(frozen=True)
class HeadScores:
    """Every head's scores, [layer, head] each."""

    previous_token: Tensor
    """attention to the previous position"""
    induction: Tensor
    """attention to the token after an earlier occurrence of the current token"""
    duplicate_token: Tensor
    """attention to earlier occurrences of the current token"""
    copying: Tensor
    """OV-circuit copying score, sum(Re eig) / sum(|eig|)"""
    n_tokens: int = 0
    """query positions scored (batch x pos of the probe input)"""

    def get(self, name: str) -> Tensor:
        if name not in SCORE_NAMES:
            raise ValueError(f"unknown head score {name!r}; valid: {', '.join(SCORE_NAMES)}")
        return getattr(self, name)

    def top(self, name: str, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as (layer, head, score)."""
        s = self.get(name)
        flat = torch.nan_to_num(s, nan=-float("inf")).reshape(-1)
        idx = flat.topk(min(k, flat.numel())).indices
        return [(int(i) // s.shape[1], int(i) % s.shape[1], float(s.reshape(-1)[i])) for i in idx]

    def to_dict(self) -> dict[str, Any]:
        return {name: self.get(name).tolist() for name in SCORE_NAMES} | {
            "top": {name: self.top(name, 5) for name in SCORE_NAMES}
        }

    def __repr__(self) -> str:
        best = ", ".join(f"{n}: L{lay}H{h} {v:.2f}" for n in SCORE_NAMES for lay, h, v in self.top(n, 1))
        return f"HeadScores({tuple(self.previous_token.shape)} heads; best {best})"

    def plot(self, title: str = "head scores"):  # noqa: ANN201 - plotly Figure
        """Four heatmaps (layer x head), one per score."""
        from plotly.subplots import make_subplots

        from interplab import plots

        fig = make_subplots(
            rows=1, cols=4, subplot_titles=[n.replace("_", " ") for n in SCORE_NAMES], horizontal_spacing=0.06
        )
        n_layers, n_heads = self.previous_token.shape
        for col, name in enumerate(SCORE_NAMES, start=1):
            sub = plots.heatmap(
                self.get(name),
                x_labels=[f"H{h}" for h in range(n_heads)],
                y_labels=[f"L{layer}" for layer in range(n_layers)],
                x_title="head",
                y_title="layer",
            )
            trace = sub.data[0]
            trace.update(zmin=-1, zmax=1, showscale=col == 4)
            fig.add_trace(trace, row=1, col=col)
        fig.update_yaxes(autorange="reversed", type="category")
        fig.update_xaxes(type="category")
        fig.update_layout(title=title, template="plotly_white")
        return fig

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        from interplab.plots import save_result

        return save_result(self, path)


def head_scores(
    model: Any,
    tokens: Int[Tensor, "batch pos"] | None = None,
    *,
    seq_len: int | None = None,
    batch: int = 8,
    seed: int = 0,
) -> HeadScores:
    """Previous-token, induction, duplicate-token and copying scores of every head.

    Without ``tokens``, scores are measured on ``batch`` random sequences of ``seq_len`` tokens (default:
    as long as fits, at most 20) repeated twice."""
    if tokens is None:
        seq_len = seq_len if seq_len is not None else min(20, model.cfg.n_ctx // 2)
        if seq_len < 2 or 2 * seq_len > model.cfg.n_ctx:
            raise ValueError(
                f"seq_len={seq_len}: need 2 <= seq_len and 2 * seq_len <= n_ctx={model.cfg.n_ctx}"
            )
        tokens = repeated_random_tokens(model.cfg.d_vocab, seq_len, batch, seed=seed)
    tokens = model._check_tokens(torch.as_tensor(tokens), None)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens.to(model.W_E.device), names)
    masks = {k: v.to(model.W_E.device) for k, v in pattern_masks(tokens.cpu()).items()}
    scores = {
        name: torch.stack([_masked_score(cache[n].float(), masks[name]).cpu() for n in names])
        for name in masks
    }
    return HeadScores(**scores, copying=copying_scores(model), n_tokens=int(tokens.numel()))


@dataclass(frozen=True)
class AttentionPatterns:
    """One example's attention patterns at one layer, [head, query, key], with token labels."""

    patterns: Tensor
    """attention weights [head query key]"""
    tokens: tuple[str, ...] = field()
    """token label of each position"""
    layer: int = 0
    """the layer"""

    def __repr__(self) -> str:
        return f"AttentionPatterns(layer {self.layer}, {self.patterns.shape[0]} heads, {len(self.tokens)} tokens)"

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "tokens": list(self.tokens), "patterns": self.patterns.tolist()}

    def plot(self, title: str | None = None):  # noqa: ANN201 - plotly Figure
        """An interactive token-by-token view; a menu chooses the head."""
        from interplab import plots

        return plots.attention_view(
            self.patterns,
            self.tokens,
            head_labels=[f"L{self.layer}H{h}" for h in range(self.patterns.shape[0])],
            title=title or f"attention patterns, layer {self.layer}",
        )

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        from interplab.plots import save_result

        return save_result(self, path)


def attention_patterns(
    model: Any, tokens: Int[Tensor, " pos"] | Int[Tensor, "1 pos"], layer: int
) -> AttentionPatterns:
    """The attention patterns of every head at ``layer`` for one sequence."""
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"unknown layer {layer}: the model has {model.cfg.n_layers} layers")
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    if tokens.shape[0] != 1:
        raise ValueError(f"attention_patterns takes one sequence, got a batch of {tokens.shape[0]}")
    _, cache = model.run_with_cache(tokens.to(model.W_E.device), [("pattern", layer)])
    return AttentionPatterns(
        patterns=cache[("pattern", layer)][0].float().cpu(),
        tokens=token_labels(model, tokens[0]),
        layer=layer,
    )
