"""Exact sampling of agreeing inputs: the data set grouped by feature value.

For a feature f and rows x, `FeatureGroups.agreeing(x)` returns, for every row, a row drawn uniformly from
the data set among those with f(row) == f(x). The grouping is computed once per feature (one call of the
feature function on all rows), so sampling is a few tensor look-ups.

Values are grouped by exact equality. Float features whose values should tie but differ by rounding (e.g. a
proportion 1/2 computed as 3/6 and 0.1 * 5) form separate classes: `FeatureGroups.near_ties` lists distinct
values closer than `TIE_TOLERANCE` (relative), and scrubbing warns about them; compute such features with
integer arithmetic (``2 * opens > total`` rather than ``opens / total > 0.5``) or `fractions.Fraction`.

>>> import torch
>>> from interplab.scrub.hypothesis import Feature
>>> sums = Feature("sum", lambda t: torch.tensor([0.1 + 0.2, 0.3], dtype=torch.float64))
>>> FeatureGroups.build(sums, torch.zeros(2, 1), "'x'").near_ties
[(0.3, 0.30000000000000004)]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interplab.scrub.hypothesis import Feature


class ScrubError(ValueError):
    """A hypothesis cannot be scrubbed as stated; the message names the claim."""


def _is_nan(value: object) -> bool:
    """NaN never equals itself, so as a feature value it would make every NaN row a class of its own (and
    resampling would return the row itself): it is an error, never a value."""
    if isinstance(value, float):
        return value != value
    if isinstance(value, tuple):
        return any(_is_nan(v) for v in value)
    return False


def _nan_message(where: str, feature: Feature, row: int) -> str:
    return (
        f"claim {where}: feature {feature.name!r} returned NaN (first at row {row}); a feature must give every "
        "row a value (NaN would make each such row a class of its own)"
    )


TIE_TOLERANCE = 1e-6
"""Distinct float feature values closer than this (relative) are reported as probable rounding ties."""


def evaluate(feature: Feature, tokens: Tensor, where: str) -> Any:
    """``feature(tokens)``; an exception from the user's function names the claim and the feature."""
    try:
        return feature(tokens)
    except Exception as err:  # the user's function: say whose it is
        raise ScrubError(
            f"claim {where}: feature {feature.name!r} raised {type(err).__name__}: {err}"
        ) from err


def position_columns(feature: Feature, raw: Any, tokens: Tensor, where: str) -> Tensor:
    """A per-position feature's values as a [rows pos] tensor (checked)."""
    expected = tuple(tokens.shape)
    if not isinstance(raw, Tensor):
        try:
            raw = torch.as_tensor(raw)
        except (TypeError, ValueError, RuntimeError):
            raise ScrubError(
                f"claim {where}: per-position feature {feature.name!r} returned {type(raw).__name__}, "
                f"expected a tensor of per-position values (rows, pos) = {expected}"
            ) from None
    if tuple(raw.shape) != expected:
        raise ScrubError(
            f"claim {where}: per-position feature {feature.name!r} returned shape {tuple(raw.shape)}, "
            f"expected per-position values (rows, pos) = {expected}"
        )
    return raw


def _near_ties(values: list[float]) -> list[tuple[float, float]]:
    """Pairs of distinct sorted floats whose relative gap is below `TIE_TOLERANCE`."""
    ordered = sorted(v for v in set(values) if math.isfinite(v))
    out = []
    for a, b in itertools.pairwise(ordered):
        if abs(b - a) <= TIE_TOLERANCE * max(abs(a), abs(b)):
            out.append((a, b))
    return out


