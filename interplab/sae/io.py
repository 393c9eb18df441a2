"""Save and load SAEs in SAELens' directory layout: ``cfg.json`` + ``sae_weights.safetensors``.

`save_sae` writes what ``sae_lens.SAE.load_from_disk`` (sae_lens 6) reads, config and metadata included:

- tensors W_enc [d_in d_sae], b_enc, W_dec [d_sae d_in], b_dec, plus ``threshold`` for JumpReLU and
  ``b_gate``/``r_mag``/``b_mag`` for Gated. An input scale (``normalize_activations``) is folded into the
  weights, so the file needs no normalisation step; a BatchTopK SAE is written as the JumpReLU SAE it is at
  inference (as sae_lens' own ``save_inference_model`` does).
- ``cfg.json`` with sae_lens' keys in sae_lens' order and ``metadata`` holding ``sae_lens_version`` (sae_lens
  reads a file without it as the pre-6 layout and then drops the whole ``metadata`` block), ``model_name``,
  ``hook_name``, ``hook_head_index`` and, for transcoders, ``hook_name_out``; a hook_z SAE is marked
  ``reshape_activations="hook_z"``, so sae_lens takes [..., n_heads, d_head] input. interplab's own config
  rides along under ``metadata.interplab`` so `load_sae` restores the exact class.

`load_sae` also reads sae_lens' own folders (v6 and the older pre-6 layout), inference files and training
checkpoints alike, with sae_lens' semantics: see `config_from_saelens` and `weights_from_saelens`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from interplab.integrity import forget_checksums, record_checksums, verify_checksums
from interplab.io import atomic_write_json, load_tensors, read_json, save_tensors
from interplab.runs import SAE_CFG, SAE_WEIGHTS, describe, pick_sae, sae_folders
from interplab.sae.base import SAE
from interplab.sae.config import Architecture, Normalization, SAEConfig
from interplab.sae.registry import create_sae

CFG_FILE = SAE_CFG
WEIGHTS_FILE = SAE_WEIGHTS
#: the sae_lens release whose layout `save_sae` writes (and the tests check against); sae_lens reads the
#: metadata block only from files whose ``sae_lens_version`` is 6 or later
SAELENS_LAYOUT_VERSION = "6.54.12"
_SAELENS_ARCH = {
    "standard": Architecture.RELU,
    "relu": Architecture.RELU,
    "topk": Architecture.TOPK,
    "batchtopk": Architecture.BATCHTOPK,  # a sae_lens training checkpoint (topk_threshold)
    "matryoshka_batchtopk": Architecture.MATRYOSHKA,  # likewise (plus its matryoshka_widths)
    "jumprelu": Architecture.JUMPRELU,
    "gated": Architecture.GATED,
    "transcoder": Architecture.RELU,
    "jumprelu_transcoder": Architecture.JUMPRELU,
}
_TRANSCODER_ARCH = {Architecture.RELU: "transcoder", Architecture.JUMPRELU: "jumprelu_transcoder"}
_INFERENCE_ARCH = {
    Architecture.BATCHTOPK: Architecture.JUMPRELU,
    Architecture.MATRYOSHKA: Architecture.JUMPRELU,
}  # how an architecture is written
#: architectures that encode with one threshold at inference (saved as JumpReLU), and all with a threshold
_ONE_THRESHOLD = (Architecture.BATCHTOPK, Architecture.MATRYOSHKA)
_THRESHOLDED = (Architecture.JUMPRELU, *_ONE_THRESHOLD)
#: metadata keys that interplab's config owns (everything else in a file's metadata is kept verbatim)
_OWNED_METADATA = (
    "sae_lens_version",
    "model_name",
    "hook_name",
    "hook_head_index",
    "hook_name_out",
    "interplab",
)
#: sae_lens normalisations interplab reads; the others (layer_norm, constant_norm_rescale, whitening) run
#: per token inside sae_lens' forward and have no interplab equivalent
_NORMALIZATIONS = ("none", "expected_average_only_in")
#: JumpReLU training settings of a sae_lens checkpoint that interplab's config has too
_JUMPRELU_TRAINING = ("jumprelu_bandwidth", "jumprelu_init_threshold")
#: the pre-6 layout's top-level metadata keys that interplab keeps (sae_lens' LLM_METADATA_KEYS, less the owned)
_PRE6_METADATA = (
    "sae_lens_training_version",
    "model_class_name",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
)


class SAEFormatError(ValueError):
    """An SAE directory that cannot be read (unsupported architecture, missing or mis-shaped tensors)."""


# ---- writing ------------------------------------------------------------------------------------------
def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write ``sae`` to folder ``path`` in SAELens' layout (atomic per file). Returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    forget_checksums(path)
    save_tensors(path / WEIGHTS_FILE, saelens_tensors(sae))
    atomic_write_json(path / CFG_FILE, saelens_config(sae.cfg))
    record_checksums(path, [WEIGHTS_FILE, CFG_FILE])  # SAELens ignores the extra file
    return path


def saelens_architecture(cfg: SAEConfig) -> str:
    """The sae_lens ``architecture`` string `save_sae` writes for ``cfg``."""
    arch = _INFERENCE_ARCH.get(cfg.architecture, cfg.architecture)
    if cfg.is_transcoder and arch in _TRANSCODER_ARCH:
        return _TRANSCODER_ARCH[arch]
    return arch.value  # TopK and Gated transcoders: the plain SAE class with apply_b_dec_to_input=False


@torch.no_grad()
def saelens_tensors(sae: SAE) -> dict[str, Tensor]:
    """The inference tensors under sae_lens' names, with the input scale folded in. Thresholds are read
    through the SAE's public ``threshold``."""
    cfg = sae.cfg
    s = float(sae.act_scale)
    tensors = {
        "W_enc": sae.W_enc.detach() * s,
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": sae.W_dec.detach() / s,
        "b_dec": sae.b_dec.detach() / s,
    }
    if cfg.architecture is Architecture.GATED:
        tensors["b_gate"] = tensors.pop("b_enc")
        tensors["r_mag"] = sae.get_parameter("r_mag").detach().clone()
        tensors["b_mag"] = sae.get_parameter("b_mag").detach().clone()
    if cfg.architecture in _THRESHOLDED:
        thr = cast(Tensor, sae.threshold).detach().to(cfg.dtype.torch)
        tensors["threshold"] = thr.expand(cfg.d_sae).clone()  # BatchTopK's one threshold, per latent
    return {k: v.contiguous() for k, v in tensors.items()}


