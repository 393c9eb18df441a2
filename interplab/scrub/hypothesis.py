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

Semantics (Chan et al. 2022; REMIX / rust_circuit): the root runs on the reference input; a child runs on an
input (its *datum*) resampled to agree with its parent's datum on the child's feature (``feature=None``: the
parent's datum itself); a claim without children (a *leaf*) runs its whole upstream computation on its datum,
attention masks included; an internal claim draws one *other-inputs* datum (random, or its own datum with
``others="same"``) that feeds everything below it that no child claims, the attention masks of the heads it
covers included. `Hypothesis.empty()` claims nothing at all.

Targets: ``logits``, ``embed``, ``pos_embed``, a head ``a{l}.{h}``, one of its inputs ``a{l}.{h}.q|k|v``, all
three with one datum ``a{l}.{h}.in``, its attention mask ``a{l}.{h}.mask``, an MLP ``m{l}``, and the parts of a
rewritten component ``a0.0:phi`` / ``a0.0:residual``. A child of a head names one of its inputs (or its mask);
a child of an input (or of an MLP or the logits) names a component that writes to it. A position suffix
``@3``, ``@-1``, ``@[1..40]`` (both ends included) or ``@[0,3,5]`` (or ``positions=``) restricts a claim to
those sequence positions of its target (of the edge into its parent, for a component). Node-level claims
(``paths="all"``) cover a component on every path below their parent with one datum:

>>> from interplab.scrub.parens import count_equal
>>> starts_open = Feature("starts_open", lambda tokens: tokens[:, 1] == 3)
>>> h = Hypothesis(Claim("logits", children=[
...     Claim("a1.0", count_equal, children=[
...         Claim("a1.0.in@1", count_equal, children=[
...             Claim("a0.0", starts_open, paths="all"),    # directly and via m0, one datum
...             Claim("embed", starts_open, paths="all", avoid=["a0.0"])])])]))
>>> [c.name for _, c in h.claims()]
['logits', 'a1.0', 'a1.0.in@1', 'a0.0', 'embed']

The full reference is docs/scrub.md, "The hypothesis language".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Feature:
    """A named function of the input: ``fn(tokens [rows pos]) -> one hashable value per row`` (a [rows, k]
    tensor is one joint value per row), or with ``per_position=True`` one value per row and position
    ([rows, pos]): a claim with positions then draws one datum per position, agreeing on that column.

    >>> count_equal = Feature("count_equal", lambda tokens: (tokens == 3).sum(1) == (tokens == 4).sum(1))
    """

    name: str
    fn: Callable[[Any], Any] = field(compare=False)
    per_position: bool = False
    """``fn`` returns [rows, pos]: one value per row and position (see `Claim.positions`)"""

    def __call__(self, tokens: Any) -> Any:
        return self.fn(tokens)


def feature(fn: Callable[[Any], Any] | None = None, *, name: str | None = None, per_position: bool = False):
    """Decorator: ``@feature`` turns ``def count_equal(tokens): ...`` into a `Feature` named after it;
    ``@feature(per_position=True)`` for a function returning [rows, pos]."""

    def wrap(f: Callable[[Any], Any]) -> Feature:
        return Feature(name or f.__name__, f, per_position)

    return wrap(fn) if fn is not None else wrap


def _one_class(tokens: Any) -> Tensor:
    if isinstance(tokens, Mapping):  # a computational graph's data set (`interplab.scrub.graph`)
        tokens = next(iter(tokens.values()))
    return torch.zeros(tokens.shape[0], dtype=torch.long)


anything = Feature("anything", _one_class)
"""The feature with one class: a claim with it runs on a datum drawn uniformly at random (REMIX's
UncondSampler as a claim's sampler: "this input does not matter")."""


PartFn = Callable[[Tensor, Tensor], Tensor]
"""``fn(value [batch pos d_model], tokens [batch pos]) -> a tensor broadcastable to value``"""


@dataclass(frozen=True)
class Rewrite:
    """A component's value written as a sum of named parts plus the rest: ``value = sum_p p(value, tokens) +
    residual``. A claim carrying a rewrite may claim each part (``Claim("a0.0:phi", ...)``) and the rest
    (``a0.0:residual``) separately: each part is evaluated on its own datum (the component computed on the
    part claim's datum, then ``fn``), the residual ``value(d) - sum_p p(value(d))`` on the residual's datum;
    unclaimed parts and the residual run on the rewritten claim's other-inputs datum.

    >>> phi = Rewrite(parts={"phi": lambda value, tokens: value.mean(1, keepdim=True)})
    >>> sorted(phi.parts)
    ['phi']
    """

    parts: Mapping[str, PartFn]
    """part name -> ``fn(value [batch pos d_model], tokens [batch pos])``, broadcastable to value"""

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a Rewrite needs at least one part")
        for name, fn in self.parts.items():
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"Rewrite part names are identifiers such as 'phi', got {name!r}")
            if name == "residual":
                raise ValueError("'residual' is the implicit rest of a Rewrite: name the parts otherwise")
            if not callable(fn):
                raise TypeError(f"Rewrite part {name!r} must be callable fn(value, tokens), got {fn!r}")
        object.__setattr__(self, "parts", dict(self.parts))

    @classmethod
    def projection(cls, direction: Tensor, name: str = "projection") -> Rewrite:
        """One part: the value's projection ``(v . u) u`` on ``u = direction / |direction|`` [d_model]."""
        direction = torch.as_tensor(direction).detach().float().flatten()
        norm = float(direction.norm())
        if not norm > 0:
            raise ValueError("Rewrite.projection needs a non-zero direction")
        unit = direction / norm

        def project(value: Tensor, tokens: Tensor) -> Tensor:
            u = unit.to(value.dtype)
            return (value @ u)[..., None] * u

        return cls(parts={name: project})


