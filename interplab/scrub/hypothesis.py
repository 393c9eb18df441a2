"""Hypotheses for causal scrubbing: an interpretation tree whose nodes are claims about model components.

A `Claim` says: "this component (or this input of a head) computes something that depends on the input only
through ``feature``, and it reads only from the components of its ``children``". Claims nest like the
explanation they state:

>>> from interplab.scrub.induction import current_token, next_token, previous_occurrence
>>> induction = Hypothesis(
...     Claim("logits", children=[
...         Claim("a1.0", next_token, children=[              # the induction head's output copies a token
...             Claim("a1.0.q", current_token),               # its query is the current token
...             Claim("a1.0.k", current_token, children=[     # its key input is the previous-token head
...                 Claim("a0.0", previous_occurrence)]),
...             Claim("a1.0.v", next_token)])]),
...     name="induction")

Semantics (Chan et al. 2022): the root runs on the reference input; a child runs on an input resampled to
agree with its parent's input on the child's feature (``feature=None``: the parent's input itself); a claim
without children (a *leaf*) runs its whole upstream computation on its input; the edges into a claimed
component that no child claims are fed from a random input. `Hypothesis.empty()` claims nothing at all.

Targets: ``logits``, ``embed``, ``pos_embed``, a head ``a{l}.{h}``, one of its inputs ``a{l}.{h}.q|k|v``, an
MLP ``m{l}``. A child of a head names one of its inputs; a child of an input (or of an MLP or the logits)
names a component that writes to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Feature:
    """A named function of the input: ``fn(tokens [rows pos]) -> one hashable value per row``.

    >>> count_equal = Feature("count_equal", lambda tokens: (tokens == 3).sum(1) == (tokens == 4).sum(1))
    """

    name: str
    fn: Callable[[Any], Any] = field(compare=False)

    def __call__(self, tokens: Any) -> Any:
        return self.fn(tokens)


def feature(fn: Callable[[Any], Any] | None = None, *, name: str | None = None):
    """Decorator: ``@feature`` turns ``def count_equal(tokens): ...`` into a `Feature` named after it."""

    def wrap(f: Callable[[Any], Any]) -> Feature:
        return Feature(name or f.__name__, f)

    return wrap(fn) if fn is not None else wrap


@dataclass(frozen=True)
class Claim:
    """One node of the interpretation tree (see the module docstring)."""

    target: str
    """the component or head input this claim is about: ``a1.0``, ``a1.0.k``, ``m0``, ``embed``, ``logits``"""
    feature: Feature | Callable[[Any], Any] | None = None
    """what the component depends on; None: exactly its parent's input (no resampling)"""
    children: Sequence[Claim] = ()
    """the claims about what this component reads"""
    leaf: bool | None = None
    """the whole upstream computation runs on this claim's input; default: True when there are no children"""

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target:
            raise TypeError(f"Claim.target must be a component name such as 'a1.0', got {self.target!r}")
        if self.feature is not None and not isinstance(self.feature, Feature):
            if not callable(self.feature):
                raise TypeError(
                    f"claim {self.target!r}: feature must be callable, got {type(self.feature).__name__}"
                )
            object.__setattr__(
                self, "feature", Feature(getattr(self.feature, "__name__", "feature"), self.feature)
            )
        object.__setattr__(self, "children", tuple(self.children))
        for child in self.children:
            if not isinstance(child, Claim):
                raise TypeError(f"claim {self.target!r}: children must be Claims, got {type(child).__name__}")
        if self.leaf is None:
            object.__setattr__(self, "leaf", not self.children)
        elif self.leaf and self.children:
            raise ValueError(f"claim {self.target!r} has children, so it cannot be a leaf")

    @property
    def label(self) -> str:
        f = self.feature.name if isinstance(self.feature, Feature) else "same input"
        return f"{self.target} [{f}]"

    def walk(self, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Claim]]:
        """Every claim below (and including) this one with its path of targets from the root."""
        here = (*path, self.target)
        yield here, self
        for child in self.children:
            yield from child.walk(here)

    def map(self, fn: Callable[[tuple[str, ...], Claim], Claim], path: tuple[str, ...] = ()) -> Claim:
        """A copy with ``fn`` applied to every claim (children first)."""
        here = (*path, self.target)
        kids = tuple(c.map(fn, here) for c in self.children)
        return fn(here, replace(self, children=kids))


@dataclass(frozen=True)
class Hypothesis:
    """An interpretation tree rooted at the logits, with a name for reports."""

    root: Claim
    name: str = "hypothesis"

    def __post_init__(self) -> None:
        if not isinstance(self.root, Claim):
            raise TypeError(f"Hypothesis.root must be a Claim, got {type(self.root).__name__}")
        if self.root.target != "logits":
            raise ValueError(
                f"a hypothesis is rooted at the output: root target must be 'logits', "
                f"got {self.root.target!r}"
            )

    @classmethod
    def trivial(cls) -> Hypothesis:
        """ "The output depends on the whole input": scrubbing it changes nothing."""
        return cls(Claim("logits"), name="trivial")

    @classmethod
    def empty(cls) -> Hypothesis:
        """Claims nothing: every path to the output is fed from a random input (the random baseline)."""
        return cls(Claim("logits", leaf=False), name="empty")

    def claims(self) -> list[tuple[tuple[str, ...], Claim]]:
        return list(self.root.walk())

    def describe(self) -> str:
        """The tree as indented text."""
        lines = []
        for path, claim in self.root.walk():
            lines.append(
                "  " * (len(path) - 1) + claim.label + ("" if claim.leaf or claim.children else "  (nothing)")
            )
        return "\n".join(lines)

    def only(self, keep: tuple[str, ...] | None) -> Hypothesis:
        """A copy where only the claim at path ``keep`` resamples (all other features become None);
        ``keep=None`` keeps no feature: the structure of the hypothesis alone."""

        def strip(path: tuple[str, ...], claim: Claim) -> Claim:
            return claim if path == keep else replace(claim, feature=None)

        return Hypothesis(
            self.root.map(strip), name=f"{self.name} ({'/'.join(keep) if keep else 'structure'} only)"
        )
