"""Half precision: interplab in bfloat16 / float16 against `transformers` in the same dtype (every family,
logits and every hook Hugging Face exposes), tolerances from docs/loading.md; caches, hooks and patching in
bf16; unsupported dtypes refused."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from interplab import load_model
from interplab.analysis import LogitDiff, activation_patch
from interplab.analysis.patching import activation_patch_loop
from interplab.model import ModelConfig, Transformer
from interplab.model.precision import check_dtype
from tests.model.precision import EXACT_BF16, TOLERANCES, VARIANTS, compare, family

# one or two variants per family (the float32 suite covers every option)
HALF_VARIANTS = [
    "gpt2",
    "neox-parallel-partial-rotary",
    "neox-sequential-full-rotary",
    "llama-gqa-theta",
    "mistral-sliding-window",
    "qwen2-gqa-bias",
    "gemma2-sliding",
    "gemma2-untied-mqa",
    "qwen3-gqa",
    "gemma3-text-softcap-untied",
    "olmo2-gqa-bias",
]


# the same tests on CUDA when a GPU is there (never required: CI has none)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", HALF_VARIANTS)
def test_half_precision_parity_with_transformers(tmp_path, variant, dtype, device):
    pairs = compare(variant, dtype, tmp_path, device=device)
    assert {"logits", "logits_fast", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern"} <= set(pairs)
    for name, (got, expected) in pairs.items():
        assert got.dtype == dtype == expected.dtype, name
        assert_close(got, expected, **TOLERANCES[dtype], msg=name)
    if dtype is torch.bfloat16 and family(variant) in EXACT_BF16 and device == "cpu":  # measured on CPU
        for name, (got, expected) in pairs.items():
            assert torch.equal(got, expected), (name, (got - expected).abs().max())


def test_every_variant_is_known_to_the_precision_table():
    assert set(HALF_VARIANTS) <= set(VARIANTS)


def test_gemma_keeps_its_norm_weights_in_float32(tmp_path):
    compare("gemma2-sliding", torch.bfloat16, tmp_path)  # saves the bf16 checkpoint
    model = load_model(tmp_path, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["blocks.0.ln1.w"] == dtypes["blocks.1.ln2_post.w"] == dtypes["ln_final.w"] == torch.float32
    assert dtypes["blocks.0.attn.W_Q"] == dtypes["embed.W_E"] == torch.bfloat16
    saved = load_model(model.save(tmp_path / "saved"), dtype=torch.bfloat16)  # a native folder keeps the rule
    assert {n: p.dtype for n, p in saved.named_parameters()} == dtypes
    tokens = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(saved(tokens), model(tokens))


def _bf16_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=16)).to(
        torch.bfloat16
    )


def test_caches_of_a_bf16_model_stay_bf16_and_a_float32_model_caches_in_bf16_on_request():
    model = _bf16_model()
    tokens = torch.randint(0, 50, (2, 8))
    _, cache = model.run_with_cache(tokens)
    float32_sites = {n for n, t in cache.items() if t.dtype != torch.bfloat16}
    # the norms' scale and normalised vector are float32, as TransformerLens reports them; nothing else
    assert float32_sites and all(n.endswith(("hook_scale", "hook_normalized")) for n in float32_sites)
    fp32 = _bf16_model().float()
    logits, full = fp32.run_with_cache(tokens)
    logits_b, half = fp32.run_with_cache(tokens, dtype=torch.bfloat16)
    assert {t.dtype for _, t in half.items()} == {torch.bfloat16}
    assert logits_b.dtype == torch.float32 and torch.equal(logits_b, logits)  # the forward is untouched
    for name in full:
        assert torch.equal(half[name], full[name].bfloat16()), name
    _, half_named = fp32.run_with_cache(tokens, names=["blocks.0.hook_resid_post"], dtype="bf16")
    assert half_named["blocks.0.hook_resid_post"].dtype == torch.bfloat16


def test_patching_in_bf16_equals_the_patched_forward_computed_by_hand():
    model = _bf16_model()
    clean, corrupt = torch.randint(0, 50, (1, 8)), torch.randint(0, 50, (1, 8))
    _, cache = model.run_with_cache(clean, names=["blocks.1.hook_resid_pre"])
    site = "blocks.1.hook_resid_pre"

    def patch(x, s):
        x = x.clone()
        x[:, 3] = cache[site][:, 3]
        return x

    patched = model.run_with_hooks(corrupt, fwd_hooks=[(site, patch)])
    assert patched.dtype == torch.bfloat16
    # by hand: run block 1 on the corrupt stream with position 3 replaced
    with torch.no_grad():
        ctx = model.context(corrupt)
        resid = model.run_blocks(model.embed_tokens(corrupt, ctx), ctx, stop=1)
        resid[:, 3] = cache[site][:, 3]
        expected = model.unembed_resid(model.run_blocks(resid, ctx, start=1))
        assert torch.equal(patched, expected)
        assert not torch.equal(patched, model(corrupt))


@pytest.mark.parametrize("target", ["resid_pre", "z", "pattern"])
def test_batched_activation_patching_equals_the_loop_in_bf16(target):
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=16, positional="rotary", normalization="rmsnorm"
    )
    model = Transformer(cfg).to(torch.bfloat16)
    clean = torch.randint(0, 50, (3, 8))
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, 50, (3,))
    metric = LogitDiff(answer=clean[:, -1], wrong=corrupted[:, 2])
    batched = activation_patch(model, clean, corrupted, metric, target)
    looped = activation_patch_loop(model, clean, corrupted, metric, target)
    assert batched.values.dtype == torch.bfloat16 and batched.values.abs().max() > 0
    assert torch.equal(batched.values, looped.values)


def test_gradients_flow_through_hooks_in_bf16():
    model = _bf16_model()
    seen = {}

    def keep(grad, site):
        seen[site.name] = grad

    tokens = torch.randint(0, 50, (2, 8))
    with model.hooks(bwd_hooks=[("blocks.0.hook_resid_post", keep)]):
        model(tokens, return_type="loss").backward()
    grad = seen["blocks.0.hook_resid_post"]
    assert grad.dtype == torch.bfloat16 and grad.abs().sum() > 0
    assert model.blocks[0].attn.W_Q.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [torch.int8, torch.complex64, "int4", "float8"])
def test_unsupported_dtypes_are_refused_naming_the_valid_ones(tmp_path, bad):
    with pytest.raises(
        ValueError, match=r"is not supported: a model runs in float32, bfloat16, float16 or float64"
    ):
        check_dtype(bad)
    with pytest.raises(ValueError, match="dtype=.*is not supported"):
        load_model(tmp_path, dtype=bad)  # refused before the path is even read
    with pytest.raises(ValueError, match="cache dtype=.*is not supported"):
        _bf16_model().run_with_cache(torch.tensor([[1, 2]]), dtype=bad)


def test_dtype_names_are_read():
    assert check_dtype("bf16") is torch.bfloat16 and check_dtype("float16") is torch.float16
    assert check_dtype("torch.float32") is torch.float32 and check_dtype(None) is None
