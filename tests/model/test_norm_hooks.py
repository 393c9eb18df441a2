"""Norm hooks have TransformerLens' semantics: ``hook_scale`` is what the norm divides by and
``hook_normalized`` the normalised vector *before* the norm's weight and bias, on LayerNorm and RMSNorm models
of several sizes with unprocessed weights (norm weights far from 1, biases far from 0). Also: the per-head
``hook_attn_in`` and the unembedding hooks."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from interplab.model import ModelConfig, Transformer
from tests.model.model_variants import randomize

SIZES = [
    dict(d_model=16, n_layers=1, n_heads=2, d_vocab=29, n_ctx=16),
    dict(d_model=40, n_layers=3, n_heads=5, d_vocab=37, n_ctx=16),
    dict(d_model=64, n_layers=2, n_heads=8, d_vocab=53, n_ctx=16, d_mlp=96),
]
NORMS = {
    "layernorm": dict(),
    "rmsnorm-gqa": dict(
        normalization="rmsnorm", positional="rotary", n_kv_heads=1, gated_mlp=True, act_fn="silu"
    ),
    "layernorm-parallel": dict(parallel_attn_mlp=True, positional="rotary"),
    "rmsnorm-post-norms": dict(normalization="rmsnorm", post_norms=True, positional="rotary", gated_mlp=True),
}


def model_for(size: dict, norm: str, seed: int, dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**size, **NORMS[norm], norm_eps=1e-5))
    randomize(model)
    return model.to(dtype)


def tl_norm(x: torch.Tensor, layernorm: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TransformerLens' (scale, normalized), written from its definition: centre (LayerNorm), then
    scale = sqrt(mean square + eps) and normalized = x / scale, in float32."""
    x = x.float()
    if layernorm:
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return scale, x / scale


