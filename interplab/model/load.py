"""`load_model`: read a local model folder or file into a `Transformer`. Never touches the network.

What a path may be (`model_source` says which folder or file a path stands for; `load_model` reads exactly
that one):

1. interplab's own model folder: a run's ``final/``, a checkpoint ``RUN/checkpoints/step_N/``, or any folder
   `Transformer.save` wrote (``config.json`` of kind ``model``, or the older ``"format": "interplab"``);
2. a training run folder (what ``interplab train`` writes): its ``final/`` model. A run without ``final/`` (it
   was stopped or interrupted) is refused with the path of its latest intact checkpoint, to load instead;
3. a Hugging Face folder (``config.json`` with ``model_type``; safetensors or .bin, sharded or not);
4. a TransformerLens checkpoint: a ``HookedTransformer`` state dict (``.pt``/``.pth``, or ``.safetensors``)
   plus its config as JSON (``transformerlens_config.json`` / ``tl_config.json`` next to it, or ``tl_config=``).

A weights file inside an interplab or Hugging Face folder stands for its folder. Any other folder is refused
with what it is (an SAE run, an activation cache ...: `interplab.runs.describe`) and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from interplab import runs
from interplab.io import read_json
from interplab.model.config import ModelConfig
from interplab.model.convert import HFCheckpoint, build_from_weights, get_converter
from interplab.model.convert.transformer_lens import TL_CONFIG_NAMES, load_transformer_lens
from interplab.model.io import CONFIG, attach_tokenizer, is_native, load_native
from interplab.model.placement import DeviceMap, dispatch, meta_layers, resolve_device_map
from interplab.model.precision import check_dtype
from interplab.model.process import process_weights
from interplab.model.transformer import Transformer
from interplab.runs import MODEL_WEIGHTS

__all__ = ["build_from_weights", "load_config", "load_hf", "load_model", "model_source"]


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    tl_config: str | Path | dict[str, Any] | None = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    device_map: str | DeviceMap | None = None,
    max_memory: Mapping[str, int | float | str] | None = None,
) -> Transformer:
    """Load a model from a local path: a model folder or file, or a training run (its ``final/``; see the
    module docstring for every form, and `model_source` for the folder a path stands for).

    ``dtype`` (None: as stored) is ``torch.float32``, ``torch.bfloat16``, ``torch.float16`` or ``torch.float64``
    (or its name, ``"bf16"``): the model then runs in it as ``transformers`` does in that dtype (softmax and
    norms in float32; docs/loading.md, "Precision", gives the measured differences per family).

    The weight-processing flags apply `interplab.model.process.process_weights` after loading; each leaves the
    model's log-probabilities unchanged. They default to False (the weights as published), whereas
    TransformerLens' ``from_pretrained`` defaults to all four True: pass ``fold_ln=True,
    center_writing_weights=True, center_unembed=True, fold_value_biases=True`` to get its processed model (a
    step that is not valid for the model, such as centring the writing weights of an RMSNorm model, is skipped
    with a warning, as TransformerLens does).

    ``device_map`` splits the model by layers across devices instead of putting it all on ``device``:
    ``"auto"`` fills the devices in order (their free CUDA memory, or the budgets of ``max_memory``, e.g.
    ``{"cuda:0": "20GiB", "cuda:1": "40GiB"}``), or a dict ``{"embed": "cuda:0", "blocks.0": "cuda:0", ...,
    "unembed": "cuda:1"}`` (``"blocks"`` for every block not named). Each tensor is read and placed on its
    device directly; parts on ``meta`` are never read (see `interplab.model.placement`, docs/scale.md).

    >>> model = load_model("runs/demo")  # a training run: its final/
    >>> model_source("runs/demo")
    PosixPath('runs/demo/final')
    """
    dtype = check_dtype(dtype)
    path = model_source(path, tl_config=tl_config)
    if device_map is not None and str(device) != "cpu":
        raise ValueError(f"give device= or device_map=, not both (got device={device!r} and a device_map)")
    if path.is_dir() and is_native(path):
        model = load_native(
            path, device=device, dtype=dtype, device_map=_plan(path, dtype, device_map, max_memory)
        )
    elif path.is_file() or tl_config is not None or _tl_config_in(path) is not None:
        model = load_transformer_lens(path, tl_config, device=device, dtype=dtype)
        if device_map is not None:
            dispatch(model, device_map, max_memory=max_memory)
    else:
        model = load_hf(path, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    if fold_ln or center_writing_weights or center_unembed or fold_value_biases:
        process_weights(
            model,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
        )
    return model


def load_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of the interplab or Hugging Face model at ``path`` (as `model_source` resolves it),
    read without loading any weight, e.g. to plan a device map."""
    path = model_source(path)
    if path.is_dir() and is_native(path):
        return ModelConfig.from_dict(read_json(path / CONFIG))
    if path.is_file() or _tl_config_in(path) is not None:
        raise ValueError(
            f"{path} is a TransformerLens checkpoint: load_config reads interplab and Hugging Face folders"
        )
    hf = read_json(path / CONFIG)
    if "model_type" not in hf:
        raise ValueError(f"{path / CONFIG} has no model_type: is this a Hugging Face model folder?")
    return get_converter(hf["model_type"]).config(hf)


