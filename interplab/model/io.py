"""interplab's own model format: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).

The ``config.json`` is ``{kind: model, version, format: interplab, ...ModelConfig}`` (`interplab.runs` names the
files and writes the document; a folder written before ``kind`` existed is recognised there). `load_native` is
the exact inverse of `save_model`. ``checksums.json`` (written last) records each file's size and SHA-256;
`load_native` verifies them and names a file that does not match.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from interplab import runs
from interplab.data.tokenizer import load_tokenizer
from interplab.integrity import forget_checksums, record_checksums, verify_checksums
from interplab.io import save_tensors
from interplab.model.config import ModelConfig
from interplab.model.convert import HFCheckpoint, build_from_weights
from interplab.model.placement import meta_layers
from interplab.model.transformer import Transformer
from interplab.runs import CONFIG, TOKENIZER
from interplab.runs import MODEL_WEIGHTS as WEIGHTS

FORMAT = "interplab"
"""``config.json``'s ``format``: kept beside ``kind`` so that an older interplab still reads the folder"""


def save_model(model: Transformer, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    forget_checksums(path)  # the old record would fail the new files if this write is interrupted
    save_tensors(path / WEIGHTS, dict(model.state_dict()), metadata={"format": FORMAT})
    if model.tokenizer is not None:
        model.tokenizer.save(path / TOKENIZER)
    # config last: a folder with a config.json is a complete model
    runs.write_json(path / CONFIG, runs.Kind.MODEL, {"format": FORMAT, **model.cfg.to_dict()})
    record_checksums(path, [WEIGHTS, TOKENIZER, CONFIG])
    return path


def is_native(path: Path) -> bool:
    """Whether ``path`` is an interplab model folder (a checkpoint is one too)."""
    cfg = path / CONFIG
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        verify_checksums(path)  # a config.json we wrote and that was damaged since: name it
        return False
    return isinstance(data, dict) and runs.detect_document(CONFIG, data) is runs.Kind.MODEL


def load_native(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    device_map: Mapping[str, torch.device] | None = None,
) -> Transformer:
    """The inverse of `save_model`: the model built on the meta device and filled tensor by tensor from the
    memory-mapped ``model.safetensors``, each tensor converted (``dtype``) and placed (``device``, or its part's
    device in a complete ``device_map``) as it is read; a part mapped to ``meta`` is never read."""
    path = Path(path)
    verify_checksums(path)  # a flipped byte in any file is named here, never loaded
    data = runs.read_json(path / CONFIG, runs.Kind.MODEL)
    for key in ("kind", "format"):
        data.pop(key, None)
    cfg = ModelConfig.from_dict(data)
    weights_file = path / WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{path} has a {CONFIG} but no {WEIGHTS}")
    ckpt = HFCheckpoint(path, skip_layers=meta_layers(device_map), weights=weights_file)
    model = build_from_weights(
        cfg,
        ((k, ckpt.get(k)) for k in ckpt.keys()),
        device=device,
        dtype=dtype,
        source=str(weights_file),
        device_map=device_map,
    )
    attach_tokenizer(model, path)
    return model.eval()


def attach_tokenizer(model: Transformer, folder: Path) -> None:
    """Give ``model`` the ``tokenizer.json`` of ``folder`` when it has one (interplab and Hugging Face folders)."""
    if (folder / TOKENIZER).is_file():
        model.tokenizer = load_tokenizer(folder)
