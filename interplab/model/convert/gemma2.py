"""Gemma-2 (``model_type = "gemma2"``): embeddings scaled by sqrt(d_model), RMSNorm computing x * (1 + w)
(converted by adding 1 to the weights), norms after attention and MLP as well as before, attention and
logit soft-capping, scores scaled by ``query_pre_attn_scalar``, a sliding window on alternate layers,
GeGLU (tanh) MLP, tied embeddings. The released Gemma-2 models are unscaled, but transformers applies a
``rope_scaling`` of any ``rope_type`` to every layer (local and global alike), and so does interplab."""

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


def config(hf: dict) -> ModelConfig:
    hf = {"max_position_embeddings": 8192, **hf}  # transformers' default
    d, h, n = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    if hf.get("use_bidirectional_attention"):
        raise ValueError("Gemma-2 with use_bidirectional_attention=True is not supported")
    if hf.get("attention_bias"):
        raise ValueError("Gemma-2 with attention_bias=True is not supported")
    d_head = hf.get("head_dim") or d // h
    rope = hf_rope(hf)
    scaling = hf_rope_scaling(hf, rope, "Gemma-2")
    types = hf.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)
    ]
    window = hf.get("sliding_window")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention") if window else ()
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    return ModelConfig(
        d_model=d,
        n_layers=n,
        n_heads=h,
        d_head=d_head,
        n_kv_heads=hf.get("num_key_value_heads") or h,
        d_vocab=hf["vocab_size"],
        n_ctx=scaled_context(hf, scaling),
        d_mlp=hf["intermediate_size"],
        act_fn=hf_activation(act, "Gemma-2"),
        gated_mlp=True,
        normalization=Norm.RMSNORM,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        post_norms=True,
        norm_weight_float32=True,
        positional=Positional.ROTARY,
        rotary_style=RotaryStyle.NEOX,
        rotary_base=float(rope["rope_theta"]),
        rope_scaling=scaling,
        attn_bias=False,
        mlp_bias=False,
        attn_scale=float(hf.get("query_pre_attn_scalar", d_head)) ** 0.5,
        attn_softcap=hf.get("attn_logit_softcapping"),
        logit_softcap=hf.get("final_logit_softcapping"),
        embed_scale=float(d) ** 0.5,
        sliding_window=window if sliding else None,
        sliding_layers=sliding,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        name=hf.get("_name_or_path", ""),
        architecture="gemma2",
    )


def weights(
    ckpt: HFCheckpoint, cfg: ModelConfig, prefix: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights under ``prefix`` (default: ``model.`` or none); Gemma-3 adds its q/k norms to them."""
    p = ckpt.find_prefix("model.", "") if prefix is None else prefix
    h, kv = cfg.n_heads, cfg.n_kv_heads
    w_e = ckpt.get(p + "embed_tokens.weight")
    yield "embed.W_E", w_e

    def norm(key: str) -> torch.Tensor:  # Gemma's RMSNorm multiplies by (1 + w), computed in float32
        return ckpt.get(key).float() + 1.0

    for layer in range(cfg.n_layers):
        b, o = f"{p}layers.{layer}.", f"blocks.{layer}."
        yield o + "ln1.w", norm(b + "input_layernorm.weight")
        yield o + "ln1_post.w", norm(b + "post_attention_layernorm.weight")
        yield o + "ln2.w", norm(b + "pre_feedforward_layernorm.weight")
        yield o + "ln2_post.w", norm(b + "post_feedforward_layernorm.weight")
        for name, proj, n in (("Q", "q_proj", h), ("K", "k_proj", kv), ("V", "v_proj", kv)):
            yield o + f"attn.W_{name}", split_heads_in(ckpt.get(f"{b}self_attn.{proj}.weight"), n)
            yield o + f"attn.b_{name}", torch.zeros(n, cfg.d_head, dtype=w_e.dtype)
        yield o + "attn.W_O", split_heads_out(ckpt.get(b + "self_attn.o_proj.weight"), h)
        yield o + "attn.b_O", torch.zeros(cfg.d_model, dtype=w_e.dtype)
        yield o + "mlp.W_gate", linear_in(ckpt, b + "mlp.gate_proj.weight")
        yield o + "mlp.W_in", linear_in(ckpt, b + "mlp.up_proj.weight")
        yield o + "mlp.b_in", torch.zeros(cfg.d_mlp, dtype=w_e.dtype)
        yield o + "mlp.W_out", linear_in(ckpt, b + "mlp.down_proj.weight")
        yield o + "mlp.b_out", torch.zeros(cfg.d_model, dtype=w_e.dtype)
    yield "ln_final.w", norm(p + "norm.weight")
    if not cfg.tie_embeddings:
        yield "unembed.W_U", linear_in(ckpt, "lm_head.weight")
    yield "unembed.b_U", torch.zeros(cfg.d_vocab_out, dtype=w_e.dtype)


register(Converter(("gemma2",), config, weights))