def saelens_config(cfg: SAEConfig) -> dict[str, Any]:
    """``cfg.json`` as sae_lens 6 writes it (``SAEConfig.to_dict``: its fields in order, then the
    architecture), with interplab's config under ``metadata.interplab``."""
    arch = saelens_architecture(cfg)
    extra = dict(cfg.extra_metadata or {})
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
        "sae_lens_training_version": extra.pop("sae_lens_training_version", None),  # None: not sae_lens'
        **extra,
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name or None,
        "hook_head_index": None,
    }
    if cfg.is_transcoder:
        metadata["hook_name_out"] = cfg.hook_name_out
    ours = cfg.replace(normalize_activations=Normalization.NONE, extra_metadata=None).to_dict()
    del ours["extra_metadata"]
    metadata["interplab"] = ours
    out: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype.value,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",  # the scale is folded into the weights
        "reshape_activations": cfg.reshape_activations.value,
        "metadata": metadata,
    }
    if arch == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    if arch in _TRANSCODER_ARCH.values():
        out["d_out"] = cfg.d_in
    out["architecture"] = arch
    return out


# ---- reading ------------------------------------------------------------------------------------------
def load_sae(path: str | Path, *, name: str | None = None, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by `save_sae` or by SAELens (``cfg.json`` + ``sae_weights.safetensors``).

    ``path`` may also be a folder holding SAEs: an SAE training run (``interplab sae train --out RUN``: its
    ``saes/NAME/``) or a folder with such a run in it (e.g. a training run with its ``sae/``). The SAE loaded is
    the only one there, or the one called ``name`` (`interplab.sae.sae_name`, e.g.
    ``blocks_0_hook_resid_post``); with several and no ``name`` the error lists their names
    (`interplab.runs.pick_sae`). Which folder was read is ``interplab.runs.pick_sae(path, name)``."""
    path = Path(path)
    if not (path / CFG_FILE).is_file() and (name is not None or sae_folders(path)):
        path = pick_sae(path, name)
    if not (path / CFG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not an SAE folder: it needs {CFG_FILE} and {WEIGHTS_FILE}{_what_else(path)}"
        )
    verify_checksums(path)  # folders written by interplab: a changed byte is named, never loaded
    raw = read_json(path / CFG_FILE)
    cfg = config_from_saelens(raw, source=str(path / CFG_FILE))
    weights = weights_from_saelens(raw, cfg, load_tensors(path / WEIGHTS_FILE, device=device))
    sae = create_sae(cfg).to(device)
    load_weights(sae, weights, source=str(path / WEIGHTS_FILE))
    return sae


_OTHER_LOADERS = {
    "crosscoder": "interplab.sae.crosscoder.load_crosscoder",
    "clt": "interplab.sae.clt.load_clt",
}
"""the loaders of the other dictionaries whose folders hold a ``cfg.json`` with a top-level ``kind``"""


def _what_else(path: Path) -> str:
    """What a folder that is not an SAE is, for the error: another dictionary's folder with the loader to use
    (its ``cfg.json`` says ``kind: crosscoder`` or ``clt``), else `interplab.runs.describe`'s phrase."""
    try:
        kind = read_json(path / CFG_FILE).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind in _OTHER_LOADERS:
        return (
            f" (its {CFG_FILE} says kind {kind!r}: load it with {_OTHER_LOADERS[kind]}, or with "
            "interplab.sae.load_dictionary, which loads an SAE, a crosscoder or a CLT by what the folder is)"
        )
    return f" (it is {describe(path)})" if path.exists() else " (no such folder)"


def config_from_saelens(raw: dict[str, Any], *, source: str = "cfg.json") -> SAEConfig:
    """An `SAEConfig` from a SAELens (or interplab) ``cfg.json`` dict; unsupported features raise SAEFormatError.

    The layout is chosen as sae_lens does: ``metadata.sae_lens_version`` (or a top-level one) >= 6 means the
    v6 layout (hook names in ``metadata``), anything else the pre-6 layout (hook names at the top level,
    ``hook_point``, ``activation_fn_str``, boolean ``normalize_activations``). ``expected_average_only_in``
    is read as sae_lens' ``load_from_disk`` reads it: the folder's weights are applied to the input as it
    comes (sae_lens keeps the training scale outside the SAE and folds it in when training ends), so the
    loaded SAE has ``act_scale`` 1."""
    meta: dict[str, Any] = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}
    v6 = _is_v6(raw, meta)
    if v6:
        flat = meta
        extra = {k: v for k, v in meta.items() if k not in _OWNED_METADATA}
        if extra.get("sae_lens_training_version", "") is None:  # what save_sae writes for "not sae_lens'"
            del extra["sae_lens_training_version"]
    else:  # pre-6: the metadata keys sit at the top level (sae_lens moves them into metadata on load)
        flat = {**raw, "hook_name": raw.get("hook_name", raw.get("hook_point"))}
        extra = {k: raw[k] for k in _PRE6_METADATA if k in raw}
    try:
        if isinstance(meta.get("interplab"), dict):
            ours = SAEConfig.from_dict(meta["interplab"])
            return ours.replace(extra_metadata=extra or None)
        return _saelens_config(raw, flat, extra, v6=v6, source=source)
    except ValueError as e:
        if isinstance(e, SAEFormatError):
            raise
        raise SAEFormatError(f"{source}: {e}") from e


