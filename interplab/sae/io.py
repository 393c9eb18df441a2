"""Save and load SAEs in SAELens' directory layout: ``cfg.json`` + ``sae_weights.safetensors``.

`save_sae` writes what ``sae_lens.SAE.load_from_disk`` reads (tensors W_enc [d_in d_sae], b_enc, W_dec
[d_sae d_in], b_dec, plus ``threshold`` for JumpReLU and ``b_gate``/``r_mag``/``b_mag`` for Gated). An input
scale (``normalize_activations``) is folded into the weights, so the file needs no normalisation step; a
BatchTopK SAE is written as the JumpReLU SAE it is at inference. interplab's own config rides along under
``metadata.interplab`` so `load_sae` restores the exact class. `load_sae` also reads SAELens' own files
(v6 and the older ``activation_fn_str`` layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from interplab.io import atomic_write_json, load_tensors, read_json, save_tensors
from interplab.sae.base import SAE
from interplab.sae.config import Architecture, Normalization, SAEConfig
from interplab.sae.registry import create_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
_SAELENS_ARCH = {
    "standard": Architecture.RELU,
    "relu": Architecture.RELU,
    "topk": Architecture.TOPK,
    "batchtopk": Architecture.BATCHTOPK,
    "jumprelu": Architecture.JUMPRELU,
    "gated": Architecture.GATED,
    "transcoder": Architecture.RELU,
    "jumprelu_transcoder": Architecture.JUMPRELU,
}


class SAEFormatError(ValueError):
    """An SAE directory that cannot be read (unsupported architecture, missing or mis-shaped tensors)."""


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write ``sae`` to folder ``path`` in SAELens' layout (atomic per file). Returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    s = float(sae.act_scale)
    with torch.no_grad():
        tensors = {
            "W_enc": sae.W_enc * s,
            "b_enc": sae.b_enc.clone(),
            "W_dec": sae.W_dec / s,
            "b_dec": sae.b_dec / s,
        }
        arch = cfg.architecture
        if arch is Architecture.GATED:
            tensors["b_gate"] = tensors.pop("b_enc")
            tensors["r_mag"] = sae.r_mag.detach().clone()
            tensors["b_mag"] = sae.b_mag.detach().clone()
        if arch is Architecture.JUMPRELU:
            tensors["threshold"] = sae.threshold.detach().clone()
        if arch is Architecture.BATCHTOPK:
            tensors["threshold"] = sae.threshold.detach().expand(cfg.d_sae).to(cfg.dtype.torch).clone()
    lens_arch = {Architecture.RELU: "standard", Architecture.BATCHTOPK: "jumprelu"}.get(arch, arch.value)
    if cfg.is_transcoder and arch in (Architecture.RELU, Architecture.JUMPRELU):
        lens_arch = "transcoder" if arch is Architecture.RELU else "jumprelu_transcoder"
    ours = cfg.replace(normalize_activations=Normalization.NONE).to_dict()
    out: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype.value,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": lens_arch,
        "metadata": {
            "hook_name": cfg.hook_name or None,
            "model_name": cfg.model_name,
            "interplab": ours,
        },
    }
    if arch is Architecture.TOPK:
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    if cfg.is_transcoder:
        out["d_out"] = cfg.d_in
        out["metadata"]["hook_name_out"] = cfg.hook_name_out
    save_tensors(path / WEIGHTS_FILE, {k: v.contiguous() for k, v in tensors.items()})
    atomic_write_json(path / CFG_FILE, out)
    return path


def load_sae(path: str | Path, *, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by `save_sae` or by SAELens (``cfg.json`` + ``sae_weights.safetensors``)."""
    path = Path(path)
    if not (path / CFG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an SAE folder: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    raw = read_json(path / CFG_FILE)
    cfg = config_from_saelens(raw, source=str(path / CFG_FILE))
    weights = load_tensors(path / WEIGHTS_FILE, device=device)
    if "b_gate" in weights:
        weights["b_enc"] = weights.pop("b_gate")
    sae = create_sae(cfg).to(device)
    if cfg.architecture is Architecture.BATCHTOPK and "threshold" in weights:
        thr = weights.pop("threshold")
        weights["threshold"] = thr.reshape(-1)[0].float()
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items() if k != "act_scale"}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise SAEFormatError(
            f"{path / WEIGHTS_FILE}: tensors do not match a {cfg.architecture.value} SAE "
            f"(missing {missing}, unexpected {extra})"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise SAEFormatError(
                f"{path / WEIGHTS_FILE}: {name} has shape {tuple(weights[name].shape)}, expected {shape} "
                f"for d_in={cfg.d_in}, d_sae={cfg.d_sae}"
            )
    sae.load_state_dict({**weights, "act_scale": torch.ones(())}, strict=True)
    return sae


def config_from_saelens(raw: dict[str, Any], *, source: str = "cfg.json") -> SAEConfig:
    """An `SAEConfig` from a SAELens (or interplab) ``cfg.json`` dict; unsupported features raise SAEFormatError."""
    meta = raw.get("metadata") or {}
    if isinstance(meta.get("interplab"), dict):
        return SAEConfig.from_dict(meta["interplab"])
    arch_name = str(raw.get("architecture", "standard"))
    if arch_name == "standard" and raw.get("activation_fn_str") == "topk":  # SAELens < 6
        arch_name = "topk"
    if arch_name not in _SAELENS_ARCH:
        raise SAEFormatError(
            f"{source}: unsupported SAE architecture {arch_name!r}; interplab reads {sorted(_SAELENS_ARCH)}"
        )
    arch = _SAELENS_ARCH[arch_name]
    norm = raw.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise SAEFormatError(
            f"{source}: normalize_activations={norm!r} is not supported when loading (fold the scale into the "
            "weights first); valid: 'none'"
        )
    if raw.get("rescale_acts_by_decoder_norm"):
        raise SAEFormatError(f"{source}: rescale_acts_by_decoder_norm=True is not supported")
    if "d_out" in raw and raw["d_out"] != raw["d_in"]:
        raise SAEFormatError(
            f"{source}: transcoders with d_out={raw['d_out']} != d_in={raw['d_in']} are not supported"
        )
    k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
    hook = meta.get("hook_name") or raw.get("hook_name") or ""
    hook_out = meta.get("hook_name_out") or raw.get("hook_name_out")
    dtype = str(raw.get("dtype", "float32")).removeprefix("torch.")
    return SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        architecture=arch,
        hook_name=hook,
        hook_name_out=hook_out if arch_name.endswith("transcoder") or hook_out else None,
        k=int(k) if k is not None and arch in (Architecture.TOPK, Architecture.BATCHTOPK) else None,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        dtype=dtype,
        model_name=meta.get("model_name") or raw.get("model_name"),
    )
