"""GPT-2 (``model_type = "gpt2"``): learned positions, LayerNorm, GELU (tanh), Conv1D weights (x @ W)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from interplab.model.config import ModelConfig, Norm, Positional
from interplab.model.convert import Converter, HFCheckpoint, hf_activation, register


def config(hf: dict) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ValueError(
            "GPT-2 with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn is not supported"
        )
    d = hf["n_embd"]
    return ModelConfig(
        d_model=d,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_vocab=hf["vocab_size"],
        n_ctx=hf.get("n_positions", hf.get("n_ctx", 1024)),
        d_mlp=hf.get("n_inner") or 4 * d,
        act_fn=hf_activation(hf.get("activation_function", "gelu_new"), "GPT-2"),
        normalization=Norm.LAYERNORM,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        positional=Positional.LEARNED,
        attn_scale=(d / hf["n_head"]) ** 0.5 if hf.get("scale_attn_weights", True) else 1.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        name=hf.get("_name_or_path", ""),
        architecture="gpt2",
    )


def weights(ckpt: HFCheckpoint, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    p = ckpt.find_prefix("transformer.", "")
    h, d = cfg.n_heads, cfg.d_model
    w_e = ckpt.get(p + "wte.weight")
    yield "embed.W_E", w_e
    yield "pos_embed.W_pos", ckpt.get(p + "wpe.weight")
    for layer in range(cfg.n_layers):
        b = f"{p}h.{layer}."
        yield f"blocks.{layer}.ln1.w", ckpt.get(b + "ln_1.weight")
        yield f"blocks.{layer}.ln1.b", ckpt.get(b + "ln_1.bias")
        w_qkv, b_qkv = ckpt.get(b + "attn.c_attn.weight"), ckpt.get(b + "attn.c_attn.bias")
        for name, w, bias in zip("QKV", w_qkv.split(d, dim=1), b_qkv.split(d), strict=True):
            yield f"blocks.{layer}.attn.W_{name}", w.reshape(d, h, -1).permute(1, 0, 2).contiguous()
            yield f"blocks.{layer}.attn.b_{name}", bias.reshape(h, -1).contiguous()
        yield f"blocks.{layer}.attn.W_O", ckpt.get(b + "attn.c_proj.weight").reshape(h, -1, d).contiguous()
        yield f"blocks.{layer}.attn.b_O", ckpt.get(b + "attn.c_proj.bias")
        yield f"blocks.{layer}.ln2.w", ckpt.get(b + "ln_2.weight")
        yield f"blocks.{layer}.ln2.b", ckpt.get(b + "ln_2.bias")
        yield f"blocks.{layer}.mlp.W_in", ckpt.get(b + "mlp.c_fc.weight")
        yield f"blocks.{layer}.mlp.b_in", ckpt.get(b + "mlp.c_fc.bias")
        yield f"blocks.{layer}.mlp.W_out", ckpt.get(b + "mlp.c_proj.weight")
        yield f"blocks.{layer}.mlp.b_out", ckpt.get(b + "mlp.c_proj.bias")
    yield "ln_final.w", ckpt.get(p + "ln_f.weight")
    yield "ln_final.b", ckpt.get(p + "ln_f.bias")
    if not cfg.tie_embeddings:
        yield "unembed.W_U", ckpt.get("lm_head.weight").T.contiguous()
    yield "unembed.b_U", torch.zeros(cfg.d_vocab_out, dtype=w_e.dtype)


register(Converter(("gpt2",), config, weights))
