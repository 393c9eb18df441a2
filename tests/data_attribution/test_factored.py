"""Factorised (LoGra) projections equal the Kronecker projection of exact per-example gradients; (E)K-FAC
influence equals exact influence where the Kronecker factorisation is exact and is close on digits."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from interplab.data_attribution import lds, lm_loss, methods, param_group, per_example_grads
from interplab.data_attribution.factored import (
    FactoredProjector,
    factored_dots,
    factored_grads,
    gain_sites,
    linear_sites,
    lm_losses,
)
from interplab.data_attribution.kfac import EKFAC, ekfac_influence
from interplab.model import ModelConfig, Transformer


def _exact_by_param(model, tokens, names):
    grp = param_group(model, "re:^(" + "|".join(re.escape(n) for n in names) + ")$")
    g = per_example_grads(model, lm_loss, tokens, grp)
    params, out, i = dict(model.named_parameters()), {}, 0
    for s in grp.slices:
        k = params[s.name].numel()
        out[s.name] = g[:, i : i + k].reshape(g.shape[0], *params[s.name].shape)
        i += k
    return out


@pytest.mark.parametrize(
    "variant",
    [
        {"attn_only": False, "d_mlp": 32},
        {"attn_only": True, "smear_keys": True},
        {"attn_only": False, "d_mlp": 32, "act_fn": "silu", "gated_mlp": True},
    ],
)
def test_factored_equals_kronecker_projection_of_exact_grads(variant):
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=20, n_ctx=8, positional="rotary", **variant)
    )
    tokens = torch.randint(0, 20, (5, 8))
    proj = FactoredProjector(linear_sites(model), dim_in=4, dim_out=6, seed=3)
    feats = factored_grads(model, lm_losses, tokens, proj, chunk_size=2)
    ref = proj.project_grads(_exact_by_param(model, tokens, proj.param_names))
    assert feats.shape == (5, proj.dim)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    # unprojected sides: the features are the exact gradients themselves (weight then bias column)
    full = FactoredProjector(linear_sites(model, include="unembed"), dim_in=10**6, dim_out=10**6)
    exact = _exact_by_param(model, tokens, full.param_names)
    parts = [exact["unembed.W_U"].transpose(1, 2)] + [exact[b][..., None] for b in full.param_names[1:]]
    want = torch.cat(parts, 2).flatten(1)
    torch.testing.assert_close(factored_grads(model, lm_losses, tokens, full), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "variant", [{"attn_only": True, "smear_keys": True}, {"attn_only": False, "d_mlp": 32}]
)
def test_one_projector_serves_every_checkpoint(variant):
    """A projector built on one model projects another model of the same config (TracIn uses one projection
    for all checkpoints): it reads the given model's activations, not those of the model it was built from."""
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=20, n_ctx=8, positional="rotary", **variant)
    torch.manual_seed(0)
    built_on, other = Transformer(cfg), Transformer(cfg)
    tokens = torch.randint(0, 20, (4, 8))
    proj = FactoredProjector(linear_sites(built_on), dim_in=4, dim_out=6, seed=1)
    ref = proj.project_grads(_exact_by_param(other, tokens, proj.param_names))
    torch.testing.assert_close(factored_grads(other, lm_losses, tokens, proj), ref, rtol=1e-5, atol=1e-5)
    lin_a, lin_b = nn.Linear(3, 2), nn.Linear(3, 2)
    lin_proj = FactoredProjector(linear_sites(lin_a), dim_in=2, dim_out=2)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))

    def ce(m, xx, yy):
        return F.cross_entropy(m(xx), yy, reduction="none")

    exact = [
        torch.autograd.grad(ce(lin_b, x[i : i + 1], y[i : i + 1]).sum(), [lin_b.weight, lin_b.bias])
        for i in range(5)
    ]
    want = lin_proj.project_grads(
        {"weight": torch.stack([e[0] for e in exact]), "bias": torch.stack([e[1] for e in exact])}
    )
    torch.testing.assert_close(factored_grads(lin_b, ce, (x, y), lin_proj), want, rtol=1e-5, atol=1e-6)


def test_factored_bad_input():
    with pytest.raises(ValueError, match="no linear site"):
        linear_sites(nn.Linear(3, 2), include="nothing")
    with pytest.raises(ValueError, match="must be positive"):
        FactoredProjector(linear_sites(nn.Linear(3, 2)), dim_in=0)
    lin = nn.Linear(3, 2)
    proj = FactoredProjector(linear_sites(lin))
    with pytest.raises(ValueError, match="losses"):
        factored_grads(lin, lambda m, x: m(x).sum(), torch.randn(4, 3), proj)


