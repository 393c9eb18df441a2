"""Rotary frequencies: the inverse frequencies of rotary embeddings and their scaled variants, computed as
`transformers`' ``modeling_rope_utils`` does (the same float32 operations, so converted models agree with it).

A scaled variant is a frozen dataclass (one per ``rope_type``) held by `ModelConfig.rope_scaling`:

- `LinearRope` (``linear``): every frequency divided by ``factor`` (positions interpolated);
- `DynamicNTKRope` (``dynamic``): the base grows with the sequence length once it passes
  ``original_max_position_embeddings`` (NTK-aware, dynamic);
- `YarnRope` (``yarn``): per-dimension interpolation/extrapolation ramp and an attention factor on cos and sin;
- `Llama3Rope` (``llama3``): low frequencies divided by ``factor``, high ones kept, the middle smoothed;
- `LongRope` (``longrope``, Phi-3): per-dimension factors, the short set up to ``original_max_position_embeddings``
  and the long set beyond it, and an attention factor.

The length-dependent variants (dynamic, longrope) are stateless here: a forward's tables are those of the
longest sequence *in that forward* (its largest position + 1, counting a key/value cache's past). Hugging Face's
dynamic rotary embedding instead keeps the frequencies of the longest sequence it has seen since the last one
shorter than ``max_position_embeddings``, so there the same input can give other logits after a longer one ran;
interplab equals a freshly loaded HF model. With a key/value cache both keep each cached key as it was rotated
when it was computed (generation equals HF's cached generation), except that generation recomputes the cache
once when LongRoPE switches to its long factors (`cache_expires_at`), as Phi-3's ``generate`` does.

>>> cfg = Llama3Rope(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
>>> freq, attention_factor = inverse_frequencies(cfg, base=10000.0, dim=8)
>>> freq.shape, attention_factor
(torch.Size([4]), 1.0)
>>> parse_rope_scaling({"rope_type": "linear", "factor": 2.0})
LinearRope(factor=2.0)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor


def _positive(name: str, value: Any, rope_type: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"rope scaling {rope_type!r}: {name} must be a positive number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LinearRope:
    """Linear (position-interpolation) scaling: every inverse frequency divided by ``factor``."""

    factor: float
    """positions are divided by this"""
    rope_type: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _positive("factor", self.factor, self.rope_type)


@dataclass(frozen=True, kw_only=True)
class DynamicNTKRope:
    """Dynamic NTK scaling: for a sequence of ``seq_len > original_max_position_embeddings`` tokens the base
    becomes ``base * (factor * seq_len / original - (factor - 1)) ** (dim / (dim - 2))``; shorter ones are
    unscaled."""

    factor: float
    """how strongly the base grows with the length"""
    original_max_position_embeddings: int
    """the length up to which nothing is scaled (Hugging Face's ``max_position_embeddings``)"""
    rope_type: ClassVar[str] = "dynamic"

    def __post_init__(self) -> None:
        _positive("factor", self.factor, self.rope_type)
        _positive("original_max_position_embeddings", self.original_max_position_embeddings, self.rope_type)


@dataclass(frozen=True, kw_only=True)
class YarnRope:
    """YaRN: dimensions rotating fewer than ``beta_slow`` times over the original context are interpolated
    (divided by ``factor``), those rotating more than ``beta_fast`` times are kept, a linear ramp between; cos
    and sin are multiplied by ``attention_factor``."""

    factor: float
    """interpolation factor of the slow dimensions"""
    original_max_position_embeddings: int
    """the context length the model was pretrained with"""
    attention_factor: float = None  # type: ignore[assignment]  # None: derived in __post_init__
    """multiplies cos and sin (so the scores by its square); defaults to ``0.1 ln(factor) + 1`` (1 if factor <= 1)"""
    beta_fast: float = 32.0
    """rotations over the original context above which a dimension is extrapolated (kept)"""
    beta_slow: float = 1.0
    """rotations below which a dimension is interpolated"""
    truncate: bool = True
    """round the ramp's ends to whole dimensions"""
    rope_type: ClassVar[str] = "yarn"

    def __post_init__(self) -> None:
        _positive("factor", self.factor, self.rope_type)
        _positive("original_max_position_embeddings", self.original_max_position_embeddings, self.rope_type)
        if self.attention_factor is None:
            object.__setattr__(self, "attention_factor", yarn_mscale(self.factor))
        _positive("attention_factor", self.attention_factor, self.rope_type)


@dataclass(frozen=True, kw_only=True)
class Llama3Rope:
    """Llama-3.1 scaling: wavelengths longer than ``original / low_freq_factor`` divided by ``factor``, shorter
    than ``original / high_freq_factor`` kept, smoothly interpolated between."""

    factor: float
    """scaling of the low frequencies"""
    low_freq_factor: float
    """``original / low_freq_factor`` is the wavelength above which frequencies are scaled"""
    high_freq_factor: float
    """``original / high_freq_factor`` is the wavelength below which frequencies are kept"""
    original_max_position_embeddings: int
    """the context length the model was pretrained with"""
    rope_type: ClassVar[str] = "llama3"

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            _positive(name, getattr(self, name), self.rope_type)
        if self.high_freq_factor == self.low_freq_factor:
            raise ValueError(
                f"rope scaling 'llama3': high_freq_factor and low_freq_factor must differ, both are {self.low_freq_factor}"
            )


@dataclass(frozen=True, kw_only=True)
class LongRope:
    """LongRoPE (Phi-3): each inverse frequency divided by its own factor, ``short_factor`` for sequences up to
    ``original_max_position_embeddings`` and ``long_factor`` beyond; cos and sin multiplied by
    ``attention_factor``."""

    short_factor: tuple[float, ...]
    """one factor per rotating pair (rotary_dim / 2), for short sequences"""
    long_factor: tuple[float, ...]
    """one factor per rotating pair, for sequences longer than the original context"""
    original_max_position_embeddings: int
    """the context length the model was pretrained with"""
    attention_factor: float
    """multiplies cos and sin"""
    rope_type: ClassVar[str] = "longrope"

    def __post_init__(self) -> None:
        object.__setattr__(self, "short_factor", tuple(float(f) for f in self.short_factor))
        object.__setattr__(self, "long_factor", tuple(float(f) for f in self.long_factor))
        if len(self.short_factor) != len(self.long_factor):
            raise ValueError(
                f"rope scaling 'longrope': short_factor has {len(self.short_factor)} values, long_factor "
                f"{len(self.long_factor)}; they need one per rotating pair each"
            )
        _positive("original_max_position_embeddings", self.original_max_position_embeddings, self.rope_type)
        _positive("attention_factor", self.attention_factor, self.rope_type)


RopeScaling = LinearRope | DynamicNTKRope | YarnRope | Llama3Rope | LongRope
ROPE_SCALINGS: dict[str, type[RopeScaling]] = {
    c.rope_type: c for c in (LinearRope, DynamicNTKRope, YarnRope, Llama3Rope, LongRope)
}
"""``rope_type`` -> its class (``default``, no scaling, is ``rope_scaling=None``)"""


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention scale for an interpolation ``scale``: ``0.1 mscale ln(scale) + 1`` (1 if scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_scaling_to_dict(scaling: RopeScaling) -> dict[str, Any]:
    """``{"rope_type": ..., field: value ...}``, what `parse_rope_scaling` reads back."""
    out: dict[str, Any] = {"rope_type": scaling.rope_type}
    for f in dataclasses.fields(scaling):
        value = getattr(scaling, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def parse_rope_scaling(data: RopeScaling | dict[str, Any] | None) -> RopeScaling | None:
    """A scaling from its dict (``rope_type`` plus the fields of its class); an instance or None is returned
    as is, ``{"rope_type": "default"}`` is None. Unknown types and fields are named with what is valid."""
    if data is None or isinstance(data, tuple(ROPE_SCALINGS.values())):
        return data  # type: ignore[return-value]
    if not isinstance(data, dict):
        raise ValueError(f"rope_scaling must be a dict with a rope_type or None, got {data!r}")
    data = dict(data)
    rope_type = data.pop("rope_type", None)
    if rope_type in (None, "default"):
        if data:
            raise ValueError(f"rope_scaling {data!r} has no rope_type; valid: {', '.join(ROPE_SCALINGS)}")
        return None
    cls = ROPE_SCALINGS.get(rope_type)
    if cls is None:
        raise ValueError(
            f"rope scaling {rope_type!r} is not supported by interplab; supported: default, {', '.join(ROPE_SCALINGS)}"
        )
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"rope scaling {rope_type!r} has no fields {unknown}; its fields: {sorted(fields)}")
    try:
        return cls(**data)
    except TypeError as err:  # a required field is missing
        raise ValueError(f"rope scaling {rope_type!r}: {err}; its fields: {sorted(fields)}") from None


def depends_on_length(scaling: RopeScaling | None) -> bool:
    """Whether the frequencies change with the sequence length (dynamic, longrope)."""
    return isinstance(scaling, (DynamicNTKRope, LongRope))


def cache_expires_at(scaling: RopeScaling | None, length: int) -> bool:
    """Whether a key/value cache of ``length - 1`` positions must be recomputed before the sequence grows to
    ``length``: LongRoPE's switch from the short to the long factors (what transformers' Phi-3 ``generate``
    does; dynamic NTK keeps each cached key as it was rotated, in transformers too)."""
    return isinstance(scaling, LongRope) and length == scaling.original_max_position_embeddings + 1


def _default(base: float | Tensor, dim: int, device: torch.device | None) -> Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def inverse_frequencies(
    scaling: RopeScaling | None,
    *,
    base: float,
    dim: int,
    seq_len: Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, float]:
    """(inverse frequencies [dim / 2] in float32, factor on cos and sin) of rotary embeddings over ``dim``
    dimensions with frequency base ``base``. ``seq_len`` (a 0-d integer tensor: the largest position + 1) is
    what the length-dependent variants read; None stands for a sequence within the original context."""
    inv_freq = _default(base, dim, device)
    if scaling is None:
        return inv_freq, 1.0
    if isinstance(scaling, LinearRope):
        return inv_freq / scaling.factor, 1.0
    if isinstance(scaling, DynamicNTKRope):
        if seq_len is None:
            return inv_freq, 1.0
        original = scaling.original_max_position_embeddings
        length = torch.maximum(seq_len, torch.tensor(original, dtype=seq_len.dtype, device=seq_len.device))
        grown = base * ((scaling.factor * length / original) - (scaling.factor - 1)) ** (dim / (dim - 2))
        # within the original context Hugging Face keeps the unscaled frequencies (computed from the plain base)
        return torch.where(seq_len > original, _default(grown.to(device), dim, device), inv_freq), 1.0
    if isinstance(scaling, YarnRope):
        return _yarn(scaling, base, dim, device), scaling.attention_factor
    if isinstance(scaling, Llama3Rope):
        return _llama3(scaling, inv_freq), 1.0
    assert isinstance(scaling, LongRope)
    if len(scaling.short_factor) != dim // 2:
        raise ValueError(
            f"rope scaling 'longrope' has {len(scaling.short_factor)} factors, but rotary_dim={dim} needs {dim // 2}"
        )
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    short = 1.0 / (torch.tensor(scaling.short_factor, dtype=torch.float32, device=device) * base**shape)
    long = 1.0 / (torch.tensor(scaling.long_factor, dtype=torch.float32, device=device) * base**shape)
    if seq_len is None:
        return short, scaling.attention_factor
    return torch.where(
        seq_len > scaling.original_max_position_embeddings, long, short
    ), scaling.attention_factor


def _yarn(scaling: YarnRope, base: float, dim: int, device: torch.device | None) -> Tensor:
    original = scaling.original_max_position_embeddings

    def correction_dim(
        rotations: float,
    ) -> float:  # the dimension that turns `rotations` times over `original`
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as Hugging Face: no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolated (kept), 0: interpolated
    return interpolation * (1 - keep) + extrapolation * keep


def _llama3(scaling: Llama3Rope, inv_freq: Tensor) -> Tensor:
    original, factor = scaling.original_max_position_embeddings, scaling.factor
    low_wavelen = original / scaling.low_freq_factor
    high_wavelen = original / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
