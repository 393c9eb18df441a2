"""The floating-point dtypes a `Transformer` runs in, and which parameters stay float32 in a half-precision model.

A model runs in float32 (the default), bfloat16 or float16 (`load_model(..., dtype=torch.bfloat16)`), or in
float64 (for checks). Half precision follows what Hugging Face's ``transformers`` does, so a bf16 model tracks
the same model in bf16 there (measured per family in docs/loading.md, "Precision"): attention softmax in float32,
norms computed in float32 and cast back, rotary tables computed in float32. Models whose norms multiply by their
weight in float32 (Gemma's ``x * (1 + w)``, OLMo-2: ``ModelConfig.norm_weight_float32``) keep those weights in
float32.
"""

from __future__ import annotations

import torch

from interplab.model.config import ModelConfig

__all__ = ["DTYPES", "check_dtype", "parameter_dtype"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
"""the dtypes a model runs in, by name"""
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp64": "float64"}
_HALF = (torch.bfloat16, torch.float16)


def check_dtype(dtype: torch.dtype | str | None, what: str = "dtype") -> torch.dtype | None:
    """``dtype`` as a torch dtype a model can run in (a name such as ``"bf16"`` or ``"bfloat16"`` is read),
    None kept; anything else is refused naming what is valid.

    >>> check_dtype("bf16")
    torch.bfloat16
    >>> check_dtype(torch.int8)
    Traceback (most recent call last):
    ...
    ValueError: dtype=torch.int8 is not supported: a model runs in float32, bfloat16, float16 or float64
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.lower().removeprefix("torch."), dtype.lower().removeprefix("torch."))
        if name in DTYPES:
            return DTYPES[name]
    elif dtype in DTYPES.values():
        return dtype
    raise ValueError(
        f"{what}={dtype!r} is not supported: a model runs in {', '.join(list(DTYPES)[:-1])} or float64"
    )


def parameter_dtype(cfg: ModelConfig, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype parameter ``name`` is stored in when the model runs in ``dtype``: ``dtype`` itself, except the
    norm weights of a model that multiplies by them in float32 (``cfg.norm_weight_float32``), which stay float32
    in a bfloat16 or float16 model, as Hugging Face's Gemma computes ``1 + w`` in float32."""
    if dtype in _HALF and cfg.norm_weight_float32 and _is_norm_weight(name):
        return torch.float32
    return dtype


def _is_norm_weight(name: str) -> bool:
    """``ln1.w``, ``ln2_post.w``, ``ln_final.w``, and the q/k norms' ``attn.q_norm.w``, ``attn.k_norm.w``."""
    module, _, leaf = name.rpartition(".")
    last = module.rpartition(".")[2]
    return leaf == "w" and (last.startswith("ln") or last in ("q_norm", "k_norm"))
