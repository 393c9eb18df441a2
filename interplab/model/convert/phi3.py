"""Phi-3 (``model_type = "phi3"``): Llama's block (RMSNorm, SwiGLU, rotary NeoX halves, grouped-query attention)
with fused projections: ``qkv_proj`` holds the query, key and value rows one after the other and
``gate_up_proj`` the gate rows then the up rows; optional partial rotary (``partial_rotary_factor``), LongRoPE
scaling (``longrope``, and its older names ``su`` and ``yarn`` as transformers reads them for Phi-3) and a
sliding window on every layer."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from interplab.model.config import ModelConfig, Norm, Positional, RotaryStyle
from interplab.model.convert import (
    Converter,
    HFCheckpoint,
    hf_activation,
    hf_rope,
    hf_rope_scaling,
    linear_in,
    register,
    scaled_context,
    split_heads_in,
    split_heads_out,
)

_LABEL = "Phi-3"


def config(hf: dict) -> ModelConfig:
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    d_head = hf.get("head_dim") or d // h
    rope = hf_rope(hf)
    if rope["rope_type"] in (
        "su",
        "yarn",
    ):  # what transformers' Phi3Config renames (Phi-3's yarn *is* longrope)
        rope["rope_type"] = "longrope"
    scaling = hf_rope_scaling(hf, rope, _LABEL)
    partial = rope.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    return ModelConfig(
        d_model=d,
        n_layers=n,
        n_heads=h,
        d_head=d_head,
        n_kv_heads=hf.get("num_key_value_heads") or h,
        d_vocab=hf["vocab_size"],
        n_ctx=scaled_context(hf, scaling),
        d_mlp=hf["intermediate_size"],
        act_fn=hf_activation(hf.get("hidden_act", "silu"), _LABEL),
        gated_mlp=True,
        normalization=Norm.RMSNORM,
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        positional=Positional.ROTARY,
        rotary_style=RotaryStyle.NEOX,
        rotary_dim=int(d_head * partial),
        rotary_base=float(rope["rope_theta"]),
        rope_scaling=scaling,
        attn_bias=False,
        mlp_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window,
        sliding_layers=tuple(range(n)) if window else (),
        name=hf.get("_name_or_path", ""),
        architecture="phi3",
    )


def weights(ckpt: HFCheckpoint, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    p = ckpt.find_prefix("model.", "")
    h, kv, dh, m = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp
    w_e = ckpt.get(p + "embed_tokens.weight")
    yield "embed.W_E", w_e
    for layer in range(cfg.n_layers):
        b, o = f"{p}layers.{layer}.", f"blocks.{layer}."
        yield o + "ln1.w", ckpt.get(b + "input_layernorm.weight")
        q, k, v = ckpt.get(b + "self_attn.qkv_proj.weight").split([h * dh, kv * dh, kv * dh], dim=0)
        for name, w, heads in (("Q", q, h), ("K", k, kv), ("V", v, kv)):
            yield o + f"attn.W_{name}", split_heads_in(w, heads)
            yield o + f"attn.b_{name}", torch.zeros(heads, dh, dtype=w_e.dtype)
        yield o + "attn.W_O", split_heads_out(ckpt.get(b + "self_attn.o_proj.weight"), h)
        yield o + "attn.b_O", torch.zeros(cfg.d_model, dtype=w_e.dtype)
        yield o + "ln2.w", ckpt.get(b + "post_attention_layernorm.weight")
        gate, up = ckpt.get(b + "mlp.gate_up_proj.weight").split([m, m], dim=0)
        yield o + "mlp.W_gate", gate.T.contiguous()
        yield o + "mlp.W_in", up.T.contiguous()
        yield o + "mlp.b_in", torch.zeros(m, dtype=w_e.dtype)
        yield o + "mlp.W_out", linear_in(ckpt, b + "mlp.down_proj.weight")
        yield o + "mlp.b_out", torch.zeros(cfg.d_model, dtype=w_e.dtype)
    yield "ln_final.w", ckpt.get(p + "norm.weight")
    if not cfg.tie_embeddings:
        yield "unembed.W_U", linear_in(ckpt, "lm_head.weight")
    yield "unembed.b_U", torch.zeros(cfg.d_vocab_out, dtype=w_e.dtype)


register(Converter(("phi3",), config, weights))