def _is_v6(raw: dict[str, Any], meta: dict[str, Any]) -> bool:
    version = str(raw.get("sae_lens_version") or meta.get("sae_lens_version") or "")
    major = version.split(".")[0]
    return major.isdigit() and int(major) >= 6


def _saelens_config(
    raw: dict[str, Any], meta: dict[str, Any], extra: dict[str, Any], *, v6: bool, source: str
) -> SAEConfig:
    arch_name = str(raw.get("architecture", "standard"))
    activation = raw.get("activation_fn_str", raw.get("activation_fn"))
    if arch_name == "standard" and activation == "topk":  # the pre-6 layout
        arch_name = "topk"
    if arch_name not in _SAELENS_ARCH:
        raise SAEFormatError(
            f"{source}: unsupported SAE architecture {arch_name!r}; interplab reads {sorted(_SAELENS_ARCH)}"
        )
    arch = _SAELENS_ARCH[arch_name]
    norm = raw.get("normalize_activations") or "none"
    if norm is True:  # pre-6 boolean
        norm = "expected_average_only_in"
    if norm not in _NORMALIZATIONS:
        raise SAEFormatError(
            f"{source}: normalize_activations={norm!r} is not supported; valid: {_NORMALIZATIONS}"
        )
    if "d_out" in raw and raw["d_out"] != raw["d_in"]:
        raise SAEFormatError(
            f"{source}: transcoders with d_out={raw['d_out']} != d_in={raw['d_in']} are not supported"
        )
    if meta.get("hook_head_index") is not None:
        raise SAEFormatError(
            f"{source}: hook_head_index={meta['hook_head_index']} (an SAE on one head) is not supported"
        )
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    if arch in (Architecture.TOPK, *_ONE_THRESHOLD):
        if k is None or float(k) != int(k):
            raise SAEFormatError(f"{source}: {arch_name} needs a whole number k, got k={k!r}")
        k = int(k)
    else:
        k = None
    hook = meta.get("hook_name") or ""
    # sae_lens 6 reads a missing reshape_activations as "none"; the pre-6 layout implies it from the hook
    reshape = raw.get("reshape_activations") or ("hook_z" if not v6 and "hook_z" in hook else "none")
    hook_out = meta.get("hook_name_out")
    return SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        architecture=arch,
        hook_name=hook,
        hook_name_out=hook_out if arch_name.endswith("transcoder") or hook_out else None,
        k=k,
        matryoshka_widths=tuple(raw["matryoshka_widths"]) if arch is Architecture.MATRYOSHKA else None,
        normalize_activations=norm,  # type: ignore[arg-type]  # strings: SAEConfig parses them
        reshape_activations=reshape,  # type: ignore[arg-type]
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        dtype=str(raw.get("dtype", "float32")).removeprefix("torch."),  # type: ignore[arg-type]
        model_name=meta.get("model_name"),
        extra_metadata=extra or None,
        **{  # type: ignore[arg-type]
            key: float(raw[key]) for key in _JUMPRELU_TRAINING if arch is Architecture.JUMPRELU and key in raw
        },
    )


