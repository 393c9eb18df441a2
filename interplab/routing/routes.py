"""Activation routes: data-dependent masks on the backward pass that leave the forward pass unchanged.

Gradient routing (Cloud et al. 2024) replaces an activation ``a`` by ``m * a + (1 - m) * a.detach()``: the
value is ``a``; the gradient reaching ``a`` (and everything upstream of it) is multiplied by ``m``. Here a route
touches only the backward pass, so the forward pass is bit-identical with and without routes, for any weight
(``0.3 * a + 0.7 * a`` would not be) and at every site: on a Transformer a route is a backward hook, which
keeps the model on its fast path (fused attention, fused norms) even at sites that path never builds (per-head
results, attention patterns, split inputs, norm scales), while the gradient flows through the explicit
computation of that site; on a plain module it is an autograd function whose forward returns ``a`` itself.

>>> labels = torch.tensor([0, 1, 0, 1])          # the group of each example of the batch
>>> route = Route.from_regions("blocks.0.hook_resid_post", width=64, regions={0: range(32), 1: range(32, 64)})
>>> with Router([route]).apply(model, labels):       # labels [batch] or [batch pos]: a group per example/token
...     loss = task.loss(model(batch.tokens), batch)
...     loss.backward()                               # group 0 only trains what feeds dims 0-31, group 1 dims 32-63
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab.hooks.site import Site

UNLABELLED = -1


class _RouteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None


def route_gradient(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` unchanged in the forward pass; its gradient multiplied by ``mask`` (broadcast to ``x``).

    The same gradient as ``mask * x + (1 - mask) * x.detach()``, with a bit-identical forward value."""
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to {tuple(x.shape)}"
        ) from None
    if not x.requires_grad:
        return x
    return _RouteGradient.apply(x, mask)


class Axis(str, Enum):
    """Which axis of the activation a route's coordinates index."""

    LAST = "last"  # residual dimensions, MLP neurons, SAE latents: the last axis
    HEAD = "head"  # attention heads of [batch pos head d_head] sites (z, q, k, v, result)


@dataclass(frozen=True, kw_only=True, eq=False)
class Route:
    """Where data of each group may send gradient. For an example (or token) of group ``g``, the gradient at
    ``site`` is multiplied coordinate-wise by ``weights[g]``; label ``-1`` (unlabelled) uses ``unlabelled``."""

    site: str
    """a Transformer hook point (``blocks.0.mlp.hook_post``, or a Site), or the dotted path of a submodule of a
    plain nn.Module (``encoder``, ``layers.2``) whose output is routed"""
    weights: Float[Tensor, "group coord"]
    """one row per group: the gradient weight of each coordinate (1 passes, 0 blocks, negative ascends). The
    route keeps its own float32 copy: later edits of the tensor passed in do not reach it; in-place edits of
    ``route.weights`` itself do (every mask reads its current values)"""
    axis: Axis = Axis.LAST
    """the activation axis the coordinates index"""
    unlabelled: float = 1.0
    """weight of every coordinate for data labelled -1"""

    def __post_init__(self) -> None:
        if isinstance(self.site, Site):
            object.__setattr__(self, "site", self.site.name)
        if not isinstance(self.site, str) or not self.site:
            raise ValueError(f"site must be a hook-point name or module path, got {self.site!r}")
        weights = torch.as_tensor(self.weights).detach().to(torch.float32, copy=True)
        if weights.ndim != 2 or weights.shape[0] == 0 or weights.shape[1] == 0:
            raise ValueError(
                f"weights must be [group coord] with at least one of each, got {tuple(weights.shape)}"
            )
        if not torch.isfinite(weights).all():
            raise ValueError(f"weights of route at {self.site!r} contain non-finite values")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "axis", Axis(self.axis))

    def _table(self, device: torch.device) -> Tensor:
        """weights with the unlabelled row appended, cached per device and rebuilt whenever ``weights``
        changed in place (its version counter moved), so a mask never uses stale weights"""
        cache = self.__dict__.setdefault("_tables", {})
        version = self.weights._version
        if device not in cache or cache[device][0] != version:
            table = torch.cat([self.weights, torch.full((1, self.width), self.unlabelled)]).to(device)
            cache[device] = (version, table)
        return cache[device][1]

    @property
    def n_groups(self) -> int:
        return self.weights.shape[0]

    @property
    def width(self) -> int:
        return self.weights.shape[1]

    @classmethod
    def from_regions(
        cls,
        site: str | Site,
        *,
        width: int,
        regions: Mapping[int, Iterable[int]],
        inside: float = 1.0,
        outside: float = 0.0,
        axis: Axis = Axis.LAST,
        unlabelled: float = 1.0,
    ) -> Route:
        """Group ``g`` sends gradient with weight ``inside`` through coordinates ``regions[g]`` and ``outside``
        through the rest. Groups are 0 .. max(regions); a group without a region gets ``outside`` everywhere."""
        if not isinstance(width, int) or width <= 0:
            raise ValueError(f"width must be a positive int, got {width!r}")
        if not regions or min(regions) < 0:
            raise ValueError(
                f"regions must map groups 0, 1, ... to coordinates, got groups {sorted(regions)}"
            )
        weights = torch.full((max(regions) + 1, width), float(outside))
        for group, coords in regions.items():
            idx = list(coords)
            bad = [c for c in idx if not isinstance(c, int) or not 0 <= c < width]
            if bad:
                raise ValueError(
                    f"route at {site}: group {group} names coordinates {bad[:5]} outside 0..{width - 1}"
                )
            weights[group, idx] = float(inside)
        return cls(site=str(site.name if isinstance(site, Site) else site), weights=weights, axis=axis,
                   unlabelled=unlabelled)  # fmt: skip

    def mask(self, labels: Tensor, shape: torch.Size, *, strength: float = 1.0) -> Tensor:
        """The gradient mask for an activation of ``shape`` whose examples (or tokens) carry ``labels``."""
        self.check(labels, shape)
        table = self._table(labels.device)
        if strength != 1.0:  # annealing: 0 = no routing, 1 = the full weights
            table = 1.0 + strength * (table - 1.0)
        rows = table[torch.where(labels == UNLABELLED, self.n_groups, labels)]  # [batch (pos) coord]
        if self.axis is Axis.HEAD:
            rows = rows.unsqueeze(-1)
        # put the coordinate axis in place and broadcast over the axes between the labels and it
        middle = len(shape) - labels.ndim - (2 if self.axis is Axis.HEAD else 1)
        return rows.reshape(*labels.shape, *([1] * middle), *rows.shape[labels.ndim :])

    def check(self, labels: Tensor, shape: torch.Size) -> None:
        """Raise if the route cannot mask an activation of ``shape`` whose examples carry ``labels``."""
        dim = -2 if self.axis is Axis.HEAD else -1
        if len(shape) < 2 or shape[dim] != self.width:
            raise ValueError(
                f"route at {self.site!r} has {self.width} coordinates on axis {self.axis.value!r}, but the "
                f"activation has shape {tuple(shape)}"
            )
        if labels.shape[0] != shape[0] or (
            labels.ndim == 2 and (len(shape) < 3 or labels.shape[1] != shape[1])
        ):
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} do not match the activation {tuple(shape)} at {self.site!r}: "
                "give one label per example [batch] or per token [batch pos]"
            )


