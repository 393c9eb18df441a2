"""Converters from Hugging Face checkpoints: one module per family, registered by ``model_type``.

A converter is a pair of pure functions:
- ``config(hf: dict) -> ModelConfig`` reads the HF ``config.json``;
- ``weights(ckpt: HFCheckpoint, cfg) -> Iterator[tuple[str, Tensor]]`` yields interplab weights (TransformerLens
  names and shapes) one at a time, so loading never holds two copies of the model.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interplab.io import unreadable_tensors
from interplab.model.config import Activation, ModelConfig
from interplab.model.placement import part_of
from interplab.model.precision import check_dtype, parameter_dtype
from interplab.model.rope import (
    ROPE_SCALINGS,
    DynamicNTKRope,
    LinearRope,
    Llama3Rope,
    LongRope,
    RopeScaling,
    YarnRope,
    yarn_mscale,
)
from interplab.model.transformer import Transformer


@dataclass(frozen=True)
class Converter:
    model_types: tuple[str, ...]
    config: Callable[[dict], ModelConfig]
    weights: Callable[["HFCheckpoint", ModelConfig], Iterator[tuple[str, torch.Tensor]]]


_REGISTRY: dict[str, Converter] = {}
# families shipped with interplab: model_type -> module (imported on first use)
_BUILTIN = {
    "gpt2": "gpt2",
    "gpt_neox": "neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma2": "gemma2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "olmo2": "olmo2",
    "phi3": "phi3",
}


def register(converter: Converter) -> Converter:
    """Register a converter; a model_type may be claimed once."""
    for t in converter.model_types:
        if t in _REGISTRY and _REGISTRY[t] is not converter:
            raise ValueError(f"a converter for model_type {t!r} is already registered")
        _REGISTRY[t] = converter
    return converter


def supported_model_types() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_converter(model_type: str) -> Converter:
    if model_type not in _REGISTRY and model_type in _BUILTIN:
        importlib.import_module(f"interplab.model.convert.{_BUILTIN[model_type]}")
    if model_type not in _REGISTRY:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[model_type]


@contextlib.contextmanager
def _naming(file: Path) -> Iterator[None]:
    """A weights file that cannot be read (truncated, damaged) is named in the error."""
    try:
        yield
    except (KeyError, FileNotFoundError):
        raise
    except Exception as err:  # SafetensorError, or what torch.load raises on a cut-off pickle
        raise unreadable_tensors(file, err) from None


class HFCheckpoint:
    """Lazy access to the tensors of a Hugging Face model folder: safetensors or pytorch .bin, sharded or not."""

    def __init__(
        self, path: str | Path, *, skip_layers: frozenset[int] = frozenset(), weights: Path | None = None
    ) -> None:
        self.path = Path(path)
        self.skip_layers = skip_layers
        """layers whose safetensors tensors come back as meta tensors (shape and dtype only, never read): the
        blocks that a device map puts on ``meta`` (another rank's, in a pipeline)"""
        self._where: dict[str, Path] = {}
        self._bin_cache: tuple[Path, dict] | None = None
        index = next(
            (
                self.path / n
                for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                if (self.path / n).is_file()
            ),
            None,
        )
        if weights is not None:  # one named file (interplab's own folders)
            index = None
            self._where = dict.fromkeys(self._keys_of(weights), weights)
        elif index is not None:
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {k: self.path / v for k, v in weight_map.items()}
        else:
            single = next(
                (
                    self.path / n
                    for n in ("model.safetensors", "pytorch_model.bin")
                    if (self.path / n).is_file()
                ),
                None,
            )
            if single is None:
                raise FileNotFoundError(
                    f"{self.path} has no model.safetensors, pytorch_model.bin or a sharded index of them"
                )
            for k in self._keys_of(single):
                self._where[k] = single

    def _keys_of(self, file: Path) -> list[str]:
        with _naming(file):
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as f:
                    return list(f.keys())
            return list(self._load_bin(file))

    def _load_bin(self, file: Path) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != file:
            # one shard in memory at a time; not memory-mapped, because torch.save rewrites files in place and
            # the loaded weights must not change (or fault) when someone saves over the checkpoint
            self._bin_cache = None
            self._bin_cache = (file, torch.load(file, map_location="cpu", weights_only=True))
        return self._bin_cache[1]

    def floating_dtype(self) -> torch.dtype | None:
        """The dtype of the checkpoint's first floating-point tensor (read from the header), e.g. to size a
        device map before anything is loaded; None for .bin files."""
        from safetensors import safe_open

        for key, file in self._where.items():
            if file.suffix != ".safetensors":
                return None
            with _naming(file), safe_open(str(file), framework="pt") as f:
                dtype = _ST_DTYPES.get(f.get_slice(key).get_dtype())
            if dtype is not None and dtype.is_floating_point:
                return dtype
        return None

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        file = self._where.get(key)
        if file is None:
            raise KeyError(f"missing weight {key!r} in {self.path}")
        with _naming(file):
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                # each tensor is mapped from the file on its own, so a converted (copied) tensor's pages are
                # released when the converter drops it, and the model never holds a whole shard
                with safe_open(str(file), framework="pt") as f:
                    if self.skip_layers and _layer_of(key) in self.skip_layers:
                        part = f.get_slice(key)
                        return torch.empty(
                            part.get_shape(), dtype=_ST_DTYPES[part.get_dtype()], device="meta"
                        )
                    return f.get_tensor(key)
            return self._load_bin(file)[key]

    def find_prefix(self, *candidates: str) -> str:
        """The first prefix (e.g. ``"transformer."`` or ``""``) under which the checkpoint's keys live."""
        for c in candidates:
            if any(k.startswith(c) for k in self._where):
                return c
        raise KeyError(f"none of the prefixes {candidates} matches the weights in {self.path}")


_LAYER_KEY = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d+)\.")
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _layer_of(key: str) -> int | None:
    """The layer index in a checkpoint key (``transformer.h.3.attn...``, ``model.layers.3...``), if any."""
    m = _LAYER_KEY.search(key)
    return int(m.group(1)) if m else None


