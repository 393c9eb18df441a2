"""Tiny configurations covering every architectural switch of `ModelConfig` (shared by the model tests)."""

from __future__ import annotations

from interplab.model import ModelConfig

_BASE = dict(d_model=16, n_layers=2, n_heads=4, d_vocab=23, n_ctx=12)

VARIANTS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(**_BASE),
    "rotary_neox_rms_gated_gqa": ModelConfig(
        **_BASE,
        positional="rotary",
        normalization="rmsnorm",
        gated_mlp=True,
        act_fn="silu",
        n_kv_heads=2,
        attn_bias=False,
        mlp_bias=False,
    ),
    "rotary_gptj_partial_parallel": ModelConfig(
        **_BASE,
        positional="rotary",
        rotary_style="gptj",
        rotary_dim=2,
        parallel_attn_mlp=True,
        tie_embeddings=True,
    ),
    "rotary_neox_partial_mqa": ModelConfig(**_BASE, positional="rotary", rotary_dim=2, n_kv_heads=1),
    "attn_only_nonorm_nopos": ModelConfig(**_BASE, attn_only=True, normalization="none", positional="none"),
    "bidirectional": ModelConfig(**_BASE, causal=False, d_vocab_out=3),
    "smeared_keys": ModelConfig(**_BASE, smear_keys=True, positional="rotary"),
    "gemma_like": ModelConfig(
        **_BASE,
        positional="rotary",
        normalization="rmsnorm",
        gated_mlp=True,
        act_fn="gelu_tanh",
        post_norms=True,
        attn_softcap=5.0,
        logit_softcap=3.0,
        embed_scale=4.0,
        sliding_window=3,
        sliding_layers=(0,),
        n_kv_heads=2,
        unembed_bias=True,
    ),
    "qk_norm_local_global": ModelConfig(  # Qwen3 / Gemma-3: per-head q/k norms, a rotary base per layer
        **_BASE,
        positional="rotary",
        normalization="rmsnorm",
        gated_mlp=True,
        act_fn="silu",
        qk_norm="head",
        rotary_bases=(10.0, 1000.0),
        sliding_window=3,
        sliding_layers=(0,),
        post_norms=True,
        n_kv_heads=2,
    ),
    "olmo_like": ModelConfig(  # OLMo-2: no pre-norms, post norms, q/k norms over all heads
        **_BASE,
        positional="rotary",
        normalization="rmsnorm",
        gated_mlp=True,
        act_fn="silu",
        pre_norms=False,
        post_norms=True,
        qk_norm="full",
        n_kv_heads=2,
    ),
}


def randomize(model) -> None:  # noqa: ANN001
    """Give every parameter (biases, norm weights, gates included) a sizeable random value, so no term hides
    as zero and attention patterns are far from uniform."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_((0.3 if p.dim() < 2 else 0.5) * torch.randn_like(p))


def make_model(name: str):  # noqa: ANN201
    from interplab.model import Transformer

    model = Transformer(VARIANTS[name])
    randomize(model)
    return model