@torch.no_grad()
def weights_from_saelens(
    raw: dict[str, Any], cfg: SAEConfig, weights: dict[str, Tensor]
) -> dict[str, Tensor]:
    """sae_lens' tensors turned into interplab's (same names; ``threshold`` as the SAE's threshold), doing
    what sae_lens does on load and when it saves a training checkpoint for inference:

    - ``b_gate`` is Gated's ``b_enc``; an all-ones legacy ``scaling_factor`` is dropped;
    - ``log_threshold`` (older JumpReLU checkpoints) becomes ``threshold = exp(log_threshold)``;
    - ``topk_threshold`` (BatchTopK training checkpoints) is the threshold BatchTopK encodes with at inference;
    - ``rescale_acts_by_decoder_norm`` (TopK/BatchTopK: pre-activations and activations measured against unit
      decoder rows) is folded into the weights: W_enc and b_enc times the decoder row norms, W_dec divided."""
    w = dict(weights)
    if "b_gate" in w:
        w["b_enc"] = w.pop("b_gate")
    if "scaling_factor" in w:
        if not torch.all(w["scaling_factor"] == 1):
            raise SAEFormatError("a finetuning scaling_factor other than 1 is not supported")
        del w["scaling_factor"]
    if "log_threshold" in w:
        w["threshold"] = w.pop("log_threshold").exp()
    if "topk_threshold" in w:
        w["threshold"] = w.pop("topk_threshold")
    if raw.get("rescale_acts_by_decoder_norm") and cfg.architecture in (Architecture.TOPK, *_ONE_THRESHOLD):
        norms = w["W_dec"].norm(dim=-1).clamp_min(1e-8)  # sae_lens' get_W_dec_norm
        w["W_enc"] = w["W_enc"] * norms
        w["b_enc"] = w["b_enc"] * norms
        w["W_dec"] = w["W_dec"] / norms[:, None]
    return w