@dataclass
class FeatureGroups:
    """Rows grouped by the value of one feature (exact equality; see `near_ties`)."""

    feature: Feature
    where: str
    """the claim it belongs to (for messages)"""
    codes: Int[Tensor, " rows"]
    """group id of every row"""
    values: list[Hashable]
    """the feature value of each group id"""
    order: Int[Tensor, " pool"]
    """the rows one may sample (the pool), sorted by group id"""
    starts: Int[Tensor, " groups"]
    counts: Int[Tensor, " groups"]
    near_ties: list[tuple[Any, Any]] = field(default_factory=list)
    """distinct float values that differ only by rounding (relative gap < `TIE_TOLERANCE`): they form
    separate classes, which is probably not meant (compute such features with integers or Fractions)"""

    @classmethod
    def build(cls, feature: Feature, tokens: Tensor, where: str, pool: Tensor | None = None) -> FeatureGroups:
        """Group ``tokens``' rows by ``feature``; sample only from ``pool`` rows (default: all)."""
        return cls.from_values(feature, evaluate(feature, tokens, where), tokens.shape[0], where, pool)

    @classmethod
    def from_values(
        cls, feature: Feature, raw: Any, n_rows: int, where: str, pool: Tensor | None = None
    ) -> FeatureGroups:
        """Group rows by the feature values ``raw`` (one per row: a tensor [rows] or [rows k], or a sequence)."""
        if isinstance(raw, Tensor):
            if raw.is_floating_point() and raw.dim() > 0 and bool(torch.isnan(raw).any()):
                row = int(torch.isnan(raw.reshape(raw.shape[0], -1)).any(1).nonzero()[0])
                raise ScrubError(_nan_message(where, feature, row))
            if raw.dim() == 0 or raw.shape[0] != n_rows:
                per = " or, with per_position=True, (rows, pos)" if not feature.per_position else ""
                raise ScrubError(
                    f"claim {where}: feature {feature.name!r} returned shape {tuple(raw.shape)}, "
                    f"expected one value per row ({n_rows},){per}"
                )
            ties: list[tuple[Any, Any]] = []
            if raw.is_floating_point():
                for column in raw.reshape(n_rows, -1).T:
                    ties += _near_ties(column.tolist())
            if raw.dim() == 1:
                uniq, codes = torch.unique(raw, return_inverse=True)
                values: list[Hashable] = uniq.tolist()
                return cls._from_codes(feature, where, codes, values, pool, ties)
            raw = [tuple(r) for r in raw.reshape(raw.shape[0], -1).tolist()]
        try:
            raw = list(raw)
        except TypeError:
            raise ScrubError(
                f"claim {where}: feature {feature.name!r} returned {type(raw).__name__}, "
                "expected a tensor or a sequence with one value per row"
            ) from None
        if len(raw) != n_rows:
            raise ScrubError(
                f"claim {where}: feature {feature.name!r} returned {len(raw)} values for {n_rows} rows"
            )
        index: dict[Hashable, int] = {}
        codes_list = []
        for i, value in enumerate(raw):
            if _is_nan(value):
                raise ScrubError(_nan_message(where, feature, i))
            try:
                code = index.setdefault(value, len(index))
            except TypeError:
                raise ScrubError(
                    f"claim {where}: feature {feature.name!r} returned an unhashable value "
                    f"{value!r} (row {i}); return numbers, strings or tuples"
                ) from None
            codes_list.append(code)
        floats = [v for v in index if isinstance(v, float)]
        return cls._from_codes(
            feature, where, torch.tensor(codes_list, dtype=torch.long), list(index), pool, _near_ties(floats)
        )

    @classmethod
    def _from_codes(
        cls,
        feature: Feature,
        where: str,
        codes: Tensor,
        values: list[Hashable],
        pool: Tensor | None,
        ties: list[tuple[Any, Any]],
    ) -> FeatureGroups:
        pool = torch.arange(codes.numel()) if pool is None else pool.long()
        order = pool[torch.argsort(codes[pool], stable=True)]
        counts = torch.bincount(codes[pool], minlength=len(values))
        starts = torch.cumsum(counts, 0) - counts
        return cls(feature, where, codes, values, order, starts, counts, ties)

    def agreeing(self, rows: Int[Tensor, " batch"], generator: torch.Generator) -> Int[Tensor, " batch"]:
        """For each row, a uniformly drawn row with the same feature value (possibly itself)."""
        group = self.codes[rows]
        empty = self.counts[group] == 0
        if bool(empty.any()):
            value = self.values[int(group[empty][0])]
            raise ScrubError(
                f"claim {self.where}: no input of the sampling pool agrees on feature "
                f"{self.feature.name!r} = {value!r} (row {int(rows[empty][0])} has it); "
                "use a larger pool or a coarser feature"
            )
        offset = (torch.rand(rows.shape, generator=generator) * self.counts[group]).long()
        return self.order[self.starts[group] + offset.clamp(max=self.counts[group] - 1)]

    def singletons(self, rows: Tensor) -> list[Hashable]:
        """Values taken by ``rows`` that only one row of the data set has (resampling cannot change them)."""
        group = torch.unique(self.codes[rows])
        return [self.values[g] for g in group.tolist() if int(self.counts[g]) < 2]
