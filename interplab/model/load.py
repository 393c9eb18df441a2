"""`load_model`: read a local model folder or file into a `Transformer`. Never touches the network.

Recognised, in this order:
1. interplab's own format (``config.json`` with ``"format": "interplab"``);
2. a Hugging Face folder (``config.json`` with ``model_type``; safetensors or .bin, sharded or not);
3. a TransformerLens checkpoint: a ``HookedTransformer`` state dict (``.pt``/``.pth``, or ``.safetensors``)
   plus its config as JSON (``transformerlens_config.json`` / ``tl_config.json`` next to it, or ``tl_config=``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from interplab.io import read_json
from interplab.model.convert import build_from_weights
from interplab.model.convert.transformer_lens import TL_CONFIG_NAMES
from interplab.model.transformer import Transformer


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tl_config: str | Path | dict | None = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
) -> Transformer:
    """Load a model from a local path (see the module docstring for the formats).

    The weight-processing flags apply `interplab.model.process.process_weights` after loading; each leaves the
    model's log-probabilities unchanged. They default to False (the weights as published), whereas
    TransformerLens' ``from_pretrained`` defaults to all four True: pass ``fold_ln=True,
    center_writing_weights=True, center_unembed=True, fold_value_biases=True`` to get its processed model (a
    step that is not valid for the model, such as centring the writing weights of an RMSNorm model, is skipped
    with a warning, as TransformerLens does).

    >>> model = load_model("runs/demo/final")
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    model = _load(path, device=device, dtype=dtype, tl_config=tl_config)
    if fold_ln or center_writing_weights or center_unembed or fold_value_biases:
        from interplab.model import process

        process.process_weights(
            model,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
        )
    return model


def _load(path: Path, *, device, dtype, tl_config) -> Transformer:
    from interplab.model.io import is_native, load_native

    if (
        path.is_file()
        and tl_config is None
        and _tl_config_in(path) is None
        and (path.parent / "config.json").is_file()
    ):
        path = path.parent  # a weights file inside an interplab or Hugging Face folder: load the folder
    if path.is_dir() and is_native(path):
        return load_native(path, device=device, dtype=dtype)
    if tl_config is not None or path.is_file() or _tl_config_in(path) is not None:
        from interplab.model.convert.transformer_lens import load_transformer_lens

        return load_transformer_lens(path, tl_config, device=device, dtype=dtype)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a model folder: no config.json (interplab or Hugging Face) and no TransformerLens config "
            f"({', '.join(TL_CONFIG_NAMES)})"
        )
    return load_hf(path, device=device, dtype=dtype)


def _tl_config_in(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    return next((folder / n for n in TL_CONFIG_NAMES if (folder / n).is_file()), None)


def load_hf(path: str | Path, *, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Convert a Hugging Face model folder, tensor by tensor."""
    from interplab.model.convert import HFCheckpoint, get_converter

    path = Path(path)
    hf = read_json(path / "config.json")
    model_type = hf.get("model_type")
    if model_type is None:
        raise ValueError(f"{path / 'config.json'} has no model_type: is this a Hugging Face model folder?")
    converter = get_converter(model_type)
    cfg = converter.config(hf)
    model = build_from_weights(
        cfg, converter.weights(HFCheckpoint(path), cfg), device=device, dtype=dtype, source=str(path)
    )
    if (path / "tokenizer.json").is_file():
        from interplab.data.tokenizer import load_tokenizer

        model.tokenizer = load_tokenizer(path)
    return model
