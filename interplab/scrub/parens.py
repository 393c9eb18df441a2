"""The paren balancer (Redwood Research's REMIX, day 4): data, features, loss and hypothesis 1a.

The model is a 3-layer, 2-head bidirectional transformer classifying strings of ``(`` and ``)`` as balanced;
the fixture lives in ``../shared/fixtures/paren_balancer/`` (see its README for the published numbers).
Tokens: ``[start]=0 [pad]=1 [end]=2 (=3 )=4``; the class is read at position 0 as (unbalanced, balanced).

Features (functions of the token rows):
- ``count_equal``: as many ``(`` as ``)``;
- ``horizon_ok``: reading right to left, no suffix has more ``(`` than ``)``;
- ``is_balanced``: both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from interplab.model.load import load_model
from interplab.model.transformer import Transformer
from interplab.scrub.algorithm import ScrubTask
from interplab.scrub.hypothesis import Claim, Hypothesis, feature
from interplab.tasks.parens import CLOSE, N_CTX, OPEN, PAD, load_paren_strings, paren_tokens


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
