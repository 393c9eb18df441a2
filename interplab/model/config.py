"""`ModelConfig`: everything that fixes a `Transformer`'s architecture, as a frozen dataclass.

Round-trips to JSON (``to_dict`` / ``from_dict``) with a ``version``; every choice is an Enum.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from interplab import runs
from interplab.model.rope import RopeScaling, parse_rope_scaling, rope_scaling_to_dict

CONFIG_VERSION = 1


class Activation(str, Enum):
    """MLP non-linearity."""

    GELU = "gelu"  # exact erf GELU
    GELU_TANH = "gelu_tanh"  # tanh approximation (gelu_pytorch_tanh), one fused kernel
    GELU_NEW = "gelu_new"  # GPT-2's gelu_new: gelu_tanh in float32, op by op in bf16/fp16 (as transformers)
    RELU = "relu"
    SILU = "silu"
    GELU_QUICK = "gelu_quick"  # x * sigmoid(1.702 x)


class Norm(str, Enum):
    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"
    NONE = "none"


class QKNorm(str, Enum):
    """RMSNorm of the queries and keys before rotary (weights ``attn.q_norm.w``, ``attn.k_norm.w``)."""

    NONE = "none"
    HEAD = "head"  # over each head's d_head, one weight [d_head] shared by the heads (Qwen3, Gemma-3)
    FULL = "full"  # over all heads at once, n_heads * d_head (n_kv_heads * d_head for keys) (OLMo-2)


class Positional(str, Enum):
    LEARNED = "learned"  # absolute learned positions added to the embedding (GPT-2)
    ROTARY = "rotary"  # rotary embeddings applied to queries and keys
    NONE = "none"


class RotaryStyle(str, Enum):
    NEOX = "neox"  # rotate halves (GPT-NeoX, Llama)
    GPTJ = "gptj"  # rotate interleaved pairs (GPT-J)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder-style transformer (or an encoder, with ``causal=False``).

    The sizes that accept ``None`` (``d_head``, ``n_kv_heads``, ``d_mlp``, ``d_vocab_out``, ``rotary_dim``,
    ``attn_scale``) are derived in ``__post_init__``: on an instance they always hold a number, and are typed so.
    """

    d_model: int
    """width of the residual stream"""
    n_layers: int
    """number of transformer blocks"""
    n_heads: int
    """number of attention (query) heads per block"""
    d_vocab: int
    """input vocabulary size"""
    n_ctx: int
    """longest sequence the model accepts"""
    d_head: int = None  # type: ignore[assignment]  # None: derived in __post_init__
    """width of each head; defaults to d_model // n_heads"""
    n_kv_heads: int = None  # type: ignore[assignment]  # None: derived in __post_init__
    """key/value heads (grouped-query attention); defaults to n_heads"""
    d_mlp: int = None  # type: ignore[assignment]  # None: derived in __post_init__
    """MLP hidden width; defaults to 4 * d_model (ignored for attention-only models)"""
    d_vocab_out: int = None  # type: ignore[assignment]  # None: derived in __post_init__
    """output vocabulary size; defaults to d_vocab (a classifier sets e.g. 2)"""
    attn_only: bool = False
    """no MLPs at all"""
    act_fn: Activation = Activation.GELU
    """MLP non-linearity"""
    gated_mlp: bool = False
    """gated MLP (SwiGLU / GeGLU): act(x W_gate) * (x W_in)"""
    normalization: Norm = Norm.LAYERNORM
    """norm before attention, MLP and unembedding"""
    norm_eps: float = 1e-5
    """epsilon inside the norm"""
    post_norms: bool = False
    """extra norms on the attention and MLP outputs before they join the residual stream (Gemma-2)"""
    norm_weight_float32: bool = False
    """RMSNorms multiply by their weight in float32 before casting back, and a bf16/fp16 model keeps their
    weights in float32 (Gemma's x * (1 + w), OLMo-2); False: cast back, then multiply in the model's dtype
    (Llama)"""
    rotary_float32: bool = False
    """rotary embeddings rotate in float32 and cast back in a bf16/fp16 model (OLMo-2); False: the cos and sin
    tables are cast to the model's dtype first (Llama, as transformers does each)"""
    pre_norms: bool = True
    """norms on the attention and MLP inputs (``ln1``, ``ln2``); False: the blocks read the residual stream
    itself and only the post norms normalise (OLMo-2; needs ``post_norms``)"""
    qk_norm: QKNorm = QKNorm.NONE
    """RMSNorm (eps ``norm_eps``, whatever ``normalization`` is) of queries and keys after their projection,
    before rotary (Qwen3, Gemma-3, OLMo-2)"""
    positional: Positional = Positional.LEARNED
    """how positions enter the model"""
    rotary_dim: int = None  # type: ignore[assignment]  # None: derived in __post_init__
    """dimensions per head that rotate; defaults to d_head (partial rotary if smaller)"""
    rotary_base: float = 10000.0
    """rotary frequency base (theta)"""
    rotary_bases: tuple[float, ...] = ()
    """one rotary base per layer, overriding ``rotary_base`` (Gemma-3: local layers 10k, global 1M); empty:
    ``rotary_base`` everywhere"""
    rotary_style: RotaryStyle = RotaryStyle.NEOX
    """how rotary dimensions are paired"""
    rope_scaling: RopeScaling | None = None
    """scaled rotary frequencies (`interplab.model.rope`: linear, dynamic, yarn, llama3, longrope); None: unscaled.
    A dict with a ``rope_type`` is accepted (what ``to_dict`` writes)"""
    rope_scaled_layers: tuple[int, ...] = ()
    """the layers ``rope_scaling`` applies to; empty: every layer (Gemma-3 scales its global layers only)"""
    parallel_attn_mlp: bool = False
    """attention and MLP read the same residual stream and are added together (GPT-NeoX, GPT-J)"""
    attn_bias: bool = True
    """attention biases are trained (if False they exist but stay zero until weight processing)"""
    mlp_bias: bool = True
    """MLP biases are trained (if False they exist but stay zero until weight processing)"""
    gate_bias: bool = False
    """a gated MLP's gate has a bias ``b_gate`` too: act(x W_gate + b_gate) (Llama with ``mlp_bias``)"""
    unembed_bias: bool = False
    """the unembedding has a trained bias"""
    tie_embeddings: bool = False
    """the unembedding is the transpose of the embedding"""
    causal: bool = True
    """causal (decoder) attention; False gives bidirectional attention"""
    smear_keys: bool = False
    """each key mixes in the previous position's key through a learned per-head gate (Olsson et al. 2022)"""
    attn_scale: float = None  # type: ignore[assignment]  # None: derived in __post_init__
    """attention scores are divided by this; defaults to sqrt(d_head)"""
    attn_softcap: float | None = None
    """cap scores as softcap * tanh(scores / softcap) (Gemma-2)"""
    logit_softcap: float | None = None
    """cap output logits as softcap * tanh(logits / softcap) (Gemma-2)"""
    embed_scale: float | None = None
    """multiply token embeddings by this (Gemma: sqrt(d_model))"""
    sliding_window: int | None = None
    """local attention window for the layers marked in ``sliding_layers``"""
    sliding_layers: tuple[int, ...] = ()
    """layers that use the sliding window (all layers if sliding_window is set and this is empty)"""
    init_range: float = 0.02
    """standard deviation of the initial weights"""
    name: str = ""
    """a free-form model name (informational)"""
    architecture: str = ""
    """the source family it was converted from (informational, e.g. 'gpt2')"""

    def __post_init__(self) -> None:
        for enum_field, enum in (
            ("act_fn", Activation),
            ("normalization", Norm),
            ("positional", Positional),
            ("rotary_style", RotaryStyle),
            ("qk_norm", QKNorm),
        ):
            value = getattr(self, enum_field)
            if not isinstance(value, enum):
                try:
                    object.__setattr__(self, enum_field, enum(value))
                except ValueError:
                    valid = ", ".join(e.value for e in enum)
                    raise ValueError(f"{enum_field}={value!r} is not one of: {valid}") from None
        for name in ("d_model", "n_layers", "n_heads", "d_vocab", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; give d_head explicitly"
                )
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_mlp is None:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)
        if self.d_vocab_out is None:
            object.__setattr__(self, "d_vocab_out", self.d_vocab)
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.d_head)
        if self.attn_scale is None:
            object.__setattr__(self, "attn_scale", float(self.d_head) ** 0.5)
        object.__setattr__(self, "sliding_layers", tuple(self.sliding_layers))
        object.__setattr__(self, "rope_scaling", parse_rope_scaling(self.rope_scaling))
        object.__setattr__(self, "rotary_bases", tuple(float(b) for b in self.rotary_bases))
        object.__setattr__(self, "rope_scaled_layers", tuple(self.rope_scaled_layers))
        assert self.d_head is not None and self.n_kv_heads is not None and self.rotary_dim is not None
        for name in ("d_head", "n_kv_heads", "d_mlp", "d_vocab_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (grouped-query attention)"
            )
        if self.positional is Positional.ROTARY:
            if self.rotary_dim > self.d_head or self.rotary_dim % 2:
                raise ValueError(
                    f"rotary_dim={self.rotary_dim} must be even and at most d_head={self.d_head}"
                )
        if self.rope_scaling is not None and self.positional is not Positional.ROTARY:
            raise ValueError(
                f"rope_scaling={self.rope_scaling.rope_type!r} needs positional='rotary', got {self.positional.value!r}"
            )
        if self.rope_scaled_layers:
            if self.rope_scaling is None:
                raise ValueError("rope_scaled_layers is set but rope_scaling is None")
            bad = [layer for layer in self.rope_scaled_layers if not 0 <= layer < self.n_layers]
            if bad:
                raise ValueError(
                    f"rope_scaled_layers has layers {bad}, but the model has {self.n_layers} layers"
                )
        if self.gate_bias and not (self.gated_mlp and self.has_mlp):
            raise ValueError("gate_bias=True needs a gated MLP (gated_mlp=True, attn_only=False)")
        if self.tie_embeddings and self.d_vocab_out != self.d_vocab:
            raise ValueError(
                f"tie_embeddings needs d_vocab_out == d_vocab, got {self.d_vocab_out} != {self.d_vocab}"
            )
        if self.parallel_attn_mlp and self.attn_only:
            raise ValueError("parallel_attn_mlp=True needs an MLP, but attn_only=True")
        if self.smear_keys and not self.causal:
            raise ValueError("smear_keys mixes in the previous position's key and needs causal=True")
        for layer in self.sliding_layers:
            if not 0 <= layer < self.n_layers:
                raise ValueError(
                    f"sliding_layers has layer {layer}, but the model has {self.n_layers} layers"
                )
        if self.sliding_layers and self.sliding_window is None:
            raise ValueError("sliding_layers is set but sliding_window is None")
        if self.rotary_bases:
            if len(self.rotary_bases) != self.n_layers:
                raise ValueError(
                    f"rotary_bases has {len(self.rotary_bases)} values, but the model has {self.n_layers} layers"
                )
            if self.positional is not Positional.ROTARY:
                raise ValueError(
                    f"rotary_bases is set but positional={self.positional.value!r}, not 'rotary'"
                )
            if min(self.rotary_bases) <= 0:
                raise ValueError(f"rotary_bases must be positive, got {list(self.rotary_bases)}")
        if not self.pre_norms and not self.post_norms:
            raise ValueError(
                "pre_norms=False needs post_norms=True (OLMo-2 normalises each sublayer's output instead)"
            )
        if not self.pre_norms and self.parallel_attn_mlp:
            raise ValueError("pre_norms=False is not supported with parallel_attn_mlp=True")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.norm_weight_float32 and self.normalization is not Norm.RMSNORM:
            raise ValueError(
                f"norm_weight_float32=True is for RMSNorm models, but normalization={self.normalization.value!r}"
            )

    # ---- derived -------------------------------------------------------------------------------
    @property
    def has_mlp(self) -> bool:
        return not self.attn_only

    @property
    def n_groups(self) -> int:
        """query heads per key/value head"""
        return self.n_heads // self.n_kv_heads

    def window_for(self, layer: int) -> int | None:
        """The sliding window of a layer, or None for full attention."""
        if self.sliding_window is None:
            return None
        if not self.sliding_layers or layer in self.sliding_layers:
            return self.sliding_window
        return None

    def rotary_base_for(self, layer: int) -> float:
        """The rotary base (theta) of a layer: ``rotary_bases[layer]`` if given, else ``rotary_base``."""
        return self.rotary_bases[layer] if self.rotary_bases else self.rotary_base

    @property
    def per_layer_rotary(self) -> bool:
        """Whether layers differ in their rotary tables (``rotary_bases`` or ``rope_scaled_layers``)."""
        return bool(self.rotary_bases or self.rope_scaled_layers)

    def rope_scaled(self, layer: int) -> bool:
        """Whether ``rope_scaling`` applies to a layer."""
        return self.rope_scaling is not None and (
            not self.rope_scaled_layers or layer in self.rope_scaled_layers
        )

    def rotary_config(self, layer: int) -> ModelConfig:
        """This config with ``rotary_base`` and ``rope_scaling`` set to the layer's own (what `rotary_tables`
        reads)."""
        if not self.per_layer_rotary:
            return self
        return _rotary_config(self, self.rotary_base_for(layer), self.rope_scaled(layer))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": CONFIG_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            elif f.name == "rope_scaling" and value is not None:
                value = rope_scaling_to_dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        kind = data.pop("kind", runs.Kind.MODEL.value)  # a config.json written through runs says what it is
        if kind != runs.Kind.MODEL.value:
            raise ValueError(f"this is a {kind!r} document, not a model config ({runs.Kind.MODEL.value!r})")
        data.pop("format", None)
        version = data.pop("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ValueError(f"config version {version} is newer than this interplab ({CONFIG_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        """Write the config as a `runs.Kind.MODEL` JSON document (what a model folder's ``config.json`` holds)."""
        runs.write_json(Path(path), runs.Kind.MODEL, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


@functools.lru_cache(maxsize=256)
def _rotary_config(cfg: ModelConfig, base: float, scaled: bool) -> ModelConfig:
    """``cfg`` with one rotary base and its scaling or none (kept: every forward of a model with per-layer rotary
    asks; ~5 us, not ~90)."""
    return cfg.replace(
        rotary_base=base,
        rotary_bases=(),
        rope_scaling=cfg.rope_scaling if scaled else None,
        rope_scaled_layers=(),
    )