def model_source(path: str | Path, *, tl_config: str | Path | dict[str, Any] | None = None) -> Path:
    """The model folder (or TransformerLens file) that `load_model` reads for ``path``: ``path`` itself for a
    model folder or file, ``RUN/final`` for a training run ``RUN``, the folder of a weights file inside an
    interplab or Hugging Face folder. Raises `interplab.runs.RunError`, saying what ``path`` is, when it holds
    no model (an unfinished run: naming its latest intact checkpoint, which loads)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if tl_config is not None or _tl_config_in(path) is not None:
        return path
    if path.is_file():
        # a weights file inside an interplab or Hugging Face folder stands for the folder
        return model_source(path.parent) if (path.parent / CONFIG).is_file() else path
    if is_native(path):  # (a damaged config.json in a checksummed folder is named here)
        return path
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(
            f"{path} is not a model folder: it is {runs.describe(path)}, with no {CONFIG} (interplab or Hugging "
            f"Face) and no TransformerLens config ({', '.join(TL_CONFIG_NAMES)})"
        )
    return runs.model_folder(path)


def _tl_config_in(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    return next((folder / n for n in TL_CONFIG_NAMES if (folder / n).is_file()), None)


def _plan(
    path: Path,
    dtype: torch.dtype | None,
    device_map: str | DeviceMap | None,
    max_memory: Mapping[str, int | float | str] | None,
) -> dict[str, torch.device] | None:
    """An interplab folder's device map, sized from its config and the weights file's dtype."""
    if device_map is None:
        return None
    cfg = ModelConfig.from_dict(read_json(path / CONFIG))
    stored = HFCheckpoint(path, weights=path / MODEL_WEIGHTS).floating_dtype()
    return resolve_device_map(cfg, device_map, max_memory=max_memory, dtype=dtype or stored)


def load_hf(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    device_map: str | DeviceMap | None = None,
    max_memory: Mapping[str, int | float | str] | None = None,
) -> Transformer:
    """Convert a Hugging Face model folder, tensor by tensor (``device_map``: see `load_model`)."""
    path = Path(path)
    hf = read_json(path / CONFIG)
    model_type = hf.get("model_type")
    if model_type is None:
        raise ValueError(f"{path / CONFIG} has no model_type: is this a Hugging Face model folder?")
    converter = get_converter(model_type)
    cfg = converter.config(hf)
    ckpt = HFCheckpoint(path)
    plan = None
    if device_map is not None:
        plan = resolve_device_map(
            cfg, device_map, max_memory=max_memory, dtype=dtype or ckpt.floating_dtype()
        )
        ckpt.skip_layers = meta_layers(plan)
    model = build_from_weights(
        cfg, converter.weights(ckpt, cfg), device=device, dtype=dtype, source=str(path), device_map=plan
    )
    attach_tokenizer(model, path)
    return model
