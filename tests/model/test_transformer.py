"""The hooked Transformer across every architectural variant: hook shapes, identity patches, invariants."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from interplab.hooks import Site, SiteKind
from interplab.model import ModelConfig, Norm, Positional, QKNorm
from tests.model.model_variants import VARIANTS, make_model

B, P = 2, 7
NAMES = sorted(VARIANTS)


def expected_kinds(cfg: ModelConfig) -> set[SiteKind]:
    kinds = set(SiteKind)
    if cfg.positional is not Positional.LEARNED:
        kinds.discard(SiteKind.POS_EMBED)
    if cfg.positional is not Positional.ROTARY:
        kinds -= {SiteKind.ROT_Q, SiteKind.ROT_K}
    if cfg.normalization is Norm.NONE:
        kinds -= {SiteKind.LN1_SCALE, SiteKind.LN2_SCALE, SiteKind.LN_FINAL_SCALE}
    if not cfg.pre_norms:
        kinds -= {SiteKind.LN1_SCALE, SiteKind.LN1_NORMALIZED, SiteKind.LN2_SCALE, SiteKind.LN2_NORMALIZED}
    if cfg.qk_norm is QKNorm.NONE:
        kinds -= {
            SiteKind.Q_NORM_SCALE,
            SiteKind.Q_NORM_NORMALIZED,
            SiteKind.K_NORM_SCALE,
            SiteKind.K_NORM_NORMALIZED,
        }
    if not cfg.gated_mlp:
        kinds.discard(SiteKind.MLP_PRE_LINEAR)
    if cfg.n_kv_heads != cfg.n_heads:
        kinds.discard(SiteKind.ATTN_IN)
    if cfg.attn_only:
        kinds -= {
            SiteKind.MLP_IN,
            SiteKind.MLP_PRE,
            SiteKind.MLP_PRE_LINEAR,
            SiteKind.MLP_POST,
            SiteKind.MLP_OUT,
            SiteKind.LN2_SCALE,
            SiteKind.LN2_NORMALIZED,
        }
    if cfg.attn_only or cfg.parallel_attn_mlp:
        kinds.discard(SiteKind.RESID_MID)
    return kinds


def expected_shape(cfg: ModelConfig, kind: SiteKind) -> tuple[int, ...]:
    h, kv, d, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
    K = SiteKind
    per_head = {K.Q: h, K.ROT_Q: h, K.Z: h, K.K: kv, K.V: kv, K.ROT_K: kv, K.Q_NORM_NORMALIZED: h}
    per_head[K.K_NORM_NORMALIZED] = kv
    if kind in per_head:
        return (B, P, per_head[kind], dh)
    if kind in (K.Q_NORM_SCALE, K.K_NORM_SCALE):  # per head, or one scale over all heads
        return (B, P, (h if kind is K.Q_NORM_SCALE else kv) if cfg.qk_norm is QKNorm.HEAD else 1, 1)
    if kind in (K.ATTN_IN, K.Q_INPUT, K.K_INPUT, K.V_INPUT):
        return (B, P, kv if kind in (K.K_INPUT, K.V_INPUT) else h, d)
    if kind in (K.ATTN_SCORES, K.PATTERN):
        return (B, h, P, P)
    if kind is K.RESULT:
        return (B, P, h, d)
    if kind in (K.LN1_SCALE, K.LN2_SCALE, K.LN_FINAL_SCALE):
        return (B, P, 1)
    if kind in (K.MLP_PRE, K.MLP_PRE_LINEAR, K.MLP_POST):
        return (B, P, cfg.d_mlp)
    if kind is K.UNEMBED_OUT:
        return (B, P, cfg.d_vocab_out)
    return (B, P, d)


def all_sites(cfg: ModelConfig) -> list[Site]:
    kinds = sorted(expected_kinds(cfg), key=lambda k: k.value)
    return [Site(k, layer) for k in kinds for layer in (range(cfg.n_layers) if k.per_layer else [None])]


def tokens_for(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.d_vocab, (B, P), generator=torch.Generator().manual_seed(seed))


def model_and_logits(variant: str):  # noqa: ANN201
    model = make_model(variant)
    tokens = tokens_for(model.cfg)
    with torch.no_grad():
        return model, tokens, model(tokens)


# kinds whose forward hook switches to another (mathematically equal) computation, so float32 rounding
# differs by ~1e-7: scores/pattern need the explicit softmax(q k^T) instead of the fused SDPA kernel; result
# needs a per-head matmul then a sum over heads instead of one matmul over all heads; attn_in and q/k/v_input
# need per-head projections of per-head copies; a rewritable norm scale or normalised vector needs a
# hand-written norm dividing by the scale instead of F.layer_norm. Every other hook keeps the exact computation
# of the unhooked forward.
PATH_SWITCHING = {
    SiteKind.ATTN_SCORES,
    SiteKind.PATTERN,
    SiteKind.RESULT,
    SiteKind.ATTN_IN,
    SiteKind.Q_INPUT,
    SiteKind.K_INPUT,
    SiteKind.V_INPUT,
    SiteKind.LN1_SCALE,
    SiteKind.LN2_SCALE,
    SiteKind.LN_FINAL_SCALE,
    SiteKind.LN1_NORMALIZED,
    SiteKind.LN2_NORMALIZED,
    SiteKind.LN_FINAL_NORMALIZED,
    SiteKind.Q_NORM_SCALE,
    SiteKind.K_NORM_SCALE,
    SiteKind.Q_NORM_NORMALIZED,
    SiteKind.K_NORM_NORMALIZED,
}


@pytest.mark.parametrize("variant", NAMES)
def test_hook_names_are_exactly_the_applicable_sites(variant):
    model = make_model(variant)
    assert set(model.hook_names) == {s.name for s in all_sites(model.cfg)}


@pytest.mark.parametrize("variant", NAMES)
def test_every_hook_point_object_is_registered_once_under_its_own_name(variant):
    from interplab.hooks import HookPoint

    model = make_model(variant)
    found = [v for m in model.modules() for v in vars(m).values() if isinstance(v, HookPoint)]
    assert len({id(p) for p in found}) == len(found) == len(model.hook_points)
    assert all(model.hook_points[p.name] is p for p in found)
    assert model.hook_points["ln_final.hook_normalized"] is model.ln_final.hook_normalized
    if model.cfg.pre_norms:
        assert model.hook_points["blocks.1.ln1.hook_normalized"] is model.blocks[1].ln1.hook_normalized


@pytest.mark.parametrize("variant", NAMES)
def test_every_hook_fires_once_with_its_documented_shape(variant):
    model = make_model(variant)
    tokens = tokens_for(model.cfg)
    for site in all_sites(model.cfg):
        seen = []
        model.run_with_hooks(
            tokens, fwd_hooks=[(site.name, lambda x, s, seen=seen: seen.append((s, x.shape)))]
        )
        assert seen == [(site, torch.Size(expected_shape(model.cfg, site.kind)))], site.name
    # and all at once (the cache-everything path)
    _, cache = model.run_with_cache(tokens)
    assert sorted(cache.keys()) == sorted(s.name for s in all_sites(model.cfg))
    for site in all_sites(model.cfg):
        assert cache[site.name].shape == expected_shape(model.cfg, site.kind), site.name


@pytest.mark.parametrize("variant", NAMES)
def test_replacing_each_activation_with_itself_changes_nothing(variant):
    model, tokens, plain = model_and_logits(variant)
    for site in all_sites(model.cfg):
        with torch.no_grad():
            observed = model.run_with_hooks(tokens, fwd_hooks=[(site, lambda x, s: None)])
            replaced = model.run_with_hooks(tokens, fwd_hooks=[(site, lambda x, s: x.clone())])
        # same computation path: bit-identical
        assert_close(replaced, observed, atol=0, rtol=0, msg=site.name)
        if site.kind in PATH_SWITCHING:
            assert_close(replaced, plain, atol=2e-5, rtol=1e-5, msg=site.name)
        else:
            assert_close(replaced, plain, atol=0, rtol=0, msg=site.name)


@pytest.mark.parametrize("variant", NAMES)
def test_pattern_is_softmax_of_scores_and_results_sum_to_attn_out(variant):
    model = make_model(variant)
    cfg = model.cfg
    _, cache = model.run_with_cache(tokens_for(cfg), names=lambda n: "attn" in n)
    for layer in range(cfg.n_layers):
        scores, pattern = cache["attn_scores", layer], cache["pattern", layer]
        assert_close(pattern, torch.softmax(scores, dim=-1), atol=0, rtol=0)
        assert_close(pattern.sum(-1), torch.ones(B, cfg.n_heads, P))
        if cfg.causal:
            upper = torch.ones(P, P, dtype=torch.bool).triu(1)
            assert (pattern[..., upper] == 0).all()
        if not cfg.post_norms:  # with post norms hook_attn_out is normalised after the sum
            b_O = model.blocks[layer].attn.b_O
            assert_close(cache["result", layer].sum(2) + b_O, cache["attn_out", layer], atol=1e-5, rtol=1e-5)


def test_sliding_window_masks_distant_keys():
    model = make_model("gemma_like")
    _, cache = model.run_with_cache(tokens_for(model.cfg), names=lambda n: n.endswith("hook_pattern"))
    q, k = torch.arange(P)[:, None], torch.arange(P)[None, :]
    window = model.cfg.sliding_window
    outside = (q - k >= window) | (k > q)
    assert (cache["pattern", 0][..., outside] == 0).all()  # layer 0 slides
    assert (cache["pattern", 1][..., (q - k >= window) & (k <= q)] > 0).all()  # layer 1 is global


@pytest.mark.parametrize("variant", NAMES)
def test_decomposed_residual_stream_sums_to_last_resid_post(variant):
    model = make_model(variant)
    _, cache = model.run_with_cache(tokens_for(model.cfg))
    parts = cache.decompose_resid()
    assert_close(parts.sum(), cache["resid_post", model.cfg.n_layers - 1], atol=1e-5, rtol=1e-5)
    assert len(parts) == len(parts.labels) == parts.tensor.shape[0]
    mid = cache.decompose_resid(1)
    assert_close(mid.sum(), cache["resid_pre", 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", NAMES)
def test_split_qkv_input_path_equals_the_normal_path(variant):
    model = make_model(variant)
    tokens = tokens_for(model.cfg)
    names = lambda n: any(n.endswith(s) for s in ("hook_q", "hook_k", "hook_v", "hook_z"))  # noqa: E731
    plain, ref = model.run_with_cache(tokens, names=names)
    # a forward hook (even one that returns None) may rewrite the copies: the model takes the split path
    split, got = model.run_with_cache(
        tokens, names=names, fwd_hooks=[(lambda n: n.endswith("_input"), lambda x, s: None)]
    )
    assert_close(split, plain, atol=2e-5, rtol=1e-5)
    for name in ref:
        assert_close(got[name], ref[name], atol=2e-5, rtol=1e-5, msg=name)
    # each copy of the residual stream is the residual stream itself, whether only read or rewritable
    for fwd in ([], [(lambda n: n.endswith("_input"), lambda x, s: None)]):
        _, full = model.run_with_cache(
            tokens, names=lambda n: n.endswith(("_input", "resid_pre")), fwd_hooks=fwd
        )
        for layer in range(model.cfg.n_layers):
            resid = full["resid_pre", layer]
            for short in ("q_input", "k_input", "v_input"):
                copies = full[short, layer]
                assert_close(copies, resid[:, :, None].expand_as(copies), atol=0, rtol=0)


def test_cached_per_head_inputs_are_views_and_the_cache_counts_shared_memory_once():
    model = make_model("gpt2")
    tokens = tokens_for(model.cfg)
    _, resid = model.run_with_cache(tokens, names=lambda n: n.endswith("resid_pre"))
    _, both = model.run_with_cache(tokens, names=lambda n: n.endswith(("_input", "resid_pre")))
    assert resid.nbytes == model.cfg.n_layers * B * P * model.cfg.d_model * 4
    assert both.nbytes == resid.nbytes
    _, qkv = model.run_with_cache(tokens, names=lambda n: n.endswith(("hook_q", "hook_k", "hook_v")))
    assert qkv.nbytes == model.cfg.n_layers * 3 * B * P * model.cfg.d_model * 4


def test_patching_one_head_of_q_input_changes_only_that_head():
    model = make_model("rotary_neox_rms_gated_gqa")
    tokens = tokens_for(model.cfg)

    def patch(x, site):
        x = x.clone()
        x[:, :, 1] = 0.0
        return x

    _, clean = model.run_with_cache(tokens, names=lambda n: n.startswith("blocks.0.attn.hook_"))
    _, patched = model.run_with_cache(
        tokens,
        names=lambda n: n.startswith("blocks.0.attn.hook_"),
        fwd_hooks=[("blocks.0.hook_q_input", patch)],
    )
    q0, q1 = clean["q", 0], patched["q", 0]
    assert not torch.allclose(q0[:, :, 1], q1[:, :, 1])
    keep = [h for h in range(model.cfg.n_heads) if h != 1]
    assert_close(q1[:, :, keep], q0[:, :, keep], atol=2e-5, rtol=1e-5)
    assert_close(patched["k", 0], clean["k", 0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "rotary_neox_rms_gated_gqa", "smeared_keys", "gemma_like"])
def test_backward_hooks_give_autograd_gradients(variant):
    model = make_model(variant)
    tokens = tokens_for(model.cfg)
    sites = [
        s
        for s in all_sites(model.cfg)
        if s.kind not in (SiteKind.ATTN_IN, SiteKind.Q_INPUT, SiteKind.K_INPUT, SiteKind.V_INPUT)
    ]
    acts, grads = {}, {}

    def keep(x, site):
        x.retain_grad()
        acts[site] = x

    def grad_of(g, site):
        grads[site] = g.clone()

    fwd = [(s, keep) for s in sites]
    bwd = [(s, grad_of) for s in sites]
    with model.hooks(fwd, bwd):
        logits = model(tokens)
        (logits.log_softmax(-1)[:, -1, 0].sum() + logits.pow(2).mean()).backward()
    assert set(grads) == set(sites)
    for site in sites:
        assert acts[site].grad is not None, site.name
        assert_close(grads[site], acts[site].grad, atol=0, rtol=0, msg=site.name)


def test_backward_hook_on_a_frozen_model_still_sees_gradients():
    model = make_model("gpt2").requires_grad_(False)
    grads = []
    logits = model.run_with_hooks(
        tokens_for(model.cfg), bwd_hooks=[(("resid_mid", 1), lambda g, s: grads.append(g))]
    )
    logits.sum().backward()
    assert len(grads) == 1 and grads[0].shape == (B, P, model.cfg.d_model) and grads[0].abs().sum() > 0


def test_hook_can_rescale_gradient():
    model = make_model("gpt2")
    site = ("resid_pre", 1)
    tokens = tokens_for(model.cfg)

    def grad_at(bwd):
        seen = {}
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[(("resid_pre", 0), lambda x, s: seen.setdefault("x", x))], bwd_hooks=bwd
        )
        seen["x"].retain_grad()
        logits.sum().backward()
        return seen["x"].grad

    base = grad_at([])
    doubled = grad_at([(site, lambda g, s: 2 * g)])
    assert_close(doubled, 2 * base)


def no_hooks_left(model) -> bool:  # noqa: ANN001
    return not model.hook_registry.any_active


def test_hooks_are_removed_after_the_context_and_after_errors():
    model = make_model("gpt2")
    tokens = tokens_for(model.cfg)
    calls = []
    with model.hooks(
        [(("resid_pre", 0), lambda x, s: calls.append(1))],
        [(("resid_post", 1), lambda g, s: calls.append(2))],
    ):
        assert not no_hooks_left(model)
        model(tokens).sum().backward()
    assert calls == [1, 2] and no_hooks_left(model)
    model(tokens).sum().backward()  # a new forward after the context runs no hook
    assert calls == [1, 2]

    def boom(x, site):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        model.run_with_hooks(tokens, fwd_hooks=[(("z", 1), boom), (("resid_pre", 0), lambda x, s: None)])
    assert no_hooks_left(model)
    with pytest.raises(RuntimeError, match="hook failed"), model.hooks(bwd_hooks=[(("mlp_out", 0), boom)]):
        model(tokens).sum().backward()
    assert no_hooks_left(model)
    with (
        pytest.raises(ValueError, match="out of range"),
        model.hooks([(("resid_pre", 0), lambda x, s: None)]),
    ):
        model(torch.tensor([[model.cfg.d_vocab]]))
    assert no_hooks_left(model)
    with pytest.raises(ZeroDivisionError), model.hooks([(("resid_pre", 0), lambda x, s: None)]):
        raise ZeroDivisionError
    assert no_hooks_left(model)
    # a bad name among good ones attaches nothing
    with (
        pytest.raises(ValueError, match="unknown hook point"),
        model.hooks([(("resid_pre", 0), boom), ("blocks.0.hook_nope", boom)]),
    ):
        pass
    assert no_hooks_left(model)
    model(tokens)


def test_errors_name_the_bad_value():
    model = make_model("gpt2")
    cfg = model.cfg
    with pytest.raises(ValueError, match=r"'blocks\.0\.hook_resid_psot'.*hook_resid_post"):
        model.run_with_hooks(tokens_for(cfg), fwd_hooks=[("blocks.0.hook_resid_psot", lambda x, s: None)])
    with pytest.raises(ValueError, match=r"blocks\.7\.hook_resid_pre.*2 layers"):
        model.run_with_hooks(tokens_for(cfg), fwd_hooks=[("blocks.7.hook_resid_pre", lambda x, s: None)])
    with pytest.raises(ValueError, match="resid_mid.*parallel"):
        make_model("rotary_gptj_partial_parallel").run_with_cache(tokens_for(cfg), names=[("resid_mid", 0)])
    with pytest.raises(ValueError, match=f"token id {cfg.d_vocab + 5}.*d_vocab={cfg.d_vocab}"):
        model(torch.tensor([[1, cfg.d_vocab + 5]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match=f"{cfg.n_ctx + 1} tokens.*n_ctx={cfg.n_ctx}"):
        model(torch.zeros(1, cfg.n_ctx + 1, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match=r"hook .* at blocks\.1\.attn\.hook_z returned shape \(2, 7, 4\), expected \(2, 7, 4, 4\)",
    ):
        model.run_with_hooks(tokens_for(cfg), fwd_hooks=[(("z", 1), lambda x, s: x[..., 0])])
    with pytest.raises(TypeError, match="returned float"):
        model.run_with_hooks(tokens_for(cfg), fwd_hooks=[(("z", 1), lambda x, s: 1.0)])
    with pytest.raises(ValueError, match=r"backward hook at blocks\.0\.hook_mlp_out returned shape"):
        model.run_with_hooks(
            tokens_for(cfg), bwd_hooks=[(("mlp_out", 0), lambda g, s: g[0])]
        ).sum().backward()
    with pytest.raises(TypeError, match="integers"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="filter matched no hook point"):
        model.run_with_hooks(tokens_for(cfg), fwd_hooks=[(lambda n: False, lambda x, s: None)])


def test_cache_helpers():
    model = make_model("gpt2")
    tokens = tokens_for(model.cfg)
    logits, cache = model.run_with_cache(
        tokens, names=[("resid_post", 0), "blocks.1.hook_resid_post", "ln_final.hook_scale", ("pattern", 1)]
    )
    assert cache["resid_post", 1] is cache["blocks.1.hook_resid_post"]
    assert ("resid_post", 0) in cache and ("resid_pre", 0) not in cache
    assert cache.stack("resid_post").shape == (2, B, P, model.cfg.d_model)
    assert cache.nbytes == sum(t.numel() * 4 for t in cache._store.values())
    with pytest.raises(KeyError, match="not in the cache"):
        cache["resid_pre", 0]
    # applying the cached final norm scale reproduces the logits (weights applied by hand)
    final = cache["resid_post", 1]
    normed = cache.apply_ln_to_stack(final[None])[0] * model.ln_final.w + model.ln_final.b
    assert_close(normed @ model.W_U + model.unembed.b_U, logits, atol=1e-5, rtol=1e-5)
    assert not any(t.requires_grad for t in cache._store.values())
    _, with_grad = model.run_with_cache(tokens, names=("resid_post", 1), grad=True)
    assert with_grad["resid_post", 1].requires_grad


def test_stop_at_layer_returns_the_residual_stream():
    model = make_model("rotary_neox_rms_gated_gqa")
    tokens = tokens_for(model.cfg)
    _, cache = model.run_with_cache(tokens, names=("resid_pre", 1))
    with torch.no_grad():
        assert_close(model(tokens, stop_at_layer=1), cache["resid_pre", 1], atol=0, rtol=0)


def test_hook_shapes_lists_every_point():
    model = make_model("gpt2")
    shapes = model.hook_shapes(batch=B, pos=P)
    assert set(shapes) == set(model.hook_names)
    assert shapes["blocks.0.attn.hook_pattern"] == (B, model.cfg.n_heads, P, P)


def test_decompose_resid_names_what_is_missing():
    model = make_model("gpt2")
    _, cache = model.run_with_cache(tokens_for(model.cfg), names=lambda n: "resid" in n)
    with pytest.raises(KeyError, match=r"decompose_resid needs 6 components, 6 not cached: \['hook_embed'"):
        cache.decompose_resid()
    with pytest.raises(ValueError, match="layer must be in 0..2, got 3"):
        cache.decompose_resid(3)


@pytest.mark.parametrize("variant", NAMES)
def test_caching_leaves_logits_bit_identical_except_where_attention_must_be_explicit(variant):
    model, tokens, plain = model_and_logits(variant)
    logits, cache = model.run_with_cache(tokens, names=lambda n: not n.endswith(("attn_scores", "pattern")))
    assert_close(logits, plain, atol=0, rtol=0)
    # caching the pattern switches to the explicit softmax(q k^T / scale) v: equal up to float rounding
    logits_all, _ = model.run_with_cache(tokens)
    assert_close(logits_all, plain, atol=2e-5, rtol=1e-5)


def test_cached_pos_embed_is_not_a_view_of_the_weights():
    model = make_model("gpt2")
    before = model.pos_embed.W_pos.detach().clone()
    _, cache = model.run_with_cache(tokens_for(model.cfg), names="hook_pos_embed")
    cache["hook_pos_embed"][0] += 1.0
    assert torch.equal(model.pos_embed.W_pos, before)


def test_read_hooks_through_model_hooks_see_what_forward_hooks_see():
    model = make_model("rotary_neox_rms_gated_gqa")
    tokens = tokens_for(model.cfg)
    names = lambda n: n.endswith(("_input", "hook_result", "hook_mlp_in", "ln1.hook_scale"))  # noqa: E731
    read, fwd = {}, {}
    with torch.no_grad(), model.hooks(read_hooks=[(names, lambda x, s: read.__setitem__(s.name, x.clone()))]):
        plain = model(tokens)
    with torch.no_grad(), model.hooks([(names, lambda x, s: fwd.__setitem__(s.name, x.clone()))]):
        model(tokens)
    with torch.no_grad():
        assert_close(plain, model(tokens), atol=0, rtol=0)
    assert read.keys() == fwd.keys()
    for name in read:
        assert_close(read[name], fwd[name], atol=2e-5, rtol=1e-5, msg=name)