@dataclass(frozen=True, kw_only=True)
class Anneal:
    """Routing strength over training: 0 before ``start``, rising linearly to 1 at ``end`` (or the reverse
    with ``decay=True``). Weights are interpolated as ``1 + strength * (w - 1)``."""

    start: int = 0
    """step where the ramp begins"""
    end: int = 0
    """step where it ends (equal to start: a step function)"""
    decay: bool = False
    """go from full routing to none instead"""

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"need 0 <= start <= end, got start={self.start}, end={self.end}")

    def strength(self, step: int) -> float:
        if step >= self.end:
            s = 1.0
        elif step < self.start:
            s = 0.0
        else:
            s = (step - self.start) / (self.end - self.start)
        return 1.0 - s if self.decay else s


class Router:
    """A set of routes applied together to a Transformer (on its hook points) or a plain nn.Module (on the
    outputs of named submodules)."""

    def __init__(self, routes: Sequence[Route]) -> None:
        if not routes:
            raise ValueError("a Router needs at least one Route")
        groups = {r.n_groups for r in routes}
        if len(groups) > 1:
            raise ValueError(f"routes disagree on the number of groups: {sorted(groups)}")
        self.routes = list(routes)
        self.n_groups = groups.pop()

    def check_labels(self, labels: Tensor) -> Tensor:
        labels = torch.as_tensor(labels)
        if labels.dtype == torch.bool:
            labels = labels.long()
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"labels must be integer group ids, got dtype {labels.dtype}")
        if labels.ndim not in (1, 2):
            raise ValueError(f"labels must be [batch] or [batch pos], got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < UNLABELLED or labels.max() >= self.n_groups):
            raise ValueError(
                f"labels hold values {sorted(set(labels.unique().tolist()))[:8]}; valid: -1 (unlabelled) and "
                f"0..{self.n_groups - 1}"
            )
        return labels.long()

    @contextlib.contextmanager
    def apply(self, model: nn.Module, labels: Tensor, *, strength: float = 1.0) -> Iterator[None]:
        """Route the backward passes of forwards run inside the block; the forward values are unchanged."""
        labels = self.check_labels(labels)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")

        def hook_for(route: Route):
            def fn(x: Tensor, _site: object = None) -> Tensor:
                return route_gradient(x, route.mask(labels.to(x.device), x.shape, strength=strength))

            return fn

        def grad_hook_for(route: Route):
            def fn(grad: Tensor, _site: object = None) -> Tensor:
                mask = route.mask(labels.to(grad.device), grad.shape, strength=strength)
                return grad * mask.to(grad.dtype)

            return fn

        def check_for(route: Route):  # in the forward pass, so a bad route fails before any backward
            return lambda x, _site=None: route.check(labels, x.shape)

        registry = getattr(model, "hook_registry", None)
        if registry is not None:
            # backward hooks: the model keeps its forward path exactly (see the module docstring); forwards
            # run under torch.no_grad() inside the block raise, as for any backward hook
            with registry.scoped(
                bwd_hooks=[(r.site, grad_hook_for(r)) for r in self.routes],
                read_hooks=[(r.site, check_for(r)) for r in self.routes],
            ):
                yield
            return
        modules = dict(model.named_modules())
        missing = [r.site for r in self.routes if r.site not in modules]
        if missing:
            names = [n for n in modules if n]
            raise ValueError(
                f"no submodule {missing[0]!r} in {type(model).__name__}; submodules: {names[:20]}"
            )
        handles = []
        try:
            for r in self.routes:
                fn = hook_for(r)
                handles.append(
                    modules[r.site].register_forward_hook(lambda _m, _i, out, fn=fn: _routed_output(out, fn))
                )
            yield
        finally:
            for h in handles:
                h.remove()


def _routed_output(out: object, fn) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"can only route modules whose output is a Tensor, got {type(out).__name__}")
    return fn(out)