def test_from_matrices_projects_with_the_given_matrices():
    """A projector from given matrices equals the seeded one when handed its matrices, projects exact gradients
    with them (weight and bias), leaves a ``None`` side unprojected, and a ``P_in`` without the bias row drops
    the bias's gradient (a zero row, not a shifted one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))

    def ce(m, xx, yy):
        return F.cross_entropy(m(xx), yy, reduction="none")

    sites = linear_sites(model)
    seeded = FactoredProjector(sites, dim_in=2, dim_out=2, seed=4)
    same = FactoredProjector.from_matrices(sites, seeded.p_in, seeded.p_out)
    assert same.shapes == seeded.shapes and same.dim == seeded.dim and same.seed is None
    torch.testing.assert_close(
        factored_grads(model, ce, (x, y), same), factored_grads(model, ce, (x, y), seeded)
    )
    exact = {n: [] for n in ("0.weight", "0.bias", "2.weight", "2.bias")}
    for i in range(6):
        gs = torch.autograd.grad(ce(model, x[i : i + 1], y[i : i + 1]).sum(), list(model.parameters()))
        for n, g in zip(exact, gs, strict=True):
            exact[n].append(g)
    grads = {n: torch.stack(v) for n, v in exact.items()}
    a, c = torch.randn(5, 2), torch.randn(3, 2)
    proj = FactoredProjector.from_matrices(sites, [a, None], [None, c])
    assert proj.shapes == ((4, 2), (2, 5))
    feats = factored_grads(model, ce, (x, y), proj)
    first = grads["0.weight"] @ a  # the bias coordinate's row of P_in is zero: the bias gradient is left out
    second = torch.einsum("nod,ok->nkd", torch.cat([grads["2.weight"], grads["2.bias"][..., None]], 2), c)
    torch.testing.assert_close(
        feats, torch.cat([first.flatten(1), second.flatten(1)], 1), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(feats, proj.project_grads(grads), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"one P_in and one P_out per site: 2 site\(s\), got 1 P_in"):
        FactoredProjector.from_matrices(sites, [a], [None, c])
    with pytest.raises(
        ValueError, match=r"P_in of site 0 must be \[d_in, k_in\] with d_in in \[5, 6\].*\(4, 2\)"
    ):
        FactoredProjector.from_matrices(sites, [torch.randn(4, 2), None], [None, c])
    with pytest.raises(ValueError, match=r"P_out of site 2 must be \[d_out=3, k_out\], got \(4, 2\)"):
        FactoredProjector.from_matrices(sites, [a, None], [None, torch.randn(4, 2)])


def _cartesian_regression():
    """MSE linear regression on every pair (x_i, r_j) with targets y = W x_i - r_j: the output gradient is r_j,
    independent of x, and E[r r^T] = I, so the Fisher is exactly A (x) I = the Hessian (K-FAC is exact)."""
    torch.manual_seed(0)
    d_in, d_out = 5, 3
    x = torch.randn(7, d_in)
    r = torch.cat([torch.eye(d_out), -torch.eye(d_out)]) * d_out**0.5
    lin = nn.Linear(d_in, d_out, bias=False)
    xs, rs = x.repeat_interleave(len(r), 0), r.repeat(len(x), 1)
    ys = xs @ lin.weight.detach().T - rs
    hessian = torch.kron(torch.eye(d_out), xs.T @ xs / len(xs))
    return lin, xs, ys, rs, hessian


def _mse(m, x, y):
    return 0.5 * (m(x) - y).pow(2).sum(-1)


@pytest.mark.parametrize("corrected", [True, False])
def test_ekfac_influence_is_exact_where_kronecker_is_exact(corrected):
    lin, xs, ys, rs, hessian = _cartesian_regression()
    proj = FactoredProjector(linear_sites(lin), dim_in=100, dim_out=100)
    feats = factored_grads(lin, _mse, (xs, ys), proj)
    torch.testing.assert_close(feats.reshape(-1, 3, 5), torch.einsum("no,ni->noi", rs, xs))
    curv = EKFAC.fit(lin, _mse, (xs, ys), proj, corrected=corrected)
    torch.testing.assert_close(curv.matrix().float(), hessian, rtol=1e-5, atol=1e-5)
    queries = torch.randn(4, 15)
    exact = methods.influence(hessian, feats, queries, damping=1e-3)
    ours = ekfac_influence(curv, feats, queries, damping=1e-3, relative_damping=False)
    torch.testing.assert_close(ours, exact, rtol=1e-4, atol=1e-6)


def test_ekfac_close_to_exact_influence_on_digits():
    """Softmax regression on digits: the Kronecker factorisation is not exact (the output Hessian depends on
    x). Measured: exact-Hessian influence LDS 0.974; EK-FAC (true Fisher, 8 sampled labels per example, damping
    = l2) 0.908, K-FAC 0.907."""
    from interplab.data_attribution.convex import _test_losses, digits, fit

    l2 = 1e-2
    x, y, xt, yt = digits(600, 64, 0)
    gen = torch.Generator().manual_seed(1)
    subsets = torch.rand(30, 600, generator=gen) < 0.5
    actual = torch.stack([_test_losses(fit(x[s], y[s], l2=l2), xt, yt) for s in subsets])
    full = fit(x, y, l2=l2).float()

    def ce(m, a, b):
        return F.cross_entropy(m(a), b, reduction="none")

    proj = FactoredProjector(linear_sites(full), dim_in=100, dim_out=100)
    train = factored_grads(full, ce, (x.float(), y), proj, chunk_size=600)
    test = factored_grads(full, ce, (xt.float(), yt), proj)
    with torch.no_grad():
        p = F.softmax(full(x.float()), -1)
    sampled = torch.multinomial(p, 8, replacement=True, generator=torch.Generator().manual_seed(0)).T.reshape(
        -1
    )
    curv = EKFAC.fit(full, ce, (x.float().repeat(8, 1), sampled), proj, chunk_size=10_000)
    score = float(
        lds(ekfac_influence(curv, train, test, damping=l2, relative_damping=False), subsets, actual).mean()
    )
    assert score > 0.85, score


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_next_token_losses_equal_sliced_cross_entropy(scale):
    """The fused loss equals slicing + F.cross_entropy in value and gradient, also where a target's probability
    underflows float32 (scale 300: losses of hundreds of nats, the log-sum-exp fallback)."""
    from interplab.data_attribution.factored import next_token_losses

    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 11) * scale).requires_grad_(True)
    tokens = torch.randint(0, 11, (3, 7))
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    ref = ref.view(3, -1).mean(1)
    ours = next_token_losses(logits, tokens)
    assert torch.isfinite(ours).all()
    w = torch.randn(3)
    (want,) = torch.autograd.grad((ref * w).sum(), logits)
    (got,) = torch.autograd.grad((ours * w).sum(), logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(got, want)


def test_factored_chunking_and_frozen_parameters():
    """The default chunk (by positions) and one example per chunk give the same features; no parameter
    gradient is accumulated and the parameters' requires_grad flags come back as they were."""
    from interplab.data_attribution.factored import default_chunk_size

    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=20, n_ctx=8, d_mlp=32))
    model.embed.W_E.requires_grad_(False)
    tokens = torch.randint(0, 20, (6, 8))
    proj = FactoredProjector(linear_sites(model), dim_in=4, dim_out=4)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    assert default_chunk_size(tokens) == 256 and default_chunk_size(tokens.float()) == 256
    assert default_chunk_size(torch.zeros(2, 1024, dtype=torch.long)) == 2
    torch.testing.assert_close(
        factored_grads(model, lm_losses, tokens, proj),
        factored_grads(model, lm_losses, tokens, proj, chunk_size=1),
        rtol=1e-5,
        atol=1e-6,
    )
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="chunk_size"):
        factored_grads(model, lm_losses, tokens, proj, chunk_size=0)


