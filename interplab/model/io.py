"""interplab's own model format: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).

`load_native` is the exact inverse of `save_model`. ``checksums.json`` (written last) records each file's size
and SHA-256; `load_native` verifies them and names a file that does not match.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from interplab.integrity import forget_checksums, record_checksums, verify_checksums
from interplab.io import atomic_write_json, save_tensors
from interplab.model.config import ModelConfig
from interplab.model.transformer import Transformer

FORMAT = "interplab"
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"


def save_model(model: Transformer, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    forget_checksums(path)  # the old record would fail the new files if this write is interrupted
    save_tensors(path / WEIGHTS, dict(model.state_dict()), metadata={"format": FORMAT})
    if model.tokenizer is not None:
        model.tokenizer.save(path / TOKENIZER)
    # config last: a folder with a config.json is a complete model
    atomic_write_json(path / CONFIG, {"format": FORMAT, **model.cfg.to_dict()})
    record_checksums(path, [WEIGHTS, TOKENIZER, CONFIG])
    return path


def is_native(path: Path) -> bool:
    cfg = path / CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except json.JSONDecodeError:
        verify_checksums(path)  # a config.json we wrote and that was damaged since: name it
        return False


def load_native(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    from safetensors.torch import load_file

    path = Path(path)
    verify_checksums(path)  # a flipped byte in any file is named here, never loaded
    data = json.loads((path / CONFIG).read_text())
    data.pop("format", None)
    cfg = ModelConfig.from_dict(data)
    weights_file = path / WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{path} has a {CONFIG} but no {WEIGHTS}")
    with torch.device("meta"):
        model = Transformer(cfg, init=False)
    state = load_file(str(weights_file), device=str(device))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    load_state_strict(model, state, source=str(weights_file))
    tok = path / "tokenizer.json"
    if tok.is_file():
        from interplab.data.tokenizer import load_tokenizer

        model.tokenizer = load_tokenizer(path)
    return model.eval()


def load_state_strict(model: Transformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a complete state dict (assigning tensors), naming any missing, unexpected or misshapen key."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KeyError(
            f"{source}: missing weight {missing[0]!r}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise KeyError(f"{source}: unexpected weight {unexpected[0]!r} (the config does not have it)")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ValueError(
                f"{source}: weight {k!r} has shape {tuple(state[k].shape)}, the config needs {tuple(shape)}"
            )
    # keep requires_grad as the model declared it (frozen zero biases stay frozen)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    model.load_state_dict(state, assign=True)
    for k, p in model.named_parameters():
        p.requires_grad_(flags[k])