def split_heads_in(w: torch.Tensor, n: int) -> torch.Tensor:
    """[n*d_head, d_model] (a torch Linear weight) -> [n, d_model, d_head]."""
    return w.reshape(n, -1, w.shape[-1]).permute(0, 2, 1).contiguous()


def split_heads_out(w: torch.Tensor, n: int) -> torch.Tensor:
    """[d_model, n*d_head] (a torch Linear weight of the output projection) -> [n, d_head, d_model]."""
    return w.T.reshape(n, -1, w.shape[0]).contiguous()


# Hugging Face ``hidden_act`` names -> interplab activations
HF_ACTIVATIONS = {
    "gelu_new": Activation.GELU_NEW,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "gelu_fast": Activation.GELU_TANH,
    "gelu": Activation.GELU,
    "relu": Activation.RELU,
    "silu": Activation.SILU,
    "swish": Activation.SILU,
    "quick_gelu": Activation.GELU_QUICK,
}


def hf_activation(name: str, family: str) -> Activation:
    if name not in HF_ACTIVATIONS:
        raise ValueError(
            f"{family} activation {name!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}"
        )
    return HF_ACTIVATIONS[name]


def hf_rope(hf: dict, *, theta_key: str = "rope_theta") -> dict:
    """The rotary parameters of an HF config (transformers 5 ``rope_parameters`` or the older flat keys and
    ``rope_scaling``), with ``rope_theta`` and ``rope_type`` filled in; the converter reads a scaled variant
    (linear, dynamic, yarn, llama3, longrope) with `hf_rope_scaling`."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    rope.pop("type", None)
    rope.setdefault("rope_theta", hf.get(theta_key, 10000.0))
    return rope


def hf_rope_scaling(hf: dict, rope: dict, family: str) -> RopeScaling | None:
    """The `interplab.model.rope` scaling of an HF config's rope parameters (from `hf_rope`), with the defaults
    and derived values `transformers` fills in (``original_max_position_embeddings`` from
    ``max_position_embeddings``, yarn's attention factor from ``factor``/``mscale``, longrope's from the context
    ratio). Refuses a ``rope_type`` it does not implement, naming the ones it does."""
    rope_type = rope["rope_type"]
    max_pos = hf.get("max_position_embeddings", 2048)
    # Phi-3 keeps the pretraining length beside rope_parameters, and transformers gives that one priority
    original = (
        hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos
    )
    if rope_type == "default":
        return None
    if rope_type not in ROPE_SCALINGS:
        raise ValueError(
            f"{family} rope scaling {rope_type!r} is not supported by interplab; supported: default, "
            f"{', '.join(ROPE_SCALINGS)}"
        )

    def need(key: str) -> Any:
        if rope.get(key) is None:
            raise ValueError(
                f"{family} rope scaling {rope_type!r} needs {key!r} in its rope parameters: {rope}"
            )
        return rope[key]

    if rope_type == "linear":
        return LinearRope(factor=float(need("factor")))
    if rope_type == "dynamic":
        return DynamicNTKRope(factor=float(need("factor")), original_max_position_embeddings=max_pos)
    if rope_type == "llama3":
        return Llama3Rope(
            factor=float(need("factor")),
            low_freq_factor=float(need("low_freq_factor")),
            high_freq_factor=float(need("high_freq_factor")),
            original_max_position_embeddings=original,
        )
    factor = rope.get("factor")
    factor = float(factor) if factor is not None else max_pos / original
    attention_factor = rope.get("attention_factor")
    if rope_type == "yarn":
        if attention_factor is None:
            mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = yarn_mscale(factor)
        return YarnRope(
            factor=factor,
            original_max_position_embeddings=original,
            attention_factor=float(attention_factor),
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            truncate=bool(rope.get("truncate", True)),
        )
    assert rope_type == "longrope"
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return LongRope(
        short_factor=tuple(need("short_factor")),
        long_factor=tuple(need("long_factor")),
        original_max_position_embeddings=original,
        attention_factor=float(attention_factor),
    )


def scaled_context(hf: dict, scaling: RopeScaling | None) -> int:
    """The longest sequence a converted model accepts (its ``n_ctx``): ``max_position_embeddings``, or what a
    rope scaling extends the pretraining context to (dynamic NTK scales beyond ``max_position_embeddings``)."""
    max_pos = int(hf.get("max_position_embeddings", 2048))
    if isinstance(scaling, (LinearRope, DynamicNTKRope, YarnRope, Llama3Rope)):
        original = getattr(scaling, "original_max_position_embeddings", max_pos)
        return max(max_pos, int(original * scaling.factor))
    return max_pos


def linear_in(ckpt: HFCheckpoint, key: str) -> torch.Tensor:
    """A torch Linear weight [out, in] as interplab's [in, out]."""
    return ckpt.get(key).T.contiguous()


