"""OLMo-2 (``model_type = "olmo2"``): no norms before attention and MLP; an RMSNorm on each sublayer's output
before it joins the residual stream (``ln1_post``, ``ln2_post``: ``pre_norms=False``, ``post_norms=True``);
RMSNorm of the queries and keys over all heads at once, before they are split into heads and rotated
(``qk_norm="full"``: weights [n_heads d_head] and [n_kv_heads d_head]); rotary (NeoX halves), SwiGLU, untied
unembedding by default."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from interplab.model.config import ModelConfig, Norm, Positional, QKNorm, RotaryStyle
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


def config(hf: dict) -> ModelConfig:
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    d_head = hf.get("head_dim") or d // h
    rope = hf_rope(hf)
    scaling = hf_rope_scaling(hf, rope, "OLMo-2")
    return ModelConfig(
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=h,
        d_head=d_head,
        n_kv_heads=hf.get("num_key_value_heads") or h,
        d_vocab=hf["vocab_size"],
        n_ctx=max(scaled_context(hf, scaling), hf.get("max_position_embeddings", 2048)),
        d_mlp=hf["intermediate_size"],
        act_fn=hf_activation(hf.get("hidden_act", "silu"), "OLMo-2"),
        gated_mlp=True,
        normalization=Norm.RMSNORM,
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        pre_norms=False,
        post_norms=True,
        norm_weight_float32=True,  # (w * x).to(dtype), as transformers' Olmo2RMSNorm
        rotary_float32=True,  # transformers' OLMo-2 keeps cos and sin in float32
        qk_norm=QKNorm.FULL,
        positional=Positional.ROTARY,
        rotary_style=RotaryStyle.NEOX,
        rotary_dim=int(d_head * rope.get("partial_rotary_factor", 1.0)),
        rotary_base=float(rope["rope_theta"]),
        rope_scaling=scaling,
        attn_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        name=hf.get("_name_or_path", ""),
        architecture="olmo2",
    )


def weights(ckpt: HFCheckpoint, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    p = ckpt.find_prefix("model.", "")
    h, kv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    w_e = ckpt.get(p + "embed_tokens.weight")
    yield "embed.W_E", w_e
    for layer in range(cfg.n_layers):
        b, o = f"{p}layers.{layer}.", f"blocks.{layer}."
        for name, proj, n in (("Q", "q_proj", h), ("K", "k_proj", kv), ("V", "v_proj", kv)):
            w = ckpt.get(f"{b}self_attn.{proj}.weight")
            yield o + f"attn.W_{name}", split_heads_in(w, n)
            yield o + f"attn.b_{name}", bias_or_zeros(ckpt, f"{b}self_attn.{proj}.bias", (n, dh), w)
        # the norms over all heads' [n * d_head] projections, kept [n, d_head] like the heads they normalise
        yield o + "attn.q_norm.w", ckpt.get(b + "self_attn.q_norm.weight").reshape(h, dh)
        yield o + "attn.k_norm.w", ckpt.get(b + "self_attn.k_norm.weight").reshape(kv, dh)
        w_o = ckpt.get(b + "self_attn.o_proj.weight")
        yield o + "attn.W_O", split_heads_out(w_o, h)
        yield o + "attn.b_O", bias_or_zeros(ckpt, b + "self_attn.o_proj.bias", (cfg.d_model,), w_o)
        yield o + "ln1_post.w", ckpt.get(b + "post_attention_layernorm.weight")
        yield o + "mlp.W_gate", linear_in(ckpt, b + "mlp.gate_proj.weight")
        yield o + "mlp.W_in", linear_in(ckpt, b + "mlp.up_proj.weight")
        yield o + "mlp.b_in", torch.zeros(cfg.d_mlp, dtype=w_e.dtype)
        yield o + "mlp.W_out", linear_in(ckpt, b + "mlp.down_proj.weight")
        yield o + "mlp.b_out", torch.zeros(cfg.d_model, dtype=w_e.dtype)
        yield o + "ln2_post.w", ckpt.get(b + "post_feedforward_layernorm.weight")
    yield "ln_final.w", ckpt.get(p + "norm.weight")
    if not cfg.tie_embeddings:
        yield "unembed.W_U", linear_in(ckpt, "lm_head.weight")
    yield "unembed.b_U", torch.zeros(cfg.d_vocab_out, dtype=w_e.dtype)


register(Converter(("olmo2",), config, weights))
