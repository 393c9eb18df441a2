"""`SAEConfig`: what fixes a sparse autoencoder's shape and forward pass (training knobs live in `SAETrainConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from interplab.hooks import Site, SiteKind

SAE_CONFIG_VERSION = 1


class Architecture(str, Enum):
    """The SAE families interplab trains and loads (values are SAELens' ``architecture`` strings)."""

    RELU = "standard"  # ReLU with an L1 penalty weighted by decoder norms (SAELens calls it "standard")
    TOPK = "topk"  # keep the k largest pre-activations per token (Gao et al. 2024)
    BATCHTOPK = (
        "batchtopk"  # keep the k*batch largest over a batch; a threshold at inference (Bussmann et al.)
    )
    JUMPRELU = (
        "jumprelu"  # z * H(z - threshold), L0 penalty via straight-through estimators (Rajamanoharan et al.)
    )
    GATED = "gated"  # gate and magnitude paths sharing W_enc (Rajamanoharan et al. 2024)
    #: BatchTopK with nested prefix losses over ``matryoshka_widths`` (Bussmann et al. 2025, Nabeshima 2024)
    MATRYOSHKA = "matryoshka_batchtopk"

    @classmethod
    def parse(cls, value: str | Architecture) -> Architecture:
        if isinstance(value, Architecture):
            return value
        aliases = {"relu": cls.RELU, "standard": cls.RELU, "l1": cls.RELU, "matryoshka": cls.MATRYOSHKA}
        if value.lower() in aliases:
            return aliases[value.lower()]
        try:
            return cls(value.lower())
        except ValueError:
            valid = ", ".join(sorted({a.value for a in cls} | set(aliases)))
            raise ValueError(f"unsupported SAE architecture {value!r}; valid: {valid}") from None


class Normalization(str, Enum):
    """Input normalisation before encoding."""

    NONE = "none"
    #: scale inputs by a constant so that their mean squared norm is d_in (estimated once from data)
    EXPECTED_AVERAGE_ONLY_IN = "expected_average_only_in"


class Reshape(str, Enum):
    """How an SAE's input is laid out (SAELens' ``reshape_activations``)."""

    NONE = "none"
    #: per-head input ``[..., n_heads, d_head]`` (``attn.hook_z``) is flattened to ``[..., d_in]`` before
    #: encoding, and the reconstruction is given back in the input's shape; flat input is accepted too
    HOOK_Z = "hook_z"


class DType(str, Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.value)


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """Shape and forward pass of a sparse autoencoder (a transcoder when ``hook_name_out`` is set)."""

    d_in: int
    """width of the activations read at ``hook_name``"""
    d_sae: int
    """number of latents (dictionary size)"""
    architecture: Architecture = Architecture.RELU
    """the SAE family (see `Architecture`)"""
    hook_name: str = ""
    """canonical site string the SAE reads (e.g. ``blocks.1.hook_resid_post``)"""
    hook_name_out: str | None = None
    """for transcoders: the site whose activation the SAE reconstructs; None for an ordinary SAE"""
    k: int | None = None
    """active latents per token for TopK / BatchTopK (required there, ignored elsewhere)"""
    normalize_activations: Normalization = Normalization.NONE
    """input normalisation (see `Normalization`)"""
    reshape_activations: Reshape = None  # type: ignore[assignment]  # None: resolved in __post_init__
    """``hook_z``: accept per-head input [..., n_heads, d_head] (see `Reshape`); None picks ``hook_z`` for an
    ``attn.hook_z`` SAE (not a transcoder) and ``none`` otherwise"""
    apply_b_dec_to_input: bool = True
    """subtract b_dec from the input before encoding (the pre-encoder bias); always False for transcoders,
    whose b_dec lives in the output space"""
    jumprelu_bandwidth: float = 0.05
    """width of the rectangle kernel used by JumpReLU's straight-through estimators"""
    jumprelu_init_threshold: float = 0.001
    """initial JumpReLU threshold"""
    matryoshka_widths: tuple[int, ...] | None = None
    """Matryoshka only: the nested prefix widths, strictly increasing and ending at d_sae (appended when
    missing); None picks d_sae/16, d_sae/4, d_sae (the widths that exist); ignored elsewhere"""
    dtype: DType = DType.FLOAT32
    """dtype of the stored weights"""
    model_name: str | None = None
    """the model the SAE was trained on (informational)"""
    extra_metadata: dict[str, Any] | None = field(default=None, hash=False)
    """other metadata of a SAELens file (``context_size``, ``prepend_bos``, ``dataset_path``, ...), kept as
    read and written back by `save_sae`; None when there is none"""
    version: int = SAE_CONFIG_VERSION
    """config format version"""

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("architecture", Architecture.parse(self.architecture))
        set_("normalize_activations", Normalization(self.normalize_activations))
        set_("dtype", DType(self.dtype))
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.architecture in (Architecture.TOPK, Architecture.BATCHTOPK, Architecture.MATRYOSHKA):
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise ValueError(
                    f"{self.architecture.name} needs 0 < k <= d_sae={self.d_sae}, got k={self.k!r}"
                )
        set_("matryoshka_widths", self._resolve_widths())
        if self.jumprelu_bandwidth <= 0:
            raise ValueError(f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}")
        if self.jumprelu_init_threshold < 0:
            raise ValueError(f"jumprelu_init_threshold must be >= 0, got {self.jumprelu_init_threshold}")
        if self.hook_name:
            set_("hook_name", Site.parse(self.hook_name).name)
        if self.hook_name_out:
            set_("hook_name_out", Site.parse(self.hook_name_out).name)
            set_("apply_b_dec_to_input", False)
        set_("reshape_activations", self._resolve_reshape())

    def _resolve_widths(self) -> tuple[int, ...] | None:
        if self.architecture is not Architecture.MATRYOSHKA:
            return None
        d = self.d_sae
        if self.matryoshka_widths is None:
            return tuple(sorted({w for w in (d // 16, d // 4, d) if w > 0}))
        widths = [int(w) for w in self.matryoshka_widths]
        if widths and widths[-1] != d:
            widths.append(d)
        if not widths or widths[0] <= 0 or any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
            raise ValueError(
                f"matryoshka_widths must be positive, strictly increasing and at most d_sae={d}, "
                f"got {self.matryoshka_widths!r}"
            )
        return tuple(widths)

    def _resolve_reshape(self) -> Reshape:
        on_z = bool(self.hook_name) and Site.parse(self.hook_name).kind is SiteKind.Z
        if self.reshape_activations is None:
            return Reshape.HOOK_Z if on_z and not self.is_transcoder else Reshape.NONE
        reshape = Reshape(self.reshape_activations)
        if reshape is Reshape.HOOK_Z and (self.is_transcoder or (self.hook_name and not on_z)):
            raise ValueError(
                "reshape_activations='hook_z' needs an SAE (not a transcoder) on an attn.hook_z site, got "
                f"hook_name={self.hook_name!r}, hook_name_out={self.hook_name_out!r}"
            )
        return reshape

    @property
    def is_transcoder(self) -> bool:
        return self.hook_name_out is not None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, Enum):
                out[key] = value.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SAEConfig fields {unknown}; valid: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)