_NAME = re.compile(r"^(?P<target>[^@]+?)(?:@(?P<pos>.+))?$")
_INT = r"-?\d+"


def parse_positions(text: str) -> tuple[int, ...]:
    """``3``, ``-1``, ``[1..40]`` (both ends included), ``[0,3,5]`` -> a tuple of (possibly negative) ints."""
    s = text.strip()
    if re.fullmatch(_INT, s):
        return (int(s),)
    m = re.fullmatch(rf"\[\s*({_INT})\s*\.\.\s*({_INT})\s*\]", s)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi < lo:
            raise ValueError(f"position range [{lo}..{hi}] is empty: write [low..high], both included")
        return tuple(range(lo, hi + 1))
    m = re.fullmatch(rf"\[\s*({_INT}(?:\s*,\s*{_INT})*)\s*\]", s)
    if m:
        return tuple(int(v) for v in m.group(1).split(","))
    raise ValueError(f"bad positions {text!r}: write @3, @-1, @[1..40] (both ends included) or @[0,3,5]")


def format_positions(positions: Sequence[int]) -> str:
    """The suffix a claim is named with: ``@1``, ``@[0..41]``, ``@[0,3,5]``."""
    p = list(positions)
    if len(p) == 1:
        return f"@{p[0]}"
    if p == list(range(p[0], p[0] + len(p))):
        return f"@[{p[0]}..{p[-1]}]"
    return "@[" + ",".join(str(v) for v in p) + "]"


