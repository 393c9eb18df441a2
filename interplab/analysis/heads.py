"""Head scores (previous-token, induction, duplicate-token, OV copying), the probe they are measured on, and
attention-pattern views. The one place these scores are defined: `head_scores` and `formation` both use it.

**Pattern scores.** A head's score for a behaviour is the attention it pays to the keys the behaviour
predicts, averaged over the queries that have such a key. For a pattern ``A[b, i, j]`` (batch ``b``, query
``i``, key ``j``) and target sets ``T(b, i)``::

    score = 1/|Q| * sum_{(b, i) in Q} sum_{j in T(b, i)} A[b, i, j],    Q = {(b, i) : T(b, i) non-empty}

On any tokens ``t`` the targets are read from the tokens (`pattern_masks`):

- previous-token: ``T(i) = {i - 1}``;
- duplicate-token: ``T(i) = {j < i : t_j = t_i}`` (every earlier occurrence of the current token);
- induction: ``T(i) = {1 <= j < i : t_{j-1} = t_i}`` (the token after every earlier occurrence).

On the probe, a random sequence ``x`` of ``h`` tokens repeated (``[BOS] x x``, `repeated_random_tokens`), the
targets are known by construction and ``period=h`` uses them: for a query ``i`` in the repeat,
duplicate-token ``T(i) = {i - h}`` and induction ``T(i) = {i - h + 1}``. The two agree whenever ``x`` repeats
no token, which the default draw (``distinct=True``) ensures; then the induction score is TransformerLens' /
ARENA's "mean of the induction stripe", ``mean over b and i >= h of A[b, i, i - h + 1]``. With tokens drawn
with replacement (the draw `formation` keeps, so that the numbers it has recorded reproduce), the
construction targets leave out the accidental repeats inside ``x``.

**Copying.** The copying score of a head's OV circuit ``W_E W_V W_O W_U`` is ``sum(Re eig) / sum(|eig|)``
(1: pure copying, -1: pure anti-copying; norms ignored), computed on the small ``d_head x d_head`` matrix
``W_O W_U W_E W_V`` that shares its non-zero eigenvalues.

>>> repeated_random_tokens(10, 4, 2, seed=0)  # the probe: 2 sequences of 4 distinct ids, repeated
tensor([[4, 1, 7, 5, 4, 1, 7, 5],
        [3, 9, 4, 2, 3, 9, 4, 2]])
>>> pattern_masks(torch.tensor([[3, 5, 7, 3, 5, 7]]))["induction"][0, 4].nonzero().flatten().tolist()
[2]
>>> from interplab.model import ModelConfig, Transformer
>>> model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, d_vocab=50, n_ctx=40))
>>> scores = head_scores(model)  # on the probe
>>> scores.induction.shape
torch.Size([2, 2])
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
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab import plots
from interplab.analysis.targets import token_labels
from interplab.hooks.site import Site, SiteKind
from interplab.model.transformer import Transformer

SCORE_NAMES = ("previous_token", "induction", "duplicate_token", "copying")


def repeated_random_tokens(
    d_vocab: int,
    half: int = 20,
    batch: int = 8,
    *,
    seed: int = 0,
    low: int = 0,
    distinct: bool = True,
    bos: int | None = None,
) -> Int[Tensor, "batch pos"]:
    """The probe: ``batch`` random sequences ``x`` of ``half`` ids from ``[low, d_vocab)``, each repeated
    once (``x x``, ``2 * half`` positions, ``[bos] x x`` with a BOS id).

    ``distinct=True`` draws the ids of each ``x`` without replacement when the range allows (so every
    induction and duplicate-token target is unique); ``distinct=False`` draws them independently (uniform,
    with replacement: `formation` and the attribution targets use this draw). ``low`` keeps special ids
    (e.g. BOS/EOS at 0 and 1) out of the draw. The same arguments always give the same tokens."""
    if half < 2:
        raise ValueError(f"half={half} must be at least 2")
    if batch < 1:
        raise ValueError(f"batch={batch} must be at least 1")
    if not 0 <= low < d_vocab:
        raise ValueError(f"low={low} must be in [0, d_vocab={d_vocab})")
    g = torch.Generator().manual_seed(seed)
    if distinct and half <= d_vocab - low:
        x = torch.stack([torch.randperm(d_vocab - low, generator=g)[:half] for _ in range(batch)]) + low
    else:
        x = torch.randint(low, d_vocab, (batch, half), generator=g)
    tokens = torch.cat([x, x], dim=1)
    if bos is not None:
        tokens = torch.cat([torch.full((batch, 1), bos), tokens], dim=1)
    return tokens


def pattern_masks(
    tokens: Int[Tensor, "batch pos"], *, period: int | None = None
) -> dict[str, Bool[Tensor, "batch q k"]]:
    """Boolean masks of the keys each behaviour attends to (the target sets ``T`` of the module docstring).

    ``period=None``: read from the tokens. ``period=h``: ``tokens`` are the probe ``[BOS] x x`` with
    ``len(x) = h`` and the duplicate-token and induction targets are those of the construction
    (``i - h`` and ``i - h + 1``); raises when the tokens do not repeat so."""
    tokens = torch.as_tensor(tokens).long()
    b, p = tokens.shape
    q = torch.arange(p)[:, None]
    k = torch.arange(p)[None, :]
    previous = (k == q - 1)[None].expand(b, p, p)
    if period is not None:
        start = p - 2 * period
        if start not in (0, 1) or not torch.equal(
            tokens[:, start : start + period], tokens[:, start + period :]
        ):
            raise ValueError(
                f"tokens must repeat with period {period}: a sequence of {period} tokens twice, optionally "
                f"after a BOS token (see repeated_random_tokens); got {p} positions"
            )
        repeat = q >= start + period
        return {
            "previous_token": previous,
            "duplicate_token": (repeat & (k == q - period))[None].expand(b, p, p),
            "induction": (repeat & (k == q - period + 1))[None].expand(b, p, p),
        }
    earlier = (k < q)[None].expand(b, p, p)
    same = tokens[:, :, None] == tokens[:, None, :]
    prev_tok = torch.cat([torch.full((b, 1), -1, dtype=tokens.dtype), tokens[:, :-1]], dim=1)
    induction = (tokens[:, :, None] == prev_tok[:, None, :]) & earlier & (k >= 1)[None]
    return {"previous_token": previous, "duplicate_token": same & earlier, "induction": induction}


def masked_score(
    patterns: Float[Tensor, "*layer batch head q k"], mask: Bool[Tensor, "batch q k"]
) -> Float[Tensor, "*layer head"]:
    """The pattern score: the attention mass on the masked keys, averaged over the (batch, query) pairs
    that have a masked key (0 when none has)."""
    mass = (patterns * mask[:, None].to(patterns)).sum(-1)  # *layer batch head q
    has = mask.any(-1)  # batch q
    if not bool(has.any()):
        return mass.new_zeros(mass.shape[:-3] + mass.shape[-2:-1])
    if bool((has == has[:1]).all()):  # the same queries in every row (a probe; previous-token): a grid
        return mass[..., has[0]].mean((-3, -1))
    return (mass * has[:, None].to(mass)).sum((-3, -1)) / has.sum()


@torch.no_grad()
def patterns_and_logits(
    model: Transformer, tokens: Int[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "layer batch head q k"], Float[Tensor, "batch pos d_vocab_out"]]:
    """Every layer's attention pattern (float32, computed only for this call, through the pattern hooks) and
    the logits, from one forward pass on the model's device."""
    sites = [Site(SiteKind.PATTERN, layer) for layer in range(model.cfg.n_layers)]
    tokens = torch.as_tensor(tokens)
    logits, cache = model.run_with_cache(tokens.to(model.W_E.device), sites)
    return torch.stack([cache[site.name].float() for site in sites]), logits


