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


def induction_steps(prev_head: str = "a0.0", induction_head: str = "a1.0") -> list[Hypothesis]:
    """The worked example's refinements: each claims a little more than the one before."""
    i, p = induction_head, prev_head
    return [
        Hypothesis(
            Claim("logits", children=[Claim(i, next_token)]),
            name=f"1. only {i} matters, and only through the next token",
        ),
        Hypothesis(
            Claim(
                "logits",
                children=[
                    Claim(
                        i,
                        next_token,
                        children=[
                            Claim(f"{i}.q", current_token),
                            Claim(f"{i}.k", previous_occurrence),
                            Claim(f"{i}.v", copied_token),
                        ],
                    )
                ],
            ),
            name=f"2. {i}: query = current token, key = where it occurred, value = what followed",
        ),
        Hypothesis(
            Claim(
                "logits",
                children=[
                    Claim(
                        i,
                        next_token,
                        children=[
                            Claim(f"{i}.q", current_token),
                            Claim(f"{i}.k", previous_occurrence, children=[Claim(p, previous_occurrence)]),
                            Claim(f"{i}.v", copied_token),
                        ],
                    )
                ],
            ),
            name=f"3. {i}'s key input is {p}'s output (K-composition)",
        ),
        Hypothesis(
            Claim(
                "logits",
                children=[
                    Claim(
                        i,
                        next_token,
                        children=[
                            Claim(f"{i}.q", current_token, children=[Claim("embed")]),
                            Claim(f"{i}.k", previous_occurrence, children=[Claim(p, previous_occurrence)]),
                            Claim(f"{i}.v", copied_token, children=[Claim("embed")]),
                        ],
                    )
                ],
            ),
            name=f"4. {i}'s query and value read the token embedding directly",
        ),
    ]