def _as_positions(value: Any) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise TypeError(f"positions must be ints, got {value!r}")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        return parse_positions(value)
    if isinstance(value, Tensor):
        value = value.flatten().tolist()
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"positions must be an int, a range or a sequence of ints, got {value!r}") from None
    if not out or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise TypeError(f"positions must be a non-empty sequence of ints, got {value!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"positions {list(out)} repeat a position")
    return out


@dataclass(frozen=True)
class Claim:
    """One node of the interpretation tree (see the module docstring)."""

    target: str
    """the component, head input, mask or part this claim is about: ``a1.0``, ``a1.0.k``, ``a1.0.in``,
    ``a1.0.mask``, ``m0``, ``embed``, ``logits``, ``a0.0:phi``; a position suffix (``a1.0.in@1``) is moved
    into `positions`"""
    feature: Feature | Callable[[Any], Any] | None = None
    """what the target depends on; None: exactly its parent's datum (no resampling)"""
    children: Sequence[Claim] = ()
    """the claims about what this target reads"""
    leaf: bool | None = None
    """the whole upstream computation runs on this claim's datum; default: True when there are no children"""
    positions: int | range | Sequence[int] | None = field(default=None, kw_only=True)
    """the sequence positions of the target this claim covers (a component: of its edge into the parent;
    a head input: query positions for q, key positions for k and v); None: all (those of the nearest
    positioned ancestor). Stored as a tuple of ints (negative ones count from the end)."""
    paths: str = field(default="direct", kw_only=True)
    """"direct": the one edge into the parent; "all": the component on every path from the parent's target
    down to it (except through components in `avoid` and paths a sibling claims first), with one datum"""
    avoid: Sequence[str] = field(default=(), kw_only=True)
    """with ``paths="all"``: components whose paths are not covered"""
    rewrite: Rewrite | None = field(default=None, kw_only=True)
    """write the component's value as parts plus a residual, claimable as ``target:part`` children"""
    others: str = field(default="random", kw_only=True)
    """what the inputs no child claims run on: "random" (one random datum per claim) or "same" (this claim's
    own datum)"""

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target:
            raise TypeError(f"Claim.target must be a component name such as 'a1.0', got {self.target!r}")
        m = _NAME.match(self.target.strip())
        if m is None:
            raise ValueError(f"bad claim target {self.target!r}")
        target, suffix = m.group("target").strip(), m.group("pos")
        if suffix is not None:
            if self.positions is not None:
                raise ValueError(
                    f"claim {self.target!r} gives positions twice (a suffix and positions=): give one"
                )
            try:
                object.__setattr__(self, "positions", parse_positions(suffix))
            except ValueError as err:
                raise ValueError(f"claim {self.target!r}: {err}") from None
        elif self.positions is not None:
            object.__setattr__(self, "positions", _as_positions(self.positions))
        object.__setattr__(self, "target", target)
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
        if self.paths not in ("direct", "all"):
            raise ValueError(f"claim {self.name!r}: paths must be 'direct' or 'all', got {self.paths!r}")
        if isinstance(self.avoid, str):
            object.__setattr__(self, "avoid", (self.avoid,))
        object.__setattr__(self, "avoid", tuple(self.avoid))
        if self.avoid and self.paths != "all":
            raise ValueError(f"claim {self.name!r}: avoid= only applies with paths='all'")
        if self.others not in ("random", "same"):
            raise ValueError(f"claim {self.name!r}: others must be 'random' or 'same', got {self.others!r}")
        if self.rewrite is not None and not isinstance(self.rewrite, Rewrite):
            raise TypeError(
                f"claim {self.name!r}: rewrite must be a Rewrite, got {type(self.rewrite).__name__}"
            )

    @property
    def name(self) -> str:
        """The target with its positions, as paths and reports write it: ``a1.0.in@1``."""
        return self.target + ("" if self.positions is None else format_positions(self.positions))  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        f = self.feature.name if isinstance(self.feature, Feature) else "same input"
        extra = []
        if self.paths == "all":
            extra.append("all paths" + (f" except via {', '.join(self.avoid)}" if self.avoid else ""))
        if self.rewrite is not None:
            extra.append("rewritten as " + " + ".join([*self.rewrite.parts, "residual"]))
        if self.others == "same":
            extra.append("others: same")
        return f"{self.name} [{f}]" + (f" ({'; '.join(extra)})" if extra else "")

    def walk(self, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Claim]]:
        """Every claim below (and including) this one with its path of names from the root."""
        here = (*path, self.name)
        yield here, self
        for child in self.children:
            yield from child.walk(here)

    def map(self, fn: Callable[[tuple[str, ...], Claim], Claim], path: tuple[str, ...] = ()) -> Claim:
        """A copy with ``fn`` applied to every claim (children first)."""
        here = (*path, self.name)
        kids = tuple(c.map(fn, here) for c in self.children)
        return fn(here, replace(self, children=kids))


@dataclass(frozen=True)
class Hypothesis:
    """An interpretation tree rooted at the logits, with a name for reports."""

    root: Claim
    name: str = "hypothesis"
    output: str = field(default="logits", kw_only=True)
    """the output the root claims: ``logits`` for a model; a `interplab.scrub.graph.ComputationGraph`'s
    output node (e.g. ``loss``) for a graph"""

    def __post_init__(self) -> None:
        if not isinstance(self.root, Claim):
            raise TypeError(f"Hypothesis.root must be a Claim, got {type(self.root).__name__}")
        if self.root.target != self.output:
            raise ValueError(
                f"a hypothesis is rooted at the output: root target must be {self.output!r}, "
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
            self.root.map(strip),
            name=f"{self.name} ({'/'.join(keep) if keep else 'structure'} only)",
            output=self.output,
        )