def bias_or_zeros(ckpt: HFCheckpoint, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A bias reshaped to ``shape``, or zeros when the checkpoint has none (bias-free layers)."""
    if key in ckpt:
        return ckpt.get(key).reshape(shape).contiguous()
    return torch.zeros(shape, dtype=like.dtype)


def build_from_weights(
    cfg: ModelConfig,
    weights,
    *,
    device="cpu",
    dtype=None,
    source: str = "checkpoint",
    device_map: Mapping[str, torch.device] | None = None,
) -> Transformer:
    """Make a `Transformer` on the meta device and fill it one tensor at a time, each placed directly on its
    device (``device``, or its part's in a complete ``device_map``, see `interplab.model.placement`): host
    memory holds the finished part of the model plus the tensor being converted, never a second copy.

    What every converter's weights go through (Hugging Face families, TransformerLens), so it lives with them."""
    dtype = check_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(cfg, init=False)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for name, tensor in weights:
        old = params.get(name)
        if old is None:
            raise KeyError(f"{source}: unexpected weight {name!r} (the config does not have it)")
        if tuple(tensor.shape) != tuple(old.shape):
            raise ValueError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(old.shape)}"
            )
        target = torch.device(device if device_map is None else device_map[part_of(name)])
        if tensor.is_meta and target.type != "meta":
            raise RuntimeError(f"{source}: weight {name!r} was skipped (meta) but is needed on {target}")
        want = dtype or tensor.dtype  # None: as the checkpoint stores it
        tensor = tensor.to(
            device=target, dtype=parameter_dtype(cfg, name, want) if tensor.is_floating_point() else None
        )
        module_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=old.requires_grad))
        seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise KeyError(
            f"{source}: missing weight {missing[0]!r}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    return model.eval()
