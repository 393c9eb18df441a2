"""GPT-NeoX / Pythia (``model_type = "gpt_neox"``): rotary on the first ``rotary_pct`` of each head (NeoX
halves), LayerNorm, parallel attention + MLP (``use_parallel_residual``), untied ``embed_out``. A
``rope_scaling`` (transformers applies every ``rope_type`` to NeoX: linear, dynamic, yarn, llama3, longrope)
scales the rotary part as it does.

The fused ``query_key_value`` weight [3 * d_model, d_model] is laid out per head: row ``(h * 3 + i) * d_head + e``
is output ``e`` of head ``h`` for i = q, k, v (transformers views it as [.., n_heads, 3 * d_head] and chunks).
"""

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
    split_heads_out,
)


def config(hf: dict) -> ModelConfig:
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    d_head = d // h
    rope = hf_rope(hf, theta_key="rotary_emb_base")
    pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    scaling = hf_rope_scaling(hf, rope, "GPT-NeoX")
    return ModelConfig(
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=h,
        d_vocab=hf["vocab_size"],
        n_ctx=scaled_context(hf, scaling),
        d_mlp=hf.get("intermediate_size") or 4 * d,
        act_fn=hf_activation(hf.get("hidden_act", "gelu"), "GPT-NeoX"),
        normalization=Norm.LAYERNORM,
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        positional=Positional.ROTARY,
        rotary_dim=int(d_head * pct),
        rotary_base=float(rope["rope_theta"]),
        rotary_style=RotaryStyle.NEOX,
        rope_scaling=scaling,
        parallel_attn_mlp=bool(hf.get("use_parallel_residual", True)),
        attn_bias=bool(hf.get("attention_bias", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        name=hf.get("_name_or_path", ""),
        architecture="gpt_neox",
    )


def weights(ckpt: HFCheckpoint, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    p = ckpt.find_prefix("gpt_neox.", "")
    h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
    w_e = ckpt.get(p + "embed_in.weight")
    yield "embed.W_E", w_e
    for layer in range(cfg.n_layers):
        b, o = f"{p}layers.{layer}.", f"blocks.{layer}."
        yield o + "ln1.w", ckpt.get(b + "input_layernorm.weight")
        yield o + "ln1.b", ckpt.get(b + "input_layernorm.bias")
        qkv = ckpt.get(b + "attention.query_key_value.weight").reshape(h, 3, dh, d)
        b_qkv = bias_or_zeros(ckpt, b + "attention.query_key_value.bias", (h, 3, dh), qkv)
        for i, name in enumerate("QKV"):
            yield o + f"attn.W_{name}", qkv[:, i].permute(0, 2, 1).contiguous()
            yield o + f"attn.b_{name}", b_qkv[:, i].contiguous()
        w_o = ckpt.get(b + "attention.dense.weight")
        yield o + "attn.W_O", split_heads_out(w_o, h)
        yield o + "attn.b_O", bias_or_zeros(ckpt, b + "attention.dense.bias", (d,), w_o)
        yield o + "ln2.w", ckpt.get(b + "post_attention_layernorm.weight")
        yield o + "ln2.b", ckpt.get(b + "post_attention_layernorm.bias")
        yield o + "mlp.W_in", linear_in(ckpt, b + "mlp.dense_h_to_4h.weight")
        yield o + "mlp.b_in", ckpt.get(b + "mlp.dense_h_to_4h.bias")
        yield o + "mlp.W_out", linear_in(ckpt, b + "mlp.dense_4h_to_h.weight")
        yield o + "mlp.b_out", ckpt.get(b + "mlp.dense_4h_to_h.bias")
    yield "ln_final.w", ckpt.get(p + "final_layer_norm.weight")
    yield "ln_final.b", ckpt.get(p + "final_layer_norm.bias")
    if not cfg.tie_embeddings:
        yield "unembed.W_U", linear_in(ckpt, "embed_out.weight")
    yield "unembed.b_U", torch.zeros(cfg.d_vocab_out, dtype=w_e.dtype)


register(Converter(("gpt_neox",), config, weights))
