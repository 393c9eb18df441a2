"""Qwen3 (``model_type = "qwen3"``): Llama's layout (rotary NeoX halves, RMSNorm, SwiGLU, grouped-query
attention, ``head_dim`` free of d_model / n_heads) with an RMSNorm over each head's queries and keys before
rotary (``attn.q_norm``, ``attn.k_norm``), no q/k/v bias unless ``attention_bias``, and a sliding window on
the layers ``layer_types`` (or ``use_sliding_window`` with ``max_window_layers``) marks."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from interplab.model.config import ModelConfig, Norm, Positional, QKNorm, RotaryStyle
from interplab.model.convert import (
    Converter,
    HFCheckpoint,
    hf_activation,
    hf_rope,
    hf_rope_scaling,
    llama,
    register,
    scaled_context,
)


def config(hf: dict) -> ModelConfig:
    if hf.get("mlp_bias"):
        raise ValueError("Qwen3 with mlp_bias=True is not supported by interplab (Qwen3's MLP has no biases)")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    d_head = hf.get("head_dim") or d // h
    rope = hf_rope(hf)
    scaling = hf_rope_scaling(hf, rope, "Qwen3")
    window, layers = llama.sliding_window(hf, "qwen2")  # derived from the same keys as Qwen2's
    return ModelConfig(
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=h,
        d_head=d_head,
        n_kv_heads=hf.get("num_key_value_heads") or h,
        d_vocab=hf["vocab_size"],
        n_ctx=max(scaled_context(hf, scaling), hf.get("max_position_embeddings", 32768)),
        d_mlp=hf["intermediate_size"],
        act_fn=hf_activation(hf.get("hidden_act", "silu"), "Qwen3"),
        gated_mlp=True,
        normalization=Norm.RMSNORM,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qk_norm=QKNorm.HEAD,
        positional=Positional.ROTARY,
        rotary_style=RotaryStyle.NEOX,
        rotary_dim=int(d_head * rope.get("partial_rotary_factor", 1.0)),
        rotary_base=float(rope["rope_theta"]),
        rope_scaling=scaling,
        attn_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window,
        sliding_layers=layers,
        name=hf.get("_name_or_path", ""),
        architecture="qwen3",
    )


def weights(ckpt: HFCheckpoint, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Llama's weights, and each layer's q/k norm weights [d_head]."""
    yield from llama.weights(ckpt, cfg)
    p = ckpt.find_prefix("model.", "")
    for layer in range(cfg.n_layers):
        for norm in ("q_norm", "k_norm"):
            yield f"blocks.{layer}.attn.{norm}.w", ckpt.get(f"{p}layers.{layer}.self_attn.{norm}.weight")


register(Converter(("qwen3",), config, weights))
