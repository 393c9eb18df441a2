"""The induction hypothesis, stated step by step, on sequences whose last token occurred before.

Features (all read at the last position, where the loss is measured):
- ``current_token``: the last token A;
- ``previous_occurrence``: (A, the position i of A's most recent earlier occurrence), what a key input built by a
  previous-token head must preserve for the induction head to attend to position i + 1;
- ``next_token``: the token B at i + 1, what the induction head copies;
- ``copied_token``: (i, B), what the value input must preserve.

`induction_steps` returns the refinements of the worked example in docs/scrub.md, each a `Hypothesis`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from interplab.scrub.algorithm import ScrubTask
from interplab.scrub.hypothesis import Claim, Hypothesis, feature


def _match(tokens: Tensor) -> Tensor:
    """Position of the most recent earlier occurrence of the last token (0 if none)."""
    same = tokens[:, :-1] == tokens[:, -1:]
    pos = torch.arange(tokens.shape[1] - 1)
    return torch.where(same, pos, -1).amax(1).clamp(min=0)


@feature
def current_token(tokens: Tensor) -> Tensor:
    return tokens[:, -1]


@feature
def previous_occurrence(tokens: Tensor) -> Tensor:
    return torch.stack([tokens[:, -1], _match(tokens)], 1)


@feature
def next_token(tokens: Tensor) -> Tensor:
    return tokens[torch.arange(tokens.shape[0]), _match(tokens) + 1]


@feature
def copied_token(tokens: Tensor) -> Tensor:
    m = _match(tokens)
    return torch.stack([m, tokens[torch.arange(tokens.shape[0]), m + 1]], 1)


def induction_task(tokens: Tensor, name: str = "induction") -> ScrubTask:
    """Cross-entropy at the last position against the token after the previous occurrence of the last token."""
    labels = next_token(tokens)

    def loss(logits: Tensor, rows: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(logits[:, -1].float(), labels[rows], reduction="none")

    return ScrubTask(name=name, tokens=tokens, loss=loss)


def _story(head: str, name: str, slots: bool = False, q=(), k=(), v=()) -> Hypothesis:
    """``head``'s direct path carries the next token; with ``slots``, its inputs carry what induction needs."""
    children = (
        [
            Claim(f"{head}.q", current_token, children=q),
            Claim(f"{head}.k", previous_occurrence, children=k),
            Claim(f"{head}.v", copied_token, children=v),
        ]
        if slots
        else []
    )
    return Hypothesis(Claim("logits", children=[Claim(head, next_token, children=children)]), name=name)


def induction_steps(prev_head: str = "a0.0", induction_head: str = "a1.0") -> list[Hypothesis]:
    """The worked example's refinements (K-composition): each claims a little more than the one before."""
    i, p = induction_head, prev_head
    embed = [Claim("embed")]
    return [
        _story(i, f"1. only {i} matters, and only through the next token"),
        _story(i, f"2. {i}: query = current token, key = where it occurred, value = what followed", True),
        _story(
            i, f"3. {i}'s key input is {p}'s output (K-composition)", True, k=[Claim(p, previous_occurrence)]
        ),
        _story(
            i,
            f"4. {i}'s query and value read the token embedding directly",
            True,
            q=embed,
            k=[Claim(p, previous_occurrence)],
            v=embed,
        ),
    ]


def smeared_induction_steps(induction_head: str = "a0.0") -> list[Hypothesis]:
    """Refinements for an induction head whose key input does the previous-token work itself (smeared keys,
    as in the ``induction-2l`` preset): its key reads the embedding, no previous-token head is involved."""
    i = induction_head
    embed = [Claim("embed")]
    return [
        _story(i, f"1. only {i}'s direct path matters, through the next token"),
        _story(i, f"2. {i}: query = current token, key = where it occurred, value = what followed", True),
        _story(
            i, f"3. {i}'s query, key and value read only the token embedding", True, q=embed, k=embed, v=embed
        ),
    ]
