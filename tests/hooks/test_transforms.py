"""Hooks and ``torch.func`` transforms compose: under vmap the model batches without torch's per-example
fallback loop, and read hooks keep what a loop over the vmapped inputs would have shown them, stacked.

Ground truth is the loop: one plain forward per parameter set (or example)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.func import functional_call, grad, vmap
from torch.testing import assert_close

from interplab.hooks import HookPoint, HookRegistry, Site, SiteKind
from interplab.hooks.transforms import is_transformed, is_vmapped, unwrapped
from interplab.model import Transformer
from tests.model.model_variants import VARIANTS, make_model

SETS, B, P = 3, 2, 6
READ = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post", "hook_embed"]


@contextlib.contextmanager
def no_vmap_fallback() -> Iterator[None]:
    """vmap raises instead of looping over the batch where an op has no batching rule."""
    functorch: Any = torch._C._functorch
    functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        functorch._set_vmap_fallback_enabled(True)


def parameter_sets(model: Transformer) -> dict[str, torch.Tensor]:
    """SETS perturbed copies of every parameter, stacked along a leading axis."""
    g = torch.Generator().manual_seed(1)
    return {
        k: torch.stack([v.detach() + 0.1 * torch.randn(v.shape, generator=g) for _ in range(SETS)])
        for k, v in model.named_parameters()
    }


def forward_reading(model: Transformer, params: dict[str, torch.Tensor], tokens: torch.Tensor, seen: dict):
    def keep(act: torch.Tensor, site: Site) -> None:
        seen[site.name] = act.clone()

    with model.hooks(read_hooks=[(name, keep) for name in READ if name in model.hook_points]):
        return functional_call(model, params, (tokens,))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_read_hooks_under_vmap_over_parameter_sets_equal_a_loop(name):
    model = make_model(name)
    tokens = torch.randint(0, model.cfg.d_vocab, (B, P), generator=torch.Generator().manual_seed(0))
    stacked = parameter_sets(model)
    looped: list[dict] = [{} for _ in range(SETS)]
    logits_loop = torch.stack(
        [
            forward_reading(model, {k: v[i] for k, v in stacked.items()}, tokens, looped[i])
            for i in range(SETS)
        ]
    )
    seen: dict = {}
    with no_vmap_fallback():  # attention batches under vmap (no SDPA fallback loop), hooks or not
        logits = vmap(lambda p: forward_reading(model, p, tokens, seen))(stacked)
        plain = vmap(lambda p: functional_call(model, p, (tokens,)))(stacked)
    assert_close(logits, logits_loop, atol=2e-5, rtol=1e-5)
    assert_close(plain, logits_loop, atol=2e-5, rtol=1e-5)
    assert set(seen) == set(looped[0]) and len(seen) >= 3
    for site, acts in seen.items():
        assert not is_transformed(acts), site
        assert_close(acts, torch.stack([loop[site] for loop in looped]), atol=2e-5, rtol=1e-5, msg=site)


def test_read_hooks_under_vmap_of_grad_over_examples_equal_a_loop():
    """Per-example gradients (vmap over grad, as `interplab.data_attribution`): the reader sees every example's
    activation with the example dim first (each example is a batch of one) and the gradients are the loop's."""
    model = make_model("gpt2")
    tokens = torch.randint(0, model.cfg.d_vocab, (4, P), generator=torch.Generator().manual_seed(0))
    params = {k: v.detach() for k, v in model.named_parameters()}

    seen: dict = {}

    def loss(p: dict, example: torch.Tensor) -> torch.Tensor:
        return forward_reading(model, p, example[None], seen).logsumexp(-1).mean()

    looped = []
    grads_loop = []
    for t in tokens:
        grads_loop.append(grad(loss)(params, t))
        looped.append(dict(seen))
    with no_vmap_fallback():
        grads = vmap(grad(loss), in_dims=(None, 0))(params, tokens)
    for k in ("blocks.0.attn.W_Q", "embed.W_E"):
        assert_close(grads[k], torch.stack([g[k] for g in grads_loop]), atol=1e-5, rtol=1e-5)
    for site, acts in seen.items():
        assert_close(acts, torch.stack([loop[site] for loop in looped]), atol=2e-5, rtol=1e-5, msg=site)


def test_unwrapped_puts_nested_vmap_dims_first_and_expands_values_they_do_not_reach():
    """vmap(vmap(f)) over [2, 3]: the reader's leading dims are [outer, inner], whichever order the vmaps'
    batch dims had in the physical tensors; a value only the outer vmap reaches is repeated over the inner."""
    point = HookPoint(Site(SiteKind.RESID_PRE, 0))
    registry = HookRegistry([point])
    x = torch.randn(5, 2)  # the outer vmap maps dim 1
    y = torch.randn(3, 4)  # the inner vmap maps dim 0
    seen: list[torch.Tensor] = []

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        assert is_vmapped(a)
        point(a)  # reached by the outer vmap only
        return point(a[:, None] * b)  # [5, 4], reached by both

    with registry.scoped(read_hooks=[("blocks.0.hook_resid_pre", lambda act, site: seen.append(act))]):
        out = vmap(vmap(f, in_dims=(None, 0)), in_dims=(1, None))(x, y)
    assert out.shape == (2, 3, 5, 4)
    outer_only, both = seen
    assert_close(outer_only, x.T[:, None].expand(2, 3, 5))
    assert_close(both, out)
    assert not is_vmapped(x) and unwrapped(x) is x
