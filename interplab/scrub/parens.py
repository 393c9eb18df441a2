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

import warnings
from fractions import Fraction
from pathlib import Path
from typing import cast

import numpy as np
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


def remix_adjusted_attention(model: Transformer) -> Tensor:
    """REMIX's ``get_adjusted_attn_factors`` line by line in REMIX's own arithmetic (remix_public @ 45c291d,
    ``remix_d4_part2_setup.py``): float32 throughout; the canonical inputs of ``make_input_arr``; queries and
    keys by ``einsum`` with REMIX's [d_head, d_model] weight layout; scores ``- 10_000`` on pads, ``/ 28**0.5``;
    scipy's softmax (max-shifted ``exp`` over its sum, in numpy float32); the per-key weight the numpy
    ``mean(where=mask)`` of the paren keys before / at-or-after the query, NaN means set to 0; normalised by
    its torch ``sum`` over keys. Returns float32 [43 input_length, 42 query, 42 key] (lengths 0 and 1 NaN).

    Only `_remix_adjusted_p` uses it, to show what REMIX's code computes; its last bits depend on the reduction
    order of the machine's torch/numpy kernels (see `adjusted_horizon`)."""
    attn, ln = model.blocks[0].attn, model.blocks[0].ln1
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # REMIX's NaN rows and empty means, as in its setup
        w = {
            "q": attn.W_Q[0].detach().float().T.contiguous(),
            "k": attn.W_K[0].detach().float().T.contiguous(),
            "q_bias": attn.b_Q[0].detach().float(),
            "k_bias": attn.b_K[0].detach().float(),
        }
        pe = model.pos_embed.W_pos.detach().float()[:N_CTX, None, :] + model.embed.W_E.detach().float()[None]
        d = pe.shape[-1]
        ple = torch.nn.functional.layer_norm(
            pe, (d,), weight=cast(Tensor, ln.w).detach().float(), bias=cast(Tensor, ln.b).detach().float()
        )
        lens = torch.arange(N_CTX + 1)[:, None, None].expand(N_CTX + 1, N_CTX, d)
        seq = torch.arange(N_CTX)[None, :, None].expand(N_CTX + 1, N_CTX, d)

        def input_arr(just_opens: bool) -> Tensor:
            paren = ple[:, OPEN, :] if just_opens else ple[:, [OPEN, CLOSE], :].mean(1)
            arr = torch.where(seq < lens, paren, ple[:, PAD, :])
            arr = torch.where(seq == 0, ple[None, 0, START, :], arr)
            arr = torch.where(seq == lens - 1, ple[None, :, END, :], arr)
            arr[[0, 1], :, :] = torch.nan
            return arr

        queries = torch.einsum("hd,lqd->lqh", w["q"], input_arr(True)) + w["q_bias"]
        keys = torch.einsum("hd,lkd->lkh", w["k"], input_arr(False)) + w["k_bias"]
        scores = torch.einsum("lqh,lkh->lqk", queries, keys)
        k = torch.arange(N_CTX)[None, None, :]
        q = torch.arange(N_CTX)[None, :, None]
        length = torch.arange(N_CTX + 1)[:, None, None]
        scores = torch.where((k >= length).expand_as(scores), scores - 10_000, scores) / (28**0.5)
        x = scores.numpy()
        e = np.exp(x - np.max(x, axis=-1, keepdims=True))
        probs = e / np.sum(e, axis=-1, keepdims=True)
        paren = (k >= 1) & (k <= length - 2)
        weights = torch.zeros(())
        for mask in (paren & (k < q), paren & (k >= q)):
            m = mask.expand(N_CTX + 1, N_CTX, N_CTX)
            mean = torch.tensor(probs.mean(axis=-1, keepdims=True, where=m.numpy()))
            weights = weights + m * torch.nan_to_num(mean, nan=0)
        return weights / weights.sum(dim=-1, keepdim=True)


def _remix_adjusted_p(tokens: Tensor, weights: Tensor) -> Tensor:
    """REMIX's ``compute_adjusted_p_open_after``: ``(weights[input_length] * is_open[:, None, :]).sum(-1)``
    (float32 [rows pos]), in chunks of rows (each row's sum is independent of the others)."""
    idx = input_length(tokens)
    out = [
        (weights[idx[i : i + 4096]] * (tokens[i : i + 4096] == OPEN)[:, None, :]).sum(-1)
        for i in range(0, tokens.shape[0], 4096)
    ]
    return torch.cat(out)


def adjusted_horizon(model: Transformer, *, remix_float32: bool = False):
    """REMIX 3b's horizon_i with the adjusted proportion: ``fn(tokens) -> [rows pos]`` five classes as in
    `horizon`.

    The definition (remix_public @ 45c291d: ``remix_d4_part2_setup.py`` ``get_adjusted_attn_factors`` and
    ``compute_adjusted_p_open_after``; ``remix_d4_part2_solution.py`` ``to_horizon_vals``): each paren key k
    of a string of input length n gets, for query i, the weight ``A_before[n, i]`` (k < i) or ``A_after[n, i]``
    (k >= i) (`adjusted_attention`: head 0.0's mean attention to those keys from a ``(`` query on the
    canonical string), normalised to sum 1 over the paren keys; the adjusted p_i is the weight on the ``(``
    keys; class -2 where ``p_i > 0.5``, +2 where ``p_i <= 0.5``. Here the comparison is exact: the sign of
    ``(2 opens_b - parens_b) A_before + (2 opens_a - parens_a) A_after`` for the float64 weights, with
    rational arithmetic where float64 cannot tell.

    Ties: where the parens before i and those at or after i each have equal counts (and at i = 0 for every
    string with equal counts), p_i is exactly 1/2 whatever the weights (140,261 positions of the fixture), so
    the class is +2, as `horizon`'s. REMIX's code decides these ties by float32 rounding (sums of normalised
    float32 weights compared with 0.5), which depends on the reduction order of the machine's kernels: run
    line by line here (`remix_adjusted_attention`; ``remix_float32=True``), 23,451 of the ties go to -2 with
    torch's scalar kernels and 21,689 (13,668 of them others) with its AVX2 kernels, on the same weights. At
    every other position REMIX's float32 classes and these exact ones are equal (the fixture's closest
    non-tie p is 2.4e-6 from 1/2). docs/scrub.md, "REMIX 3b and its ties", has the numbers this gives."""
    if remix_float32:
        factors = remix_adjusted_attention(model)

        def remix(tokens: Tensor) -> Tensor:
            parens_after = suffix_counts(tokens)[1]
            return _classify(tokens, _remix_adjusted_p(tokens, factors) > 0.5, parens_after > 0)

        remix.__name__ = "adjusted_horizon_remix_float32"
        return remix
    weights = adjusted_attention(model)

    def adjusted(tokens: Tensor) -> Tensor:
        parens_after = suffix_counts(tokens)[1]
        return _classify(tokens, _adjusted_above_half(tokens, weights), parens_after > 0)

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