@pytest.mark.parametrize("embed_scale", [None, 3.0])
def test_embedding_site_equals_kronecker_projection_of_exact_grads(embed_scale):
    """The token embedding as a linear map of the one-hot token (times embed_scale): projected (a row of P_in
    per token), exact (dim_in >= vocab: the one-hot itself) and rescaled (a preconditioner's site scales) it
    equals the same projection of the exact per-example W_E gradient."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=16, n_layers=2, n_heads=2, d_vocab=20, n_ctx=8, positional="rotary", d_mlp=32,
        embed_scale=embed_scale,
    )  # fmt: skip
    model = Transformer(cfg)
    tokens = torch.randint(0, 20, (5, 8))
    sites = linear_sites(model, embedding=True)
    assert sites[0].name == "embed" and sites[0].one_hot and len(sites) == len(linear_sites(model)) + 1
    exact = _exact_by_param(model, tokens, [s.weight for s in sites] + [s.bias for s in sites if s.bias])
    for dim_in in (4, 100):
        proj = FactoredProjector(sites, dim_in=dim_in, dim_out=6, seed=2)
        feats = factored_grads(model, lm_losses, tokens, proj, chunk_size=2)
        torch.testing.assert_close(feats, proj.project_grads(exact), rtol=1e-5, atol=1e-5)
    want = exact["embed.W_E"].transpose(1, 2).flatten(1)  # unprojected: the exact gradient, [d_model, vocab]
    proj = FactoredProjector(sites[:1], dim_in=100, dim_out=100)
    torch.testing.assert_close(factored_grads(model, lm_losses, tokens, proj), want, rtol=1e-5, atol=1e-6)
    # a rank-one elementwise rescaling (site scales) of the embedding's one-hot inputs and output gradients
    s_in, s_out = torch.rand(20) + 0.5, torch.rand(16) + 0.5
    scaled = {k: v * (s_out[:, None] * s_in[None]).T for k, v in exact.items() if k == "embed.W_E"}
    for dim_in in (4, 100):
        proj = FactoredProjector(sites[:1], dim_in=dim_in, dim_out=6, seed=1)
        got = factored_grads(model, lm_losses, tokens, proj, scales=[(s_in, s_out)])
        torch.testing.assert_close(got, proj.project_grads(scaled), rtol=1e-5, atol=1e-5)
    assert "embed_tokens" not in model.__dict__  # the capture put the class's method back


def test_embedding_site_refuses_tied_embeddings_and_frozen_embeddings_are_skipped():
    cfg = dict(d_model=16, n_layers=1, n_heads=2, d_vocab=20, n_ctx=8, attn_only=True)
    tied = Transformer(ModelConfig(**cfg, tie_embeddings=True))
    with pytest.raises(ValueError, match="tie_embeddings=True is also its unembedding"):
        linear_sites(tied, embedding=True)
    frozen = Transformer(ModelConfig(**cfg))
    frozen.embed.W_E.requires_grad_(False)
    assert [s.name for s in linear_sites(frozen, embedding=True)] == [s.name for s in linear_sites(frozen)]


@pytest.mark.parametrize(
    "variant", [{"d_mlp": 32, "embed_scale": 2.0}, {"attn_only": True, "smear_keys": True}]
)
def test_factored_dots_equal_exact_gradient_dot_products(variant):
    """<grad_i, v> over every linear map and the embedding, from the maps' inputs and output gradients: equal
    to the dot products of exact per-example gradients with each vector (no projection)."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=20, n_ctx=8, positional="rotary", **variant)
    model = Transformer(cfg)
    tokens = torch.randint(0, 20, (5, 8))
    sites = linear_sites(model, embedding=True)
    names = [p for s in sites for p in s.params]
    exact = _exact_by_param(model, tokens, names)
    params = dict(model.named_parameters())
    vectors = [{k: torch.randn_like(params[k]) for k in names} for _ in range(3)]
    got = factored_dots(model, lm_losses, tokens, sites, vectors, chunk_size=2)
    want = torch.stack([sum((exact[k] * v[k]).flatten(1).sum(1) for k in names) for v in vectors], dim=1)
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least one vector"):
        factored_dots(model, lm_losses, tokens, sites, [])
    with pytest.raises(ValueError, match="every vector needs an entry for blocks.0.attn.b_Q"):
        factored_dots(
            model, lm_losses, tokens, sites, [{k: v for k, v in vectors[0].items() if "b_Q" not in k}]
        )