def pattern_scores(
    patterns: Float[Tensor, "layer batch head q k"], masks: dict[str, Bool[Tensor, "batch q k"]]
) -> dict[str, Float[Tensor, "layer head"]]:
    """Every masked score (`masked_score`) of every head, on the patterns' device."""
    return {name: masked_score(patterns, mask.to(patterns.device)) for name, mask in masks.items()}


def copying_scores(model: Transformer) -> Float[Tensor, "layer head"]:
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
        return plots.save_result(self, path)


def head_scores(
    model: Transformer,
    tokens: Int[Tensor, "batch pos"] | None = None,
    *,
    seq_len: int | None = None,
    batch: int = 8,
    seed: int = 0,
    period: int | None = None,
) -> HeadScores:
    """Previous-token, induction, duplicate-token and copying scores of every head (module docstring).

    Without ``tokens``, scores are measured on the probe: ``batch`` random sequences of ``seq_len`` distinct
    tokens (default: as long as fits, at most 20) repeated twice. With ``tokens``, the targets are read from
    them, or (``period=h``) are those of a probe of period ``h``."""
    if tokens is None:
        seq_len = seq_len if seq_len is not None else min(20, model.cfg.n_ctx // 2)
        if seq_len < 2 or 2 * seq_len > model.cfg.n_ctx:
            raise ValueError(
                f"seq_len={seq_len}: need 2 <= seq_len and 2 * seq_len <= n_ctx={model.cfg.n_ctx}"
            )
        tokens = repeated_random_tokens(model.cfg.d_vocab, seq_len, batch, seed=seed)
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    patterns, _ = patterns_and_logits(model, tokens)  # the forward checks the tokens
    scores = pattern_scores(patterns, pattern_masks(tokens.cpu(), period=period))
    return HeadScores(
        **{name: s.cpu() for name, s in scores.items()},
        copying=copying_scores(model),
        n_tokens=int(tokens.numel()),
    )


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
        return plots.attention_view(
            self.patterns,
            self.tokens,
            head_labels=[f"L{self.layer}H{h}" for h in range(self.patterns.shape[0])],
            title=title or f"attention patterns, layer {self.layer}",
        )

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def attention_patterns(
    model: Transformer, tokens: Int[Tensor, " pos"] | Int[Tensor, "1 pos"], layer: int
) -> AttentionPatterns:
    """The attention patterns of every head at ``layer`` for one sequence."""
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"unknown layer {layer}: the model has {model.cfg.n_layers} layers")
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    if tokens.shape[0] != 1:
        raise ValueError(f"attention_patterns takes one sequence, got a batch of {tokens.shape[0]}")
    site = Site(SiteKind.PATTERN, layer)
    _, cache = model.run_with_cache(tokens.to(model.W_E.device), site)
    return AttentionPatterns(
        patterns=cache[site.name][0].float().cpu(),
        tokens=token_labels(model, tokens[0]),
        layer=layer,
    )
