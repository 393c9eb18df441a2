"""The must-hold properties of activation and parameter routes."""

import pytest
import torch
from torch import nn

from interplab.model import ModelConfig, Transformer
from interplab.routing import Anneal, Axis, ParamRoute, Route, Router, route_gradient

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=16, d_mlp=64)


def model_and_tokens(seed=0):
    torch.manual_seed(seed)
    model = Transformer(CFG)
    tokens = torch.randint(0, 50, (6, 10))
    return model, tokens


def grads(model, tokens, routes=None, labels=None):
    model.zero_grad(set_to_none=True)
    if routes is None:
        logits = model(tokens)
    else:
        with Router(routes).apply(model, labels):
            logits = model(tokens)
    logits.logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mask_one_gives_identical_gradients_and_forward():
    model, tokens = model_and_tokens()
    logits0, g0 = grads(model, tokens)
    routes = [
        Route(site=s, weights=torch.ones(2, w))
        for s, w in [
            ("blocks.0.hook_resid_post", 32),
            ("blocks.1.mlp.hook_post", 64),
            ("blocks.0.attn.hook_z", 4),
        ]
    ]
    routes[2] = Route(site="blocks.0.attn.hook_z", weights=torch.ones(2, 4), axis=Axis.HEAD)
    logits1, g1 = grads(model, tokens, routes, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert torch.equal(logits0, logits1)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_forward_is_bit_identical_for_any_weights():
    model, tokens = model_and_tokens()
    ref = model(tokens)
    route = Route(site="blocks.0.hook_resid_mid", weights=torch.tensor([[0.3] * 32, [-0.7] * 32]))
    labels = torch.randint(0, 2, (6, 10))
    with Router([route]).apply(model, labels):
        out = model(tokens)
    assert torch.equal(ref, out)


def test_mask_zero_gives_exactly_zero_upstream_gradient():
    model, tokens = model_and_tokens()
    # block every MLP neuron of layer 1: W_in/b_in of that MLP feed only this site, so they get exactly zero
    route = Route(site="blocks.1.mlp.hook_post", weights=torch.zeros(1, 64))
    _, g = grads(model, tokens, [route], torch.zeros(6, dtype=torch.long))
    assert (
        torch.count_nonzero(g["blocks.1.mlp.W_in"]) == 0 and torch.count_nonzero(g["blocks.1.mlp.b_in"]) == 0
    )
    assert torch.count_nonzero(g["blocks.1.mlp.W_out"]) > 0  # downstream of the site: still learns
    # a region: neurons 0-15 blocked for group 0 only; examples of group 1 still train them
    route = Route.from_regions("blocks.1.mlp.hook_post", width=64, regions={0: range(16, 64), 1: range(64)})
    _, g = grads(model, tokens, [route], torch.tensor([0, 0, 0, 0, 0, 0]))
    assert torch.count_nonzero(g["blocks.1.mlp.W_in"][:, :16]) == 0
    assert torch.count_nonzero(g["blocks.1.mlp.W_in"][:, 16:]) > 0
    _, g_mixed = grads(model, tokens, [route], torch.tensor([0, 0, 0, 1, 0, 0]))
    assert torch.count_nonzero(g_mixed["blocks.1.mlp.W_in"][:, :16]) > 0


def test_per_token_labels_equal_the_loop_over_tokens():
    model, tokens = model_and_tokens()
    labels = torch.randint(-1, 2, (6, 10))
    route = Route.from_regions("blocks.0.hook_resid_post", width=32, regions={0: range(16), 1: range(16, 32)})
    _, g = grads(model, tokens, [route], labels)

    def mask_hook(x, site):  # the definition, written out: m * a + (1 - m) * a.detach()
        m = route.weights[labels.clamp(min=0)]
        m[labels == -1] = 1.0
        return m * x + (1 - m) * x.detach()

    model.zero_grad(set_to_none=True)
    with model.hooks([("blocks.0.hook_resid_post", mask_hook)]):
        model(tokens).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g[name], p.grad, msg=name)


def test_negative_weight_flips_the_sign():
    model, tokens = model_and_tokens()
    _, g0 = grads(model, tokens)
    _, g1 = grads(
        model,
        tokens,
        [Route(site="blocks.1.mlp.hook_post", weights=-torch.ones(1, 64))],
        torch.zeros(6, dtype=torch.long),
    )
    torch.testing.assert_close(g1["blocks.1.mlp.W_in"], -g0["blocks.1.mlp.W_in"])
    torch.testing.assert_close(g1["blocks.1.mlp.W_out"], g0["blocks.1.mlp.W_out"])


