import pytest
import torch

from interplab.hooks import HookPoint, HookRegistry, HookShapeError, Site, SiteKind


def make_registry():
    points = [HookPoint(Site(SiteKind.RESID_PRE, layer)) for layer in range(3)] + [
        HookPoint(Site(SiteKind.EMBED))
    ]
    return HookRegistry(points), points


def test_unhooked_point_returns_its_input_and_is_inactive():
    point = HookPoint(Site(SiteKind.EMBED))
    x = torch.randn(2, 3)
    assert point(x) is x and not point.active


def test_hooks_run_in_order_and_chain_replacements():
    registry, points = make_registry()
    x = torch.ones(2)
    with registry.scoped(
        [(("resid_pre", 1), lambda a, s: a + 1), ("blocks.1.hook_resid_pre", lambda a, s: a * 10)]
    ):
        assert torch.equal(points[1](x), torch.full((2,), 20.0))
        assert points[0](x) is x
    assert not registry.any_active


def test_targets_resolve_by_name_site_tuple_and_filter():
    registry, points = make_registry()
    assert registry.resolve(Site(SiteKind.RESID_PRE, 2)) == [points[2]]
    assert registry.resolve(("resid_pre", 0)) == [points[0]]
    assert registry.resolve("hook_embed") == [points[3]]
    assert registry.resolve(lambda n: n.endswith("resid_pre")) == points[:3]
    with pytest.raises(ValueError, match=r"unknown hook point 'blocks\.5\.hook_resid_pre'; closest: "):
        registry.resolve("blocks.5.hook_resid_pre")


def test_nested_scopes_and_the_same_function_twice():
    registry, points = make_registry()
    calls = []

    def fn(a, s):
        calls.append(s.layer)

    with registry.scoped([(("resid_pre", 0), fn)]):
        with registry.scoped([(("resid_pre", 0), fn)]):
            points[0](torch.zeros(1))
            assert calls == [0, 0]
        points[0](torch.zeros(1))
        assert calls == [0, 0, 0]
    points[0](torch.zeros(1))
    assert calls == [0, 0, 0] and not registry.any_active


def test_wrong_shape_and_type_are_refused():
    registry, points = make_registry()
    with (
        registry.scoped([("hook_embed", lambda a, s: a[0])]),
        pytest.raises(HookShapeError, match=r"shape \(3,\), expected \(2, 3\)"),
    ):
        points[3](torch.zeros(2, 3))
    with registry.scoped([("hook_embed", lambda a, s: "x")]), pytest.raises(TypeError, match="returned str"):
        points[3](torch.zeros(2, 3))


def test_backward_hook_needs_grad_mode():
    registry, points = make_registry()
    with registry.scoped(bwd_hooks=[("hook_embed", lambda g, s: None)]), torch.no_grad():
        with pytest.raises(RuntimeError, match=r"hook_embed needs gradients.*no_grad"):
            points[3](torch.zeros(2))
    assert not registry.any_active


def test_readers_see_the_replaced_value_and_cannot_replace_it():
    registry, points = make_registry()
    seen = []
    with registry.scoped(read_hooks=[("hook_embed", lambda a, s: seen.append(a) or a * 0)]):
        assert points[3].active and not points[3].intervened
        x = torch.ones(2)
        assert points[3](x) is x
        with registry.scoped([("hook_embed", lambda a, s: a + 1)]):
            assert points[3].intervened
            assert torch.equal(points[3](x), x + 1)
        assert not points[3].intervened
    assert torch.equal(seen[0], x) and torch.equal(seen[1], x + 1)
    assert not registry.any_active


def test_registry_refuses_two_points_with_one_name():
    with pytest.raises(ValueError, match=r"two hook points are named 'hook_embed'"):
        HookRegistry([HookPoint(Site(SiteKind.EMBED)), HookPoint(Site(SiteKind.EMBED))])
