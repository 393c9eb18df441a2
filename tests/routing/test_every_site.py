"""Routes at every hook point of several architectures: the forward is bit-identical (the model stays on its
fast path even where that path never builds the routed tensor), and the gradient is the route's definition,
``m * a + (1 - m) * a.detach()``, computed independently."""

import pytest
import torch

from interplab.model import ModelConfig, Transformer
from interplab.routing import Axis, Route, Router

ARCHITECTURES = {
    "gpt2-like": ModelConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=40, n_ctx=12, d_mlp=48),
    "llama-like": ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_vocab=40, n_ctx=12, d_mlp=48,
                              normalization="rmsnorm", positional="rotary", gated_mlp=True, act_fn="silu"),
    "neox-like": ModelConfig(d_model=24, n_layers=2, n_heads=3, d_vocab=40, n_ctx=12, d_mlp=40,
                             positional="rotary", parallel_attn_mlp=True),
    "attn-only-smeared": ModelConfig(d_model=32, n_layers=2, n_heads=2, d_vocab=40, n_ctx=12, attn_only=True,
                                     positional="rotary", smear_keys=True),
}  # fmt: skip
BATCH, POS = 5, 9
LABELS = torch.tensor([0, 1, 2, -1, 1])


def _setup(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ARCHITECTURES[name]).to(dtype)
    tokens = torch.randint(0, 40, (BATCH, POS))
    shapes = {}
    with model.hook_registry.scoped(
        read_hooks=[(lambda n: True, lambda x, s: shapes.setdefault(s.name, x.shape))]
    ):
        model(tokens)
    return model, tokens, shapes