def test_plain_module_route_and_head_axis():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(4, 5)
    route = Route.from_regions("0", width=8, regions={0: range(4), 1: range(4, 8)})
    with Router([route]).apply(net, torch.tensor([0, 0, 0, 0])):
        out = net(x)
    out.sum().backward()
    assert (
        torch.count_nonzero(net[0].weight.grad[4:]) == 0 and torch.count_nonzero(net[0].weight.grad[:4]) > 0
    )
    assert torch.equal(out, net(x))
    # heads: block head 2 of layer 0 for everything -> W_Q/W_K/W_V of head 2 in layer 0 get no gradient
    model, tokens = model_and_tokens()
    route = Route.from_regions("blocks.0.attn.hook_z", width=4, regions={0: [0, 1, 3]}, axis=Axis.HEAD)
    _, g = grads(model, tokens, [route], torch.zeros(6, dtype=torch.long))
    assert (
        torch.count_nonzero(g["blocks.0.attn.W_V"][2]) == 0
        and torch.count_nonzero(g["blocks.0.attn.W_V"][1]) > 0
    )


def test_annealing_interpolates_weights():
    anneal = Anneal(start=10, end=20)
    assert [anneal.strength(s) for s in (0, 10, 15, 20, 30)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert Anneal(start=0, end=10, decay=True).strength(0) == 1.0
    model, tokens = model_and_tokens()
    _, g0 = grads(model, tokens)
    route = Route(site="blocks.1.mlp.hook_post", weights=torch.zeros(1, 64))
    model.zero_grad(set_to_none=True)
    with Router([route]).apply(model, torch.zeros(6, dtype=torch.long), strength=0.25):
        model(tokens).logsumexp(-1).mean().backward()
    torch.testing.assert_close(model.blocks[1].mlp.W_in.grad, 0.75 * g0["blocks.1.mlp.W_in"])


def test_route_gradient_matches_definition():
    a = torch.randn(3, 4, requires_grad=True)
    m = torch.tensor([1.0, 0.0, -1.0, 0.5])
    route_gradient(a, m).pow(2).sum().backward()
    ref = a.detach().clone().requires_grad_(True)
    (m * ref + (1 - m) * ref.detach()).pow(2).sum().backward()
    torch.testing.assert_close(a.grad, ref.grad)


def test_param_route_masks_any_parameter():
    model, tokens = model_and_tokens()
    _, g0 = grads(model, tokens)
    mask = torch.zeros(64, 1)
    mask[:8] = 1.0
    route = ParamRoute(weights={"blocks.1.mlp.W_out": mask, "unembed.W_U": -1.0}, default=0.0)
    model.zero_grad(set_to_none=True)
    with route.apply(model):
        model(tokens).logsumexp(-1).mean().backward()
    torch.testing.assert_close(model.blocks[1].mlp.W_out.grad, g0["blocks.1.mlp.W_out"] * mask)
    torch.testing.assert_close(model.unembed.W_U.grad, -g0["unembed.W_U"])
    assert torch.count_nonzero(model.blocks[0].attn.W_Q.grad) == 0


def test_bad_input_errors():
    model, tokens = model_and_tokens()
    with pytest.raises(ValueError, match="the model has 2 layers"):
        with Router([Route(site="blocks.5.hook_resid_post", weights=torch.ones(1, 32))]).apply(
            model, torch.zeros(6, dtype=torch.long)
        ):
            pass
    with pytest.raises(ValueError, match="outside 0..31"):
        Route.from_regions("blocks.0.hook_resid_post", width=32, regions={0: [3, 40]})
    with pytest.raises(ValueError, match="has 40 coordinates"):
        with Router([Route(site="blocks.0.hook_resid_post", weights=torch.ones(1, 40))]).apply(
            model, torch.zeros(6, dtype=torch.long)
        ):
            model(tokens)
    router = Router([Route(site="blocks.0.hook_resid_post", weights=torch.ones(2, 32))])
    with pytest.raises(ValueError, match=r"labels of shape \(5,\) do not match"):
        with router.apply(model, torch.zeros(5, dtype=torch.long)):
            model(tokens)
    with pytest.raises(ValueError, match=r"labels of shape \(6, 9\)"):
        with router.apply(model, torch.zeros(6, 9, dtype=torch.long)):
            model(tokens)
    with pytest.raises(ValueError, match="valid: -1"):
        with router.apply(model, torch.tensor([0, 1, 2, 0, 0, 0])):
            pass
    with pytest.raises(ValueError, match="no submodule 'blocks.0.hook_resid_post'"):
        with router.apply(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="no parameter 'blocks.0.W'"):
        with ParamRoute(weights={"blocks.0.W": 0.0}).apply(model):
            pass
    # hooks are gone after errors: the model runs unrouted
    assert not model.hook_registry.any_active