@pytest.mark.parametrize("size", range(len(SIZES)))
@pytest.mark.parametrize("norm", list(NORMS))
def test_norm_hooks_are_transformer_lens_scale_and_normalized(size, norm):
    model = model_for(SIZES[size], norm, seed=size)
    cfg = model.cfg
    layernorm = cfg.normalization.value == "layernorm"
    tokens = torch.randint(0, cfg.d_vocab, (3, 11))
    _, cache = model.run_with_cache(tokens)
    reads = {"ln_final": cache[("resid_post", cfg.n_layers - 1)]}
    for layer in range(cfg.n_layers):
        reads[f"blocks.{layer}.ln1"] = cache["resid_pre", layer]
        reads[f"blocks.{layer}.ln2"] = cache["resid_pre" if cfg.parallel_attn_mlp else "resid_mid", layer]
    for prefix, x in reads.items():
        scale, normalized = tl_norm(x, layernorm, cfg.norm_eps)
        assert cache[f"{prefix}.hook_normalized"].dtype == torch.float32
        assert_close(cache[f"{prefix}.hook_scale"], scale, atol=1e-5, rtol=1e-5, msg=prefix)
        assert_close(cache[f"{prefix}.hook_normalized"], normalized, atol=1e-5, rtol=1e-5, msg=prefix)
        if layernorm:  # zero mean, unit mean square up to eps: the weight and bias are not in it
            assert_close(normalized.mean(-1), torch.zeros(normalized.shape[:-1]), atol=1e-5, rtol=0)
    # what the layers read is normalized * w (+ b): ln1 feeds Q, the final norm feeds the unembedding
    for layer in range(cfg.n_layers):
        ln1, attn = model.blocks[layer].ln1, model.blocks[layer].attn
        fed = cache["ln1_normalized", layer] * ln1.w + (ln1.b if layernorm else 0)
        q = torch.einsum("bpd,hde->bphe", fed, attn.W_Q) + attn.b_Q
        assert_close(cache["q", layer], q, atol=1e-4, rtol=1e-4)
    final = cache["ln_final.hook_normalized"] * model.ln_final.w + (model.ln_final.b if layernorm else 0)
    assert_close(cache["unembed.hook_in"], final, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", list(NORMS))
def test_rewriting_normalized_replaces_what_the_weight_and_bias_see(norm):
    model = model_for(SIZES[1], norm, seed=7)
    cfg = model.cfg
    layernorm = cfg.normalization.value == "layernorm"
    tokens = torch.randint(0, cfg.d_vocab, (2, 9))
    with torch.no_grad():
        clean = model(tokens)
        same = model.run_with_hooks(
            tokens, fwd_hooks=[(lambda n: n.endswith("hook_normalized"), lambda x, s: x)]
        )
    assert_close(same, clean, atol=1e-4, rtol=1e-4)  # the step-by-step norm equals the fused one (rounding)
    # zeroing ln1's normalised vector leaves only its bias (LayerNorm) or nothing (RMSNorm) to feed Q
    _, cache = model.run_with_cache(
        tokens, fwd_hooks=[(("ln1_normalized", 1), lambda x, s: torch.zeros_like(x))]
    )
    attn, ln1 = model.blocks[1].attn, model.blocks[1].ln1
    fed = (ln1.b if layernorm else torch.zeros_like(ln1.w)).expand(2, 9, -1)
    assert_close(cache["q", 1], torch.einsum("bpd,hde->bphe", fed, attn.W_Q) + attn.b_Q, atol=1e-5, rtol=1e-5)
    # doubling the scale halves the normalised vector the hook then sees
    _, doubled = model.run_with_cache(tokens, fwd_hooks=[(("ln2_scale", 0), lambda x, s: 2 * x)])
    _, plain = model.run_with_cache(tokens, names=[("ln2_normalized", 0)])
    assert_close(doubled["ln2_normalized", 0], plain["ln2_normalized", 0] / 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm-gqa"])
def test_bfloat16_models_report_norm_hooks_in_float32_as_transformer_lens(norm):
    model = model_for(SIZES[0], norm, seed=3, dtype=torch.bfloat16)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6))
    _, cache = model.run_with_cache(tokens)
    x = cache["resid_pre", 0]
    scale, normalized = tl_norm(x, norm == "layernorm", model.cfg.norm_eps)
    assert cache["blocks.0.ln1.hook_normalized"].dtype == torch.float32
    assert_close(cache["blocks.0.ln1.hook_scale"].float(), scale, atol=1e-5, rtol=1e-5)
    assert_close(cache["blocks.0.ln1.hook_normalized"], normalized, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", range(len(SIZES)))
def test_patching_one_heads_attn_in_changes_only_that_heads_q_k_v(size):
    model = model_for(SIZES[size], "layernorm", seed=size)
    cfg = model.cfg
    tokens = torch.randint(0, cfg.d_vocab, (2, 8))
    head = cfg.n_heads - 1

    def noise(x, site):
        x = x.clone()
        x[:, :, head] += torch.randn_like(x[:, :, head])
        return x

    _, clean = model.run_with_cache(tokens)
    _, patched = model.run_with_cache(tokens, fwd_hooks=[(("attn_in", 0), noise)])
    others = [h for h in range(cfg.n_heads) if h != head]
    for kind in ("q", "k", "v"):
        assert not torch.allclose(patched[kind, 0][:, :, head], clean[kind, 0][:, :, head])
        assert_close(patched[kind, 0][:, :, others], clean[kind, 0][:, :, others], atol=2e-5, rtol=1e-5)
    # q_input etc. are copies of the (patched) attn_in; the residual stream itself is untouched
    assert_close(patched["q_input", 0], patched["attn_in", 0], atol=0, rtol=0)
    assert_close(patched["resid_pre", 0], clean["resid_pre", 0], atol=0, rtol=0)
    # an identity rewrite computes the same function
    with torch.no_grad():
        same = model.run_with_hooks(tokens, fwd_hooks=[(("attn_in", 0), lambda x, s: x)])
    assert_close(same, model(tokens), atol=1e-4, rtol=1e-4)


def test_grouped_query_models_have_no_attn_in_and_say_why():
    model = model_for(SIZES[1], "rmsnorm-gqa", seed=0)
    with pytest.raises(ValueError, match="shares keys and values between heads.*hook_q_input"):
        model.run_with_cache(torch.zeros(1, 3, dtype=torch.long), names=["blocks.0.hook_attn_in"])


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm-post-norms"])
def test_unembed_hooks_are_the_final_norm_output_and_the_logits_before_soft_capping(norm):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SIZES[1], **NORMS[norm], logit_softcap=5.0))
    randomize(model)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7))
    logits, cache = model.run_with_cache(tokens)
    out = cache["unembed.hook_out"]
    assert_close(out, cache["unembed.hook_in"] @ model.W_U + model.b_U, atol=1e-5, rtol=1e-5)
    assert_close(logits, 5.0 * torch.tanh(out / 5.0), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        steered = model.run_with_hooks(tokens, fwd_hooks=[("unembed.hook_out", lambda x, s: x + 1.0)])
    assert_close(steered, 5.0 * torch.tanh((out + 1.0) / 5.0), atol=1e-4, rtol=1e-4)  # cache: other kernels


def test_zero_ablating_one_heads_attn_in_selects_that_head():
    from interplab.analysis.ablation import zero_ablation

    model = model_for(SIZES[1], "layernorm", seed=2)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 8))
    _, clean = model.run_with_cache(tokens)
    _, ablated = model.run_with_cache(tokens, fwd_hooks=[zero_ablation(("attn_in", 1), heads=[2])])
    assert_close(
        ablated["attn_in", 1][:, :, 2], torch.zeros_like(ablated["attn_in", 1][:, :, 2]), atol=0, rtol=0
    )
    assert_close(ablated["attn_in", 1][:, :, 3], clean["attn_in", 1][:, :, 3], atol=0, rtol=0)
    assert_close(ablated["q", 1][:, :, 0], clean["q", 1][:, :, 0], atol=2e-5, rtol=1e-5)
    assert not torch.allclose(ablated["q", 1][:, :, 2], clean["q", 1][:, :, 2])
