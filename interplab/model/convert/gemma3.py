"""Gemma-3 text (``model_type`` "gemma3_text", and the text model of "gemma3", whose config nests it under
``text_config``): Gemma-2's layout (embeddings scaled by sqrt(d_model), RMSNorm computing x * (1 + w),
converted by adding 1 to the weights, norms before and after attention and MLP, GeGLU (tanh), tied
embeddings, scores scaled by ``query_pre_attn_scalar``, final logit soft-capping where set) with an RMSNorm over each
head's queries and keys before rotary (``attn.q_norm``, ``attn.k_norm``, also (1 + w)), local layers with a
sliding window and their own rotary base (``rope_local_base_freq``, 10k) between global ones (every
``sliding_window_pattern``-th layer, or as ``layer_types`` says; ``rope_theta``, 1M): ``rotary_bases``.

Rotary scaling of the global layers (the larger Gemma-3 models scale their positions linearly) is read into
``rope_scaling`` with ``rope_scaled_layers`` (the global layers); the local layers stay unscaled."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from interplab.model.config import ModelConfig, QKNorm
from interplab.model.convert import Converter, HFCheckpoint, gemma2, hf_rope_scaling, register
from interplab.model.rope import RopeScaling

_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def text_config(hf: dict) -> dict:
    """The text model's config: ``hf`` itself (gemma3_text) or its ``text_config`` (gemma3)."""
    if hf.get("model_type") != "gemma3":
        return hf
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(
            "a gemma3 config.json without a text_config: interplab loads Gemma-3's text model only"
        )
    text = dict(text)
    if "tie_word_embeddings" in hf:
        text.setdefault("tie_word_embeddings", hf["tie_word_embeddings"])
    text.setdefault("_name_or_path", hf.get("_name_or_path", ""))
    return text


def layer_types(hf: dict) -> list[str]:
    """``layer_types``, or the older ``sliding_window_pattern`` (every n-th layer global, default 6)."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        every = hf.get("sliding_window_pattern") or 6
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    unknown = sorted(set(types) - set(_DEFAULT_THETA))
    if unknown or len(types) != n:
        raise ValueError(
            f"Gemma-3 layer_types {types!r}: need {n} values, each one of {sorted(_DEFAULT_THETA)}"
        )
    return list(types)


def rope_thetas(hf: dict) -> tuple[dict[str, float], RopeScaling | None]:
    """The rotary base of each layer type, from transformers 5's per-type ``rope_parameters`` or the older
    ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``, and the scaling of the global layers (the
    larger Gemma-3 models scale their positions linearly; `hf_rope_scaling` reads it). A scaling of the local
    layers is refused: no released Gemma-3 has one."""
    params = hf.get("rope_parameters")
    per_type = {t: dict((params or {}).get(t) or {}) for t in _DEFAULT_THETA}
    if hf.get("rope_scaling"):  # older configs: the scaling applies to the global layers
        per_type["full_attention"].update(hf["rope_scaling"])
    thetas = {}
    scaling = None
    for t, rope in per_type.items():
        rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        rope.pop("type", None)
        if t == "sliding_attention" and rope["rope_type"] != "default":
            raise ValueError(
                f"Gemma-3 rope scaling {rope['rope_type']!r} on its sliding_attention layers is not supported by "
                "interplab (released Gemma-3 models scale only their full_attention layers)"
            )
        if t == "full_attention":
            scaling = hf_rope_scaling(hf, rope, "Gemma-3")
        legacy = hf.get("rope_theta") if t == "full_attention" else hf.get("rope_local_base_freq")
        thetas[t] = float(rope.get("rope_theta", legacy if legacy is not None else _DEFAULT_THETA[t]))
    return thetas, scaling


def config(hf: dict) -> ModelConfig:
    """Gemma-2's config (`gemma2.config`, given the layer types) with the q/k norms, the per-layer rotary
    bases and no attention soft-capping."""
    hf = text_config(hf)
    if hf.get("use_bidirectional_attention"):
        raise ValueError(
            "Gemma-3 with use_bidirectional_attention=True (EmbeddingGemma) is not supported; "
            "interplab loads the causal Gemma-3 text models"
        )
    if hf.get("attention_bias"):
        raise ValueError("Gemma-3 with attention_bias=True is not supported (the released models have none)")
    types = layer_types(hf)
    thetas, scaling = rope_thetas(hf)
    scaled_layers = tuple(i for i, t in enumerate(types) if t == "full_attention") if scaling else ()
    flat = {k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_scaling", "layer_types")}
    base = gemma2.config({**flat, "layer_types": types, "rope_theta": thetas["full_attention"]})
    return base.replace(
        qk_norm=QKNorm.HEAD,
        rotary_bases=tuple(thetas[t] for t in types),
        rope_scaling=scaling,
        rope_scaled_layers=scaled_layers,
        # Gemma-3 keeps Gemma-2's attn_logit_softcapping key, but transformers' Gemma-3 attention never applies
        # it (the released models set it to null): ignored here too, so the scores are the ones it computes
        attn_softcap=None,
        n_ctx=hf.get("max_position_embeddings", 131072),
        architecture="gemma3",
    )


def weights(ckpt: HFCheckpoint, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Gemma-2's weights and each layer's q/k norm weights (1 + w). The text model of a gemma3 checkpoint
    lives under ``model.language_model.`` (transformers 5) or ``language_model.model.`` (older), a gemma3_text
    one under ``model.``."""
    p = ckpt.find_prefix("model.language_model.", "language_model.model.", "model.", "")
    yield from gemma2.weights(ckpt, cfg, prefix=p)
    for layer in range(cfg.n_layers):
        for norm in ("q_norm", "k_norm"):
            w = ckpt.get(
                f"{p}layers.{layer}.self_attn.{norm}.weight"
            )  # Gemma's RMSNorm multiplies by (1 + w), computed in float32
            yield f"blocks.{layer}.attn.{norm}.w", w.float() + 1.0


register(Converter(("gemma3", "gemma3_text"), config, weights))