def _routes(shapes):
    """A route with random weights (negative ones too) for every hook point, on the last axis and, for
    [batch pos head d] sites, on the head axis."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for site, shape in shapes.items():
        axes = [Axis.LAST] + (
            [Axis.HEAD] if len(shape) == 4 and "pattern" not in site and "scores" not in site else []
        )
        for axis in axes:
            width = shape[-2] if axis is Axis.HEAD else shape[-1]
            weights = torch.rand(3, width, generator=gen) * 2 - 0.5
            out.append(Route(site=site, weights=weights, axis=axis, unlabelled=0.25))
    return out


def _loss(logits):
    return (logits.float().logsumexp(-1) * torch.linspace(0.5, 1.5, logits.shape[1])).mean()


def _grads(model, tokens, fwd_hooks=(), router=None):
    model.zero_grad(set_to_none=True)
    with model.hook_registry.scoped(fwd_hooks=list(fwd_hooks)):
        if router is None:
            logits = model(tokens)
        else:
            with router.apply(model, LABELS):
                logits = model(tokens)
    _loss(logits).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _definition(route):
    """The route as its definition, a forward hook (it puts the model on its explicit paths). Masked attention
    scores are -inf, where the formula gives nan: there the gradient is multiplied by a tensor hook instead."""

    def fn(x, _site):
        m = route.mask(LABELS, x.shape).to(x.dtype)
        if not torch.isfinite(x).all():
            x = x.clone()
            x.register_hook(lambda g: g * m)
            return x
        return m * x + (1 - m) * x.detach()

    return fn


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_forward_is_bit_identical_with_a_route_at_every_site(name):
    model, tokens, shapes = _setup(name)
    assert {"blocks.0.attn.hook_result", "blocks.1.attn.hook_pattern", "blocks.0.hook_q_input",
            "blocks.1.ln1.hook_scale", "ln_final.hook_scale", "blocks.0.attn.hook_attn_scores"} <= set(shapes)  # fmt: skip
    reference = model(tokens)
    model.train()  # routes are for training; dropout-free models compute the same in both modes
    for route in _routes(shapes):
        with Router([route]).apply(model, LABELS):
            logits = model(tokens)
        assert torch.equal(logits, reference), (route.site, route.axis)
        _loss(logits).backward()  # the backward runs (and the grads are checked below)
    with Router(_routes(shapes)[::3]).apply(model, LABELS):  # many routes at once
        assert torch.equal(model(tokens), reference)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_routed_gradient_is_the_definition_at_every_site(name):
    # float64, so the fast and explicit paths agree far below the tolerance and any wrong gradient shows
    model, tokens, shapes = _setup(name, torch.float64)
    _, plain = _grads(model, tokens)
    for route in _routes(shapes):
        _, routed = _grads(model, tokens, router=Router([route]))
        _, reference = _grads(model, tokens, fwd_hooks=[(route.site, _definition(route))])
        assert routed.keys() == reference.keys(), route.site
        for param in reference:
            torch.testing.assert_close(routed[param], reference[param], rtol=1e-9, atol=1e-12,
                                       msg=lambda m, p=param, r=route: f"{r.site} ({r.axis.value}) {p}: {m}")  # fmt: skip
        assert any(not torch.allclose(routed[p], plain[p]) for p in plain), f"{route.site} changed nothing"


@pytest.mark.parametrize("name", ["gpt2-like", "llama-like"])
def test_a_zero_route_blocks_exactly_in_float32(name):
    """Blocking every coordinate for every group at a site the fast path never builds leaves the parameters
    only upstream of it with exactly zero gradient (float32, no tolerance)."""
    model, tokens, shapes = _setup(name)
    for site, upstream in [("blocks.0.attn.hook_result", ["blocks.0.attn.W_Q", "blocks.0.attn.W_O"]),
                           ("blocks.0.attn.hook_pattern", ["blocks.0.attn.W_Q", "blocks.0.attn.W_K"]),
                           ("blocks.1.ln1.hook_scale", [])]:  # fmt: skip
        width = shapes[site][-1]
        route = Route(site=site, weights=torch.zeros(3, width), unlabelled=0.0)
        _, routed = _grads(model, tokens, router=Router([route]))
        for param in upstream:
            assert param not in routed or torch.count_nonzero(routed[param]) == 0, (site, param)
        assert any(torch.count_nonzero(g) for g in routed.values())  # the rest still learns


def test_route_weights_edited_in_place_are_used_and_the_input_tensor_is_copied():
    model, tokens, shapes = _setup("gpt2-like")
    source = torch.ones(3, 32)
    route = Route(site="blocks.0.hook_resid_post", weights=source, unlabelled=1.0)
    _, before = _grads(model, tokens, router=Router([route]))
    source.zero_()  # the caller's tensor: the route holds its own copy
    assert torch.equal(route.weights, torch.ones(3, 32))
    _, same = _grads(model, tokens, router=Router([route]))
    assert all(torch.equal(before[p], same[p]) for p in before)
    route.weights[:, :16] = 0.0  # the route's own weights, edited after first use: the next mask sees it
    labels = LABELS.clamp(min=0)
    assert torch.count_nonzero(route.mask(labels, torch.Size([BATCH, POS, 32]))[..., :16]) == 0
    _, edited = _grads(model, tokens, router=Router([route]))
    _, expected = _grads(
        model, tokens, router=Router([Route(site=route.site, weights=route.weights.clone())])
    )
    assert all(torch.equal(edited[p], expected[p]) for p in expected)
    assert not torch.equal(edited["blocks.0.attn.W_V"], before["blocks.0.attn.W_V"])


def test_routes_raise_in_the_forward_and_need_gradients():
    model, tokens, _ = _setup("gpt2-like")
    with pytest.raises(ValueError, match="has 7 coordinates"):
        with Router([Route(site="blocks.0.attn.hook_result", weights=torch.ones(3, 7))]).apply(model, LABELS):
            model(tokens)  # no backward needed to see the error
    with pytest.raises(RuntimeError, match="needs gradients"):
        with Router([Route(site="blocks.0.hook_resid_post", weights=torch.ones(3, 32))]).apply(model, LABELS):
            with torch.no_grad():
                model(tokens)
    assert not model.hook_registry.any_active
