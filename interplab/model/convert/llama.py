"""Llama, Mistral and Qwen2 (``model_type`` llama / mistral / qwen2): rotary (NeoX halves, with any rope
scaling of `interplab.model.rope`), RMSNorm, SwiGLU MLP, grouped-query attention, optional tied embeddings;
Qwen2 has q/k/v biases, Llama optional biases on q/k/v/o (``attention_bias``) and on gate/up/down
(``mlp_bias``); Mistral and Qwen2 may use a sliding attention window."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from interplab.model.config import ModelConfig, Norm, Positional, RotaryStyle
from interplab.model.convert import (
    Converter,
    HFCheckpoint,
    bias_or_zeros,
    hf_activation,
    hf_rope,
    hf_rope_scaling,
    linear_in,
    register,
    scaled_context,
    split_heads_in,
    split_heads_out,
)

_FAMILY = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def sliding_window(hf: dict, family: str) -> tuple[int | None, tuple[int, ...]]:
    """(window, layers that use it) from ``layer_types`` or the older per-family flags."""
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if family == "qwen2" and not hf.get("use_sliding_window", False):
        return None, ()
    if window is None:
        return None, ()
    types = hf.get("layer_types")
    if types is not None:
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif family == "qwen2":
        layers = tuple(range(hf.get("max_window_layers", 28), n))
    else:  # mistral: every layer
        layers = tuple(range(n))
    return (window, layers) if layers else (None, ())


def config(hf: dict) -> ModelConfig:
    family = hf["model_type"]
    label = _FAMILY[family]
    # pretraining_tp (Llama-2's sliced matmuls) changes no result: transformers 5 ignores it too
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    d_head = hf.get("head_dim") or d // h
    rope = hf_rope(hf)
    scaling = hf_rope_scaling(hf, rope, label)
    mlp_bias = bool(hf.get("mlp_bias", False))
    window, sliding = sliding_window(hf, family)
    return ModelConfig(
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=h,
        d_head=d_head,
        n_kv_heads=hf.get("num_key_value_heads") or h,
        d_vocab=hf["vocab_size"],
        n_ctx=scaled_context(hf, scaling),
        d_mlp=hf["intermediate_size"],
        act_fn=hf_activation(hf.get("hidden_act", "silu"), label),
        gated_mlp=True,
        normalization=Norm.RMSNORM,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        positional=Positional.ROTARY,
        rotary_style=RotaryStyle.NEOX,
        rotary_dim=int(d_head * rope.get("partial_rotary_factor", 1.0)),
        rotary_base=float(rope["rope_theta"]),
        rope_scaling=scaling,
        attn_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        mlp_bias=mlp_bias,
        gate_bias=mlp_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window,
        sliding_layers=sliding,
        name=hf.get("_name_or_path", ""),
        architecture=family,
    )


def weights(ckpt: HFCheckpoint, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    p = ckpt.find_prefix("model.", "")
    h, kv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    w_e = ckpt.get(p + "embed_tokens.weight")
    yield "embed.W_E", w_e
    for layer in range(cfg.n_layers):
        b, o = f"{p}layers.{layer}.", f"blocks.{layer}."
        yield o + "ln1.w", ckpt.get(b + "input_layernorm.weight")
        for name, proj, n in (("Q", "q_proj", h), ("K", "k_proj", kv), ("V", "v_proj", kv)):
            w = ckpt.get(f"{b}self_attn.{proj}.weight")
            yield o + f"attn.W_{name}", split_heads_in(w, n)
            yield o + f"attn.b_{name}", bias_or_zeros(ckpt, f"{b}self_attn.{proj}.bias", (n, dh), w)
        w_o = ckpt.get(b + "self_attn.o_proj.weight")
        yield o + "attn.W_O", split_heads_out(w_o, h)
        yield o + "attn.b_O", bias_or_zeros(ckpt, b + "self_attn.o_proj.bias", (cfg.d_model,), w_o)
        yield o + "ln2.w", ckpt.get(b + "post_attention_layernorm.weight")
        m = cfg.d_mlp
        yield o + "mlp.W_gate", linear_in(ckpt, b + "mlp.gate_proj.weight")
        if cfg.gate_bias:
            yield o + "mlp.b_gate", ckpt.get(b + "mlp.gate_proj.bias")
        yield o + "mlp.W_in", linear_in(ckpt, b + "mlp.up_proj.weight")
        yield o + "mlp.b_in", bias_or_zeros(ckpt, b + "mlp.up_proj.bias", (m,), w_e)
        yield o + "mlp.W_out", linear_in(ckpt, b + "mlp.down_proj.weight")
        yield o + "mlp.b_out", bias_or_zeros(ckpt, b + "mlp.down_proj.bias", (cfg.d_model,), w_e)
    yield "ln_final.w", ckpt.get(p + "norm.weight")
    if not cfg.tie_embeddings:
        yield "unembed.W_U", linear_in(ckpt, "lm_head.weight")
    yield "unembed.b_U", torch.zeros(cfg.d_vocab_out, dtype=w_e.dtype)


register(Converter(("llama", "mistral", "qwen2"), config, weights))
