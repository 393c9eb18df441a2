"""The paren balancer (Redwood Research's REMIX, day 4): data, features, loss and the REMIX hypotheses' features.

The model is a 3-layer, 2-head bidirectional transformer classifying strings of ``(`` and ``)`` as balanced;
the fixture lives in ``../shared/fixtures/paren_balancer/`` (see its README for the published numbers).
Tokens: ``[start]=0 [pad]=1 [end]=2 (=3 )=4``; the class is read at position 0 as (unbalanced, balanced).
The experiments themselves are in `interplab.scrub.remix`.

Features of the input (functions of the token rows, all computed with **integer arithmetic**: a proportion
``p = opens / parens`` is compared with 1/2 as ``2 * opens > parens`` and, where it is a class, kept as the
reduced fraction ``(numerator, denominator)``, so equal proportions are always one class and ``p = 1/2`` is
never split by rounding; issue 15 item 7):

- ``count_equal``: as many ``(`` as ``)``; ``horizon_ok``: reading right to left, no suffix has more ``(``
  than ``)``; ``is_balanced``: both (the label);
- ``starts_open``: the first paren (position 1) is ``(``; ``count_and_open``: ``count_equal`` and
  ``starts_open`` (REMIX 1b);
- ``p_open_after(tokens)``: per position i, the proportion of ``(`` among the parens at positions >= i, as
  reduced ``(num, den)`` integer tensors (``den == 0`` where no paren lies at or after i);
- ``p1_if_starts_open``: one class for every string starting with ``)`` (the value ``(-1, 1)``), otherwise
  p at position 1 (the proportion of ``(`` in the whole string) as a reduced fraction (REMIX 2a);
- ``horizon(tokens)``: per position, REMIX's five classes (0 on ``[pad]``, -1 / +1 on ``[end]`` after ``(`` /
  ``)``, -2 where ``p_open_after > 1/2``, +2 where it is ``<= 1/2``); ``horizon_at(i)`` the feature of one
  position; ``horizon_all``: no position is negative (equal to ``horizon_ok``);
- ``input_length``: the number of non-pad tokens (parens + 2).

Features of the model (REMIX's setup, recomputed from the fixture's weights):

- ``h00_open_vector(model)``: what head 0.0 would write if every paren were ``(`` (the mean of its value-output
  of ``(`` minus that of ``)`` over positions 1..40, halved); ``phi(model)`` the 2b rewrite
  ``phi(p) = h00_open_vector * (2p - 1)``;
- ``adjusted_attention(model)`` and ``adjusted_p_open_after(model, tokens)``: head 0.0's theoretical attention
  split into paren keys before and at/after each query (REMIX 3b); ``adjusted_horizon(model)`` classifies it
  with an exact comparison (see `adjusted_horizon`).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from interplab.model.load import load_model
from interplab.model.transformer import Transformer
from interplab.scrub.algorithm import ScrubTask
from interplab.scrub.hypothesis import Claim, Feature, Hypothesis, feature
from interplab.tasks.parens import CLOSE, END, N_CTX, OPEN, PAD, START, load_paren_strings, paren_tokens


def tokenize(strings: list[str] | tuple[str, ...], n_ctx: int = N_CTX) -> Tensor:
    """``[start] + parens + [end]``, right-padded with ``[pad]`` to ``n_ctx`` (`interplab.tasks.parens`)."""
    return paren_tokens(strings, n_ctx)


def paren_string(row: Tensor) -> str:
    """The parens of one token row (the inverse of `tokenize`): how reports show an input."""
    return "".join("(" if t == OPEN else ")" for t in row.tolist() if t in (OPEN, CLOSE))


def _steps(tokens: Tensor) -> Tensor:
    return (tokens == OPEN).long() - (tokens == CLOSE).long()


@feature
def count_equal(tokens: Tensor) -> Tensor:
    return _steps(tokens).sum(1) == 0


@feature
def horizon_ok(tokens: Tensor) -> Tensor:
    suffix = _steps(tokens).flip(1).cumsum(1)
    return (suffix <= 0).all(1)


@feature
def is_balanced(tokens: Tensor) -> Tensor:
    return count_equal(tokens) & horizon_ok(tokens)


@feature
def starts_open(tokens: Tensor) -> Tensor:
    """The first paren (position 1) is ``(``."""
    return tokens[:, 1] == OPEN


@feature
def count_and_open(tokens: Tensor) -> Tensor:
    """Equal counts and starts with ``(``: one boolean, two classes (REMIX 1b's feature of 1.0 and 2.0)."""
    return count_equal(tokens) & starts_open(tokens)


@feature
def input_length(tokens: Tensor) -> Tensor:
    """The number of non-pad tokens: parens + 2 (``[start]``, ``[end]``)."""
    return (tokens != PAD).sum(1)


def suffix_counts(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(number of ``(``, number of parens) at positions >= i, two int64 [rows pos] tensors."""
    opens = (tokens == OPEN).long().flip(1).cumsum(1).flip(1)
    parens = ((tokens == OPEN) | (tokens == CLOSE)).long().flip(1).cumsum(1).flip(1)
    return opens, parens


def p_open_after(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The proportion of ``(`` among the parens at positions >= i as a reduced fraction: (numerator,
    denominator) int64 [rows pos]; where no paren lies at or after i both are 0 (undefined)."""
    opens, parens = suffix_counts(tokens)
    g = torch.gcd(opens, parens).clamp(min=1)
    return opens // g, parens // g


def as_fraction(num: int, den: int) -> Fraction | None:
    """One entry of `p_open_after` as a `fractions.Fraction` (None where undefined)."""
    return Fraction(int(num), int(den)) if den else None


@feature
def p1_if_starts_open(tokens: Tensor) -> Tensor:
    """REMIX 2a's p_1: one class for all strings starting with ``)`` (value ``(-1, 1)``), otherwise the
    proportion of ``(`` in the string as a reduced fraction ``(num, den)``: a [rows 2] joint value."""
    num, den = p_open_after(tokens)
    value = torch.stack([num[:, 1], den[:, 1]], 1)
    closed = torch.tensor([-1, 1]).expand_as(value)
    return torch.where(starts_open(tokens)[:, None], value, closed)


def _classify(tokens: Tensor, above_half: Tensor, defined: Tensor) -> Tensor:
    """REMIX's five horizon classes per position, given where the (possibly adjusted) p is > 1/2."""
    prev = tokens.roll(1, 1)
    end = tokens == END
    out = torch.where(above_half, -2, 2)
    out = torch.where(end & (prev == CLOSE), 1, out)
    out = torch.where(end & (prev == OPEN), -1, out)
    out = torch.where(tokens == PAD, 0, out)
    bad = ~defined & (tokens != PAD) & ~(end & ((prev == OPEN) | (prev == CLOSE)))
    if bool(bad.any()):
        row, pos = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"horizon: row {row} has no paren at or after position {pos} (token {int(tokens[row, pos])}), "
            "so its proportion is undefined; every string needs at least one paren"
        )
    return out


def horizon(tokens: Tensor) -> Tensor:
    """REMIX 3a's horizon_i for every position i, int64 [rows pos]: 0 on ``[pad]``; -1 / +1 on ``[end]``
    after ``(`` / ``)``; otherwise -2 where more than half of the parens at or after i are ``(``
    (``2 * opens > parens``, exact) and +2 where at most half are."""
    opens, parens = suffix_counts(tokens)
    return _classify(tokens, 2 * opens > parens, parens > 0)


def horizon_at(i: int) -> Feature:
    """The whole-row feature horizon_i of one position (REMIX's ``get_horizon_cond(i)``)."""
    if not isinstance(i, int) or not 0 <= i < N_CTX:
        raise ValueError(f"position must be an int in 0..{N_CTX - 1}, got {i!r}")
    return Feature(f"horizon_{i}", lambda tokens: horizon(tokens)[:, i])


@feature
def horizon_all(tokens: Tensor) -> Tensor:
    """No position has a negative horizon class (the same partition as `horizon_ok`)."""
    return (horizon(tokens) >= 0).all(1)


# ---- features of the model (REMIX's setup) ----------------------------------------------------------
def _ln0(model: Transformer, x: Tensor) -> Tensor:
    ln = model.blocks[0].ln1
    w, b, eps = cast(Tensor, ln.w), cast(Tensor, ln.b), float(cast(float, ln.eps))
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w.to(x.dtype), b.to(x.dtype), eps)


def h00_open_vector(model: Transformer) -> Tensor:
    """What head 0.0 would write if every paren were ``(`` (REMIX's ``h00_open_vector``, [d_model]): push the
    ``(`` and the ``)`` embeddings at positions 1..40 through layer 0's norm, 0.0's value and output weights
    (no attention, no output bias: it cancels), and take half the difference of the two means."""
    attn = model.blocks[0].attn
    with torch.no_grad():

        def through(tok: int) -> Tensor:
            x = _ln0(model, model.embed.W_E[tok] + model.pos_embed.W_pos[1:41])
            return ((x @ attn.W_V[0] + attn.b_V[0]) @ attn.W_O[0]).mean(0)

        return ((through(OPEN) - through(CLOSE)) / 2).detach().clone()


def phi(model: Transformer):
    """The 2b rewrite of head 0.0's output: ``phi(p) = h00_open_vector * (2p - 1)``, p the proportion of
    ``(`` in the string (``2p - 1 = (opens - closes) / parens``), as a rewrite part
    ``fn(value [b pos d], tokens [b pos]) -> [b 1 d]`` (the same vector at every position)."""
    vector = h00_open_vector(model)

    def phi_of(value: Tensor, tokens: Tensor) -> Tensor:
        opens, parens = suffix_counts(tokens)
        scale = (2 * opens[:, 0] - parens[:, 0]).float() / parens[:, 0].clamp(min=1).float()
        return (scale[:, None, None] * vector.to(value.device, value.dtype)).to(value.dtype)

    phi_of.__name__ = "phi"
    return phi_of


def adjusted_attention(model: Transformer) -> Tensor:
    """REMIX 3b's weights (``get_adjusted_attn_factors``), float64 [43 input_length, 42 query, 2]: head 0.0's
    attention from a ``(`` query at each position of a canonical string of each length (``[start]``, then the
    mean of the normed ``(`` and ``)`` embeddings at every paren position, ``[end]``, pads at their own
    positions and masked), averaged over the paren keys before the query (``[..., 0]``) and over those at or
    after it (``[..., 1]``); 0 where there are none. Lengths 0 and 1 (no string) are NaN."""
    attn = model.blocks[0].attn
    with torch.no_grad():
        emb = model.embed.W_E.double()[None] + model.pos_embed.W_pos.double()[:N_CTX, None]  # [pos tok d]
        normed = _ln0(model, emb)
        lengths = torch.arange(N_CTX + 1)[:, None]  # [len 1]
        pos = torch.arange(N_CTX)[None]  # [1 pos]

        def canonical(paren: Tensor) -> Tensor:  # [len pos d]
            out = torch.where((pos < lengths)[..., None], paren[None], normed[None, :, PAD])
            out = torch.where((pos == 0)[..., None], normed[None, 0:1, START], out)
            return torch.where((pos == lengths - 1)[..., None], normed[None, :, END], out)

        queries = canonical(normed[:, OPEN]) @ attn.W_Q[0].double() + attn.b_Q[0].double()
        keys = canonical(normed[:, [OPEN, CLOSE]].mean(1)) @ attn.W_K[0].double() + attn.b_K[0].double()
        scores = queries @ keys.transpose(1, 2)  # [len q k]
        scores = (
            torch.where((pos >= lengths)[:, None, :], scores - 10_000, scores) / attn.W_Q.shape[-1] ** 0.5
        )
        probs = scores.softmax(-1)
        k = torch.arange(N_CTX)[None, None]
        q = torch.arange(N_CTX)[None, :, None]
        paren = (k >= 1) & (k <= lengths[:, :, None] - 2)
        out = []
        for where in (paren & (k < q), paren & (k >= q)):
            n = where.sum(-1)
            total = (probs * where).sum(-1)
            out.append(torch.where(n > 0, total / n.clamp(min=1), 0.0))
        weights = torch.stack(out, -1)
        weights[:2] = float("nan")
        return weights


def _split_counts(tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(opens, parens) before each position and at or after it, int64 [rows pos] each."""
    opens_after, parens_after = suffix_counts(tokens)
    return opens_after[:, :1] - opens_after, parens_after[:, :1] - parens_after, opens_after, parens_after


def adjusted_p_open_after(model: Transformer, tokens: Tensor, weights: Tensor | None = None) -> Tensor:
    """REMIX 3b's adjusted proportion of ``(`` per position, float64 [rows pos]: the parens before i weighted
    by ``A_before``, those at or after i by ``A_after`` (`adjusted_attention` at the row's input length):
    ``(opens_b A_b + opens_a A_a) / (parens_b A_b + parens_a A_a)``."""
    w = adjusted_attention(model) if weights is None else weights
    a = w[input_length(tokens)]  # [rows pos 2]
    ob, nb, oa, na = (t.double() for t in _split_counts(tokens))
    return (ob * a[..., 0] + oa * a[..., 1]) / (nb * a[..., 0] + na * a[..., 1])


def _adjusted_above_half(tokens: Tensor, weights: Tensor) -> Tensor:
    """adjusted p > 1/2, decided exactly for the float64 weights: the sign of
    ``(2 opens_b - parens_b) A_b + (2 opens_a - parens_a) A_a`` (rational arithmetic where float64 is
    within rounding of 0)."""
    a = weights[input_length(tokens)]
    ob, nb, oa, na = _split_counts(tokens)
    db, da = 2 * ob - nb, 2 * oa - na
    s = db * a[..., 0] + da * a[..., 1]
    scale = db.abs() * a[..., 0] + da.abs() * a[..., 1]
    close = (s.abs() <= 1e-9 * scale) & (scale > 0)
    above = s > 0
    for r, i in close.nonzero().tolist():
        exact = int(db[r, i]) * Fraction(float(a[r, i, 0])) + int(da[r, i]) * Fraction(float(a[r, i, 1]))
        above[r, i] = exact > 0
    return above


def _remix_float32_above_half(tokens: Tensor, weights: Tensor) -> Tensor:
    """REMIX's own arithmetic: float32 weights per key, normalised, summed over the ``(`` keys, > 0.5."""
    w = weights.float()
    lengths = torch.arange(N_CTX + 1)[:, None, None]
    k, q = torch.arange(N_CTX)[None, None], torch.arange(N_CTX)[None, :, None]
    paren = (k >= 1) & (k <= lengths - 2)
    zero = torch.zeros((), dtype=torch.float32)
    per_key = torch.where(paren & (k < q), w[..., :1], zero) + torch.where(paren & (k >= q), w[..., 1:], zero)
    per_key = per_key / per_key.sum(-1, keepdim=True)
    return (per_key[input_length(tokens)] * (tokens == OPEN).float()[:, None, :]).sum(-1) > 0.5


def adjusted_horizon(model: Transformer, *, remix_float32: bool = False):
    """REMIX 3b's horizon_i with the adjusted proportion: ``fn(tokens) -> [rows pos]`` five classes as in
    `horizon`. The comparison with 1/2 is exact for the float64 weights, so a position where the parens
    before it and those after it each have equal counts (adjusted p exactly 1/2) is always +2.
    ``remix_float32=True`` reproduces REMIX's arithmetic instead (float32 weights per key summed, then
    ``> 0.5``), which puts about one in six of those exact ties on the ``> 1/2`` side by rounding (on the
    fixture: 22,243 positions, so 6,663 of the 26,412 balanced strings fail its horizon_all; docs/scrub.md)."""
    weights = adjusted_attention(model)
    above = _remix_float32_above_half if remix_float32 else _adjusted_above_half

    def adjusted(tokens: Tensor) -> Tensor:
        parens_after = suffix_counts(tokens)[1]
        return _classify(tokens, above(tokens, weights), parens_after > 0)

    adjusted.__name__ = "adjusted_horizon"
    return adjusted


def classes(tokens: Tensor) -> list[tuple[str, ...]]:
    """balanced / unbalanced, and for unbalanced strings which test fails (both may)."""
    eq, hz = count_equal(tokens).tolist(), horizon_ok(tokens).tolist()
    out: list[tuple[str, ...]] = []
    for e, h in zip(eq, hz, strict=True):
        if e and h:
            out.append(("balanced",))
        else:
            out.append(
                ("unbalanced",) + (() if e else ("count failure",)) + (() if h else ("horizon failure",))
            )
    return out


def load_data(folder: str | Path) -> tuple[tuple[str, ...], Tensor]:
    """The REMIX data set: strings and their labels (True = balanced), in file order."""
    strings, labels = load_paren_strings(Path(folder) / "remix_parens.jsonl.gz")
    return strings, torch.tensor(labels)


def paren_task(folder: str | Path, n_rows: int | None = None) -> ScrubTask:
    """Binary cross-entropy of the (balanced - unbalanced) logit at position 0 against the data set's label."""
    strings, labels = load_data(folder)
    if n_rows is not None:
        strings, labels = strings[:n_rows], labels[:n_rows]
    tokens = tokenize(strings)
    target = labels.float()

    def loss(logits: Tensor, rows: Tensor) -> Tensor:
        diff = (logits[:, 0, 1] - logits[:, 0, 0]).float()
        return torch.nn.functional.binary_cross_entropy_with_logits(diff, target[rows], reduction="none")

    return ScrubTask(
        name="paren-balancer",
        tokens=tokens,
        loss=loss,
        attention_mask=(tokens != PAD).long(),
        classes=classes,
        position=0,
        decode=paren_string,
    )


def load_paren_model(folder: str | Path) -> Transformer:
    """The published model (a TransformerLens state dict), through `interplab.load_model`, with its subnormal
    weights set to zero (see below)."""
    path = Path(folder) / "brackets_model_state_dict.pt"
    model = load_model(path)
    # weight decay left ~2,500 subnormal weights (layer 2's dead MLP, the embedding); they change no output
    # at float32 precision but make CPU matrix products ~3x slower, so they become exact zeros
    with torch.no_grad():
        tiny = torch.finfo(torch.float32).tiny
        for p in model.parameters():
            p.masked_fill_(p.abs() < tiny, 0.0)
    return model


def hypothesis_1a() -> Hypothesis:
    """REMIX hypothesis 1a: the direct paths of 1.0 and 2.0 depend only on equal counts, that of 2.1 only on
    the horizon test; every other path to the output is fed from one shared random input."""
    return Hypothesis(
        Claim(
            "logits",
            children=[Claim("a1.0", count_equal), Claim("a2.0", count_equal), Claim("a2.1", horizon_ok)],
        ),
        name="1a",
    )