def _plain_dots(model, tokens, vector):
    """<grad_i, vector> by one plain backward pass per example over the parameters ``vector`` names."""
    params = dict(model.named_parameters())
    names = list(vector)
    rows = []
    for t in tokens:
        grads = torch.autograd.grad(lm_losses(model, t[None])[0], [params[k] for k in names])
        rows.append(sum((g * vector[k]).sum() for k, g in zip(names, grads, strict=True)))
    return torch.stack(rows)


def _perturbed(cfg):
    """A model whose norm gains and biases and smear gates are away from their initial 1 / 0 (so a wrong
    gain gradient cannot hide behind w = 1)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w", ".b", "smear")):
                p.add_(0.5 * torch.randn_like(p))
    return model


GAIN_VARIANTS = [
    {"smear_keys": True},  # LayerNorm gains and biases (induction-2l's kind), smear gates
    {"normalization": "rmsnorm", "qk_norm": "head", "smear_keys": True, "n_kv_heads": 1},
    {"normalization": "rmsnorm", "qk_norm": "full", "post_norms": True, "attn_only": False, "d_mlp": 32},
    {"qk_norm": "full", "n_kv_heads": 1, "smear_keys": True},  # a key norm repeated per query head
]


@pytest.mark.parametrize("variant", GAIN_VARIANTS)
def test_gain_sites_dots_equal_plain_backward_passes(variant):
    """Norm gains / biases (LayerNorm, RMSNorm, per-head and full-width q/k norms, post norms) and key-smearing
    gates (also under grouped-query attention): with the linear maps, factored_dots gives <grad_i, v> over
    every parameter they cover, equal to plain per-example backward passes to 1e-5."""
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=20, n_ctx=8, positional="rotary", **variant)
    model = _perturbed(cfg)
    tokens = torch.randint(0, 20, (5, 8))
    gains = gain_sites(model)
    names = [p for s in gains for p in s.params]
    assert any(n.endswith(".w") for n in names) and all(
        n.split(".")[-1] in ("w", "b", "smear") for n in names
    )
    assert any(n.endswith("smear") for n in names) == cfg.smear_keys
    params = dict(model.named_parameters())
    v = {k: torch.randn_like(params[k]) for k in names}
    got = factored_dots(model, lm_losses, tokens, gains, [v], chunk_size=2)[:, 0]
    torch.testing.assert_close(got, _plain_dots(model, tokens, v), rtol=1e-5, atol=1e-5)
    # with the linear maps: every parameter their sites cover, in one pass
    sites = [*linear_sites(model, embedding=True), *gains]
    every = {k: torch.randn_like(params[k]) for s in sites for k in s.params}
    got = factored_dots(
        model, lm_losses, tokens, sites, [every, v | {k: 0 * x for k, x in every.items() if k not in v}]
    )
    torch.testing.assert_close(got[:, 0], _plain_dots(model, tokens, every), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 1], _plain_dots(model, tokens, v), rtol=1e-5, atol=1e-5)


def test_run_features_cover_every_parameter_exactly():
    """attribute_run's default features: the dot product with a target's gradient over the whole group, exact,
    on a model with learned positions (no site: exact per-example gradients) and grouped-query keys (no site
    either), for the whole model and for one layer."""
    from interplab.data_attribution import Target
    from interplab.data_attribution.run import _features, group_sites

    cfg = ModelConfig(
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_vocab=20,
        n_ctx=8,
        positional="learned",
        n_kv_heads=1,
        smear_keys=True,
    )
    model = _perturbed(cfg)
    tokens = torch.randint(0, 20, (5, 8))
    probe = torch.arange(8)[None]
    target = Target("logits", lambda m: m(probe).float().pow(2).mean())
    params = dict(model.named_parameters())
    for spec in ("all", "layer:1"):
        grp = param_group(model, spec)
        sites, rest = group_sites(model, grp)
        if spec == "all":
            assert (
                rest is not None
                and "pos_embed.W_pos" in rest.param_names
                and "blocks.0.attn.W_K" in rest.param_names
            )
        dots, tg = _features(model, grp, target, tokens, "factored", 64, 0)(model)
        assert tg.tolist() == [1.0]
        # the truth: flat per-example gradients of the group's slices, by plain backward passes
        value = target(model)
        tgrad = grp.flatten(
            dict(
                zip(
                    grp.param_names,
                    torch.autograd.grad(value, [params[k] for k in grp.param_names]),
                    strict=True,
                )
            )
        )
        want = []
        for t in tokens:
            g = torch.autograd.grad(lm_losses(model, t[None])[0], [params[k] for k in grp.param_names])
            want.append(grp.flatten(dict(zip(grp.param_names, g, strict=True))) @ tgrad)
        torch.testing.assert_close(dots[:, 0], torch.stack(want), rtol=1e-5, atol=1e-6)