def load_weights(sae: SAE, weights: dict[str, Tensor], *, source: str = WEIGHTS_FILE) -> None:
    """Load tensors named as in `saelens_tensors` into ``sae`` (shapes checked; the threshold is set through
    the SAE's public ``threshold``); ``act_scale`` is set to 1 (scales are folded into the file's weights)."""
    weights = dict(weights)
    threshold = weights.pop("threshold", None)
    needs_threshold = sae.cfg.architecture in _THRESHOLDED
    state = sae.state_dict()
    expected = {
        k: tuple(v.shape)
        for k, v in state.items()
        if k != "act_scale" and not (needs_threshold and "threshold" in k)
    }
    missing = sorted(set(expected) - set(weights)) + (
        ["threshold"] if needs_threshold and threshold is None else []
    )
    extra = sorted(set(weights) - set(expected)) + (
        ["threshold"] if threshold is not None and not needs_threshold else []
    )
    if missing or extra:
        raise SAEFormatError(
            f"{source}: tensors do not match a {sae.cfg.architecture.value} SAE (missing {missing}, unexpected {extra})"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise SAEFormatError(
                f"{source}: {name} has shape {tuple(weights[name].shape)}, expected {shape} "
                f"for d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}"
            )
    unset = sae.load_state_dict({**weights, "act_scale": torch.ones(())}, strict=False).missing_keys
    if threshold is not None:
        _set_threshold(sae, threshold, source)
        unset = [k for k in unset if "threshold" not in k]
    if unset:  # pragma: no cover - guarded by the checks above
        raise SAEFormatError(f"{source}: no tensor for {unset}")


@torch.no_grad()
def _set_threshold(sae: SAE, value: Tensor, source: str) -> None:
    """Set the SAE's threshold (a per-latent vector for JumpReLU, one value for BatchTopK) and check that
    the public ``threshold`` reads it back."""
    value = value.float()
    if sae.cfg.architecture in _ONE_THRESHOLD:
        flat = value.reshape(-1)
        if flat.numel() == 0 or not bool((flat == flat[0]).all()):
            raise SAEFormatError(
                f"{source}: a BatchTopK SAE has one threshold; the file's vary across latents"
            )
        value = flat[0]
    elif tuple(value.shape) != (sae.cfg.d_sae,):
        raise SAEFormatError(
            f"{source}: threshold has shape {tuple(value.shape)}, expected ({sae.cfg.d_sae},) for d_sae={sae.cfg.d_sae}"
        )
    tensors = dict(sae.named_parameters()) | dict(sae.named_buffers())
    if "threshold" in tensors:
        tensors["threshold"].copy_(value.to(tensors["threshold"].dtype))
    elif "log_threshold" in tensors:
        tensors["log_threshold"].copy_(value.log().to(tensors["log_threshold"].dtype))
    else:  # pragma: no cover - an architecture that keeps its threshold some other way
        raise SAEFormatError(f"{source}: do not know how to set the threshold of {type(sae).__name__}")
    back = cast(Tensor, sae.threshold).detach().float()
    if not torch.allclose(back, value.to(back.device), rtol=1e-6, atol=0):
        raise SAEFormatError(
            f"{source}: the SAE's threshold did not take the file's value"
        )  # pragma: no cover
