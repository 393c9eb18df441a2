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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from interplab.io import unreadable_tensors
from interplab.model.config import Activation, ModelConfig
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

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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
        if index is not None:
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

                with safe_open(str(file), framework="pt") as f:
                    return f.get_tensor(key)
            return self._load_bin(file)[key]

    def find_prefix(self, *candidates: str) -> str:
        """The first prefix (e.g. ``"transformer."`` or ``""``) under which the checkpoint's keys live."""
        for c in candidates:
            if any(k.startswith(c) for k in self._where):
                return c
        raise KeyError(f"none of the prefixes {candidates} matches the weights in {self.path}")


def split_heads_in(w: torch.Tensor, n: int) -> torch.Tensor:
    """[n*d_head, d_model] (a torch Linear weight) -> [n, d_model, d_head]."""
    return w.reshape(n, -1, w.shape[-1]).permute(0, 2, 1).contiguous()


def split_heads_out(w: torch.Tensor, n: int) -> torch.Tensor:
    """[d_model, n*d_head] (a torch Linear weight of the output projection) -> [n, d_head, d_model]."""
    return w.T.reshape(n, -1, w.shape[0]).contiguous()


# Hugging Face ``hidden_act`` names -> interplab activations
HF_ACTIVATIONS = {
    "gelu_new": Activation.GELU_TANH,
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


def hf_rope(hf: dict, family: str, *, theta_key: str = "rope_theta") -> dict:
    """The rotary parameters of an HF config (transformers 5 ``rope_parameters`` or the older flat keys),
    refusing scaled variants (linear, dynamic, yarn, llama3 ...) that interplab does not implement."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"{family} rope scaling {rope_type!r} is not supported by interplab (only unscaled rotary embeddings)"
        )
    rope.setdefault("rope_theta", hf.get(theta_key, 10000.0))
    return rope


def linear_in(ckpt: HFCheckpoint, key: str) -> torch.Tensor:
    """A torch Linear weight [out, in] as interplab's [in, out]."""
    return ckpt.get(key).T.contiguous()


def bias_or_zeros(ckpt: HFCheckpoint, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A bias reshaped to ``shape``, or zeros when the checkpoint has none (bias-free layers)."""
    if key in ckpt:
        return ckpt.get(key).reshape(shape).contiguous()
    return torch.zeros(shape, dtype=like.dtype)


def build_from_weights(
    cfg: ModelConfig, weights, *, device="cpu", dtype=None, source: str = "checkpoint"
) -> Transformer:
    """Make a `Transformer` on the meta device and fill it one tensor at a time (peak memory ~ one model).

    What every converter's weights go through (Hugging Face families, TransformerLens), so it lives with them."""
    with torch.device("meta"):
        model = Transformer(cfg, init=False)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for name, tensor in weights:
        old = params.get(name)
        if old is None:
            raise KeyError(f"{source}: converter produced unknown weight {name!r}")
        if tuple(tensor.shape) != tuple(old.shape):
            raise ValueError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(old.shape)}"
            )
        tensor = tensor.to(
            device=device, dtype=dtype or (tensor.dtype if tensor.is_floating_point() else None)
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
