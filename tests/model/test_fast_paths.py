"""Every fast path of the forward equals the reference: the maths written out plainly from the weights.

The model picks its computation per seam from what the hooks ask (`interplab.model.layers.need`): fused QKV or
per-head projections, SDPA or explicit scores and pattern, one output matmul or per-head results summed, the
fused norm kernel or the step-by-step norm, broadcast views or copies of the per-head inputs. Each hook mode
below drives every seam to one of its choices; all of them must give the reference's logits (and, under
backward hooks, its gradients), for every architectural switch, converted Hugging Face families and the
key/value cache.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from interplab import load_model
from interplab.model import Norm, Positional, QKNorm, Transformer
from interplab.model.attention import AttnContext, HeadInputs, apply_rotary, keep_fused_weights, rotary_tables
from interplab.model.generate import generate
from interplab.model.kv_cache import KVCache
from tests.model.model_variants import VARIANTS, make_model
from tests.model.test_load_hf import _make as make_hf

B, P = 2, 7
NAMES = sorted(VARIANTS)
MODES = ["none", "read", "replace", "grad"]
TOL = dict(atol=2e-5, rtol=1e-5)
# a cached step multiplies [b, 1, d] by the weights where the full forward multiplies [b, p, d]: the kernels sum in
# other orders, and on a model without norms the logits carry that float32 rounding (3.8e-5 seen on an AMD EPYC)
KV_TOL = dict(atol=1e-4, rtol=1e-4)


# ---- the reference ------------------------------------------------------------------------------------
def _norm(module: torch.nn.Module, kind: Norm, eps: float, x: Tensor) -> Tensor:
    if kind is Norm.NONE:
        return x
    if kind is Norm.LAYERNORM:
        x = x - x.mean(-1, keepdim=True)
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * module.w + module.b
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * module.w


def reference_logits(model: Transformer, tokens: Tensor) -> Tensor:
    """nanoGPT-style: resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(.))."""
    cfg = model.cfg
    norm = lambda m, x: _norm(m, cfg.normalization, cfg.norm_eps, x)  # noqa: E731
    b, p = tokens.shape
    positions = torch.arange(p)[None].expand(b, p)
    resid = model.W_E[tokens] * (cfg.embed_scale if cfg.embed_scale is not None else 1.0)
    if cfg.positional is Positional.LEARNED:
        resid = resid + model.W_pos[:p]
    q_idx, k_idx = torch.arange(p)[:, None], torch.arange(p)[None, :]
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        x = norm(block.ln1, resid) if cfg.pre_norms else resid
        q = torch.einsum("bpd,hde->bphe", x, attn.W_Q) + attn.b_Q
        k = torch.einsum("bpd,hde->bphe", x, attn.W_K) + attn.b_K
        v = torch.einsum("bpd,hde->bphe", x, attn.W_V) + attn.b_V
        if cfg.qk_norm is not QKNorm.NONE:  # RMSNorm over each head, or over all heads at once
            over = (-1,) if cfg.qk_norm is QKNorm.HEAD else (-2, -1)
            q, k = (
                t / torch.sqrt(t.pow(2).mean(over, keepdim=True) + cfg.norm_eps) * m.w
                for t, m in ((q, attn.q_norm), (k, attn.k_norm))
            )
        if cfg.smear_keys:
            gate = torch.sigmoid(attn.smear)[:, None]
            previous = torch.cat([torch.zeros_like(k[:, :1]), k[:, :-1]], dim=1)
            k = gate * k + (1 - gate) * previous
        if cfg.positional is Positional.ROTARY:
            cos, sin = rotary_tables(
                cfg.replace(rotary_base=cfg.rotary_base_for(layer), rotary_bases=()), positions, q.dtype
            )
            q, k = apply_rotary(q, cos, sin, cfg.rotary_style), apply_rotary(k, cos, sin, cfg.rotary_style)
        k = k.repeat_interleave(cfg.n_groups, dim=2)
        v = v.repeat_interleave(cfg.n_groups, dim=2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / cfg.attn_scale
        if cfg.attn_softcap is not None:
            scores = cfg.attn_softcap * torch.tanh(scores / cfg.attn_softcap)
        allowed = torch.ones(p, p, dtype=torch.bool)
        if cfg.causal:
            allowed = k_idx <= q_idx
        window = cfg.window_for(layer)
        if window is not None:
            allowed = allowed & (q_idx - k_idx < window)
        pattern = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        attn_out = torch.einsum("bqhe,hed->bqd", z, attn.W_O) + attn.b_O
        if cfg.post_norms:
            attn_out = norm(block.ln1_post, attn_out)
        if not cfg.has_mlp:
            resid = resid + attn_out
            continue
        mlp_in = resid if cfg.parallel_attn_mlp else resid + attn_out
        h = norm(block.ln2, mlp_in) if cfg.pre_norms else mlp_in
        mlp = block.mlp
        pre = h @ mlp.W_in + mlp.b_in
        post = mlp.act(h @ mlp.W_gate) * pre if cfg.gated_mlp else mlp.act(pre)
        mlp_out = post @ mlp.W_out + mlp.b_out
        if cfg.post_norms:
            mlp_out = norm(block.ln2_post, mlp_out)
        resid = resid + attn_out + mlp_out
    logits = norm(model.ln_final, resid) @ model.W_U + model.b_U
    if cfg.logit_softcap is not None:
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
    return logits


# ---- the hook modes -----------------------------------------------------------------------------------
def run(model: Transformer, tokens: Tensor, mode: str, **kw) -> Tensor:
    """Logits with hooks on every point: none, read only, replaceable (identity), or backward only."""
    every = lambda name: True  # noqa: E731
    if mode == "none":
        return model(tokens, **kw)
    if mode == "read":
        return model.run_with_cache(tokens, **kw)[0]
    if mode == "replace":
        return model.run_with_hooks(tokens, fwd_hooks=[(every, lambda x, s: x.clone())], **kw)
    assert mode == "grad"
    with torch.enable_grad():
        return model.run_with_hooks(tokens, bwd_hooks=[(every, lambda g, s: None)], **kw)


def tokens_for(d_vocab: int, b: int = B, p: int = P, seed: int = 1) -> Tensor:
    return torch.randint(0, d_vocab, (b, p), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", NAMES)
def test_every_path_gives_the_reference_logits(variant, mode):
    model = make_model(variant)
    tokens = tokens_for(model.cfg.d_vocab)
    with torch.no_grad():
        expected = reference_logits(model, tokens)
    assert_close(run(model, tokens, mode).detach(), expected, **TOL)


@pytest.mark.parametrize("variant", NAMES)
def test_backward_hooks_keep_the_fast_values_and_give_the_reference_gradients(variant):
    model = make_model(variant)
    tokens = tokens_for(model.cfg.d_vocab)
    with torch.no_grad():
        plain = model(tokens)
    hooked = run(model, tokens, "grad")
    assert_close(hooked, plain, atol=0, rtol=0)  # forward values are the fast path's, bit for bit
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(hooked.pow(2).mean(), params, allow_unused=True)
    want = torch.autograd.grad(reference_logits(model, tokens).pow(2).mean(), params, allow_unused=True)
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=False):
        if w is not None:
            assert_close(g, w, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "variant", ["gpt2", "rotary_neox_rms_gated_gqa", "rotary_neox_partial_mqa", "gemma_like"]
)
def test_sdpa_equals_the_explicit_computation(variant):
    model = make_model(variant)
    cfg = model.cfg
    attn = model.blocks[0].attn
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, P, cfg.n_heads, cfg.d_head, generator=gen)
    k = torch.randn(B, P, cfg.n_kv_heads, cfg.d_head, generator=gen)
    v = torch.randn(B, P, cfg.n_kv_heads, cfg.d_head, generator=gen)
    pad = torch.ones(B, P, dtype=torch.bool)
    pad[0, :2] = False  # a left-padded row
    for key_valid in (None, pad):
        ctx = AttnContext(positions=torch.arange(P).expand(B, P), key_valid=key_valid)
        mask = ctx.mask(P, cfg.window_for(0), cfg.causal)
        explicit = attn._explicit(q, k, v, mask, ctx)
        if cfg.attn_softcap is None:
            assert_close(attn._sdpa(q, k, v, mask), explicit, **TOL)
        else:  # SDPA cannot soft-cap: the seam always takes the explicit path
            assert_close(attn._attend(q, k, v, ctx), explicit, atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["gpt2", "rotary_neox_rms_gated_gqa"])
def test_fused_qkv_equals_per_head_projections_and_follows_weight_changes(variant):
    model = make_model(variant)
    cfg, attn = model.cfg, model.blocks[0].attn
    x = torch.randn(B, P, cfg.d_model, generator=torch.Generator().manual_seed(4))
    heads = HeadInputs(
        x[:, :, None].expand(B, P, cfg.n_heads, cfg.d_model),
        x[:, :, None].expand(B, P, cfg.n_kv_heads, cfg.d_model),
        x[:, :, None].expand(B, P, cfg.n_kv_heads, cfg.d_model),
    )
    with torch.no_grad():
        for fused, per_head in zip(attn.project(x), attn.project(heads), strict=True):
            assert_close(fused, per_head, **TOL)
        assert attn.fused_qkv.weights(attn)[0] is not attn.fused_qkv.weights(attn)[0]  # built at each call
        with keep_fused_weights(model):
            w_before = attn.fused_qkv.weights(attn)[0]
            assert attn.fused_qkv.weights(attn)[0] is w_before  # kept while the weights are unchanged
            attn.W_K.mul_(2.0)  # an in-place change bumps the version: rebuilt
            for fused, per_head in zip(attn.project(x), attn.project(heads), strict=True):
                assert_close(fused, per_head, **TOL)
        assert attn.fused_qkv._weights is None  # leaving the scope drops what was kept
    with torch.enable_grad():  # a gradient is needed: built afresh, differentiably
        q, _, _ = attn.project(x)
        q.sum().backward()
    assert attn.W_Q.grad is not None


@pytest.mark.parametrize("mode", ["none", "read", "replace"])
@pytest.mark.parametrize("variant", [n for n in NAMES if VARIANTS[n].causal])
def test_kv_cache_generation_gives_the_reference_logits(variant, mode):
    model = make_model(variant)
    tokens = tokens_for(model.cfg.d_vocab, p=9)
    with torch.no_grad():
        expected = reference_logits(model, tokens)
        kv = model.new_kv_cache()
        steps = [run(model, tokens[:, :4], mode, kv_cache=kv)]
        steps += [run(model, tokens[:, i : i + 1], mode, kv_cache=kv) for i in range(4, tokens.shape[1])]
    assert_close(torch.cat(steps, dim=1), expected, **KV_TOL)


@pytest.mark.parametrize("variant", ["gpt2", "smeared_keys", "gemma_like"])
def test_kv_cache_prefix_continues_every_copy_like_the_full_run(variant):
    model = make_model(variant)
    tokens = tokens_for(model.cfg.d_vocab, p=9)
    with torch.no_grad():
        full = model(tokens)
        kv = model.new_kv_cache()
        model(tokens, kv_cache=kv)
        prefix = kv.prefix(5, 3)
        assert prefix.length == 5 and prefix.layers[0].k.shape[0] == 3 * B
        rest = model(tokens[:, 5:].repeat(3, 1), kv_cache=prefix)
    for i in range(3):
        assert_close(rest[i * B : (i + 1) * B], full[:, 5:], **TOL)
    with pytest.raises(ValueError, match="upto must be in 0..9"):
        kv.prefix(10)
    assert isinstance(prefix, KVCache) and kv.length == 9  # the original is left alone


HF_FAMILIES = ["gpt2", "llama-gqa-theta", "neox-parallel-partial-rotary", "gemma2-sliding"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_converted_families_give_the_transformers_logits_on_every_path(tmp_path, family, mode):
    hf_model = make_hf(family)
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    tokens = tokens_for(hf_model.config.vocab_size, p=12)
    with torch.no_grad():
        expected = hf_model(tokens).logits
    assert_close(run(model, tokens, mode).detach(), expected, atol=1e-4, rtol=0)


def _edit_data(model):  # the usual way to ablate a weight; it bumps no version counter
    model.blocks[0].attn.W_Q.data[0] = 0.0


def _edit_fused_adamw(model):  # torch's fused AdamW kernel writes the weights without bumping their versions
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    torch.optim.AdamW(model.parameters(), lr=0.1, fused=True).step()


def _edit_load_state_dict(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["blocks.0.attn.W_V"].mul_(-1.0)
    model.load_state_dict(state)


def _edit_data_assignment(model):
    model.blocks[0].attn.W_K.data = torch.randn_like(model.blocks[0].attn.W_K)


@pytest.mark.parametrize(
    "edit", [_edit_data, _edit_fused_adamw, _edit_load_state_dict, _edit_data_assignment]
)
@pytest.mark.parametrize("variant", ["gpt2", "rotary_neox_rms_gated_gqa"])
def test_no_grad_forward_after_a_weight_edit_is_the_edited_model(variant, edit):
    """A forward after any kind of weight edit equals a freshly built model with the edited weights (a fused
    QKV matrix kept from before the edit would silently answer for the old model)."""
    model = make_model(variant).eval()
    tokens = tokens_for(model.cfg.d_vocab, p=P)
    with torch.no_grad():
        model(tokens)  # a forward before the edit (anything it kept must not survive the edit)
        edit(model)
        after = model(tokens)
    fresh = type(model)(model.cfg, init=False).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close(after, fresh(tokens), atol=0, rtol=0)


def test_generation_keeps_the_fused_weights_only_for_the_call():
    model = make_model("gpt2").eval()
    prompt = tokens_for(model.cfg.d_vocab, p=3)
    before = generate(model, prompt, max_new_tokens=4).tokens
    _edit_data(model)
    after = generate(model, prompt, max_new_tokens=4, use_kv_cache=False).tokens
    cached = generate(model, prompt, max_new_tokens=4).tokens
    assert torch.equal(after, cached)  # nothing from the first call survived the edit
    assert all(b.attn.fused_qkv.keep == 0 and b.attn.fused_qkv._weights is None for b in model.blocks)
    assert before.shape == after.shape
