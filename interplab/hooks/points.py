"""Hook points: named places in a forward pass where functions may read or replace an activation.

A hook is ``fn(activation, site) -> Tensor | None``; returning a tensor replaces the activation (it must
keep the shape). Backward hooks have the same signature and receive the gradient at that activation.
Hooks are added through `HookRegistry.scoped` (a context manager) and are always removed in ``finally``.
Under ``torch.func`` transforms forward and backward hooks see what the transformed function sees; read hooks
see plain tensors with one leading dim per active vmap (`interplab.hooks.transforms.unwrapped`), so what they
keep stays valid after the transform returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from interplab.hooks.site import Site, suggest
from interplab.hooks.transforms import unwrapped

HookFn = Callable[[torch.Tensor, Site], torch.Tensor | None]
#: what a hook may be attached to: a name, a Site, a (short, layer) tuple, or a filter over names
HookTarget = str | Site | tuple | Callable[[str], bool]


class HookShapeError(ValueError):
    """A hook returned a tensor of the wrong shape."""


class HookPoint:
    """One named activation. Calling it runs the forward hooks, arms the backward hooks and shows the
    result to the readers.

    Three lists: ``fwd`` hooks may replace the activation, ``bwd`` hooks see its gradient, ``read`` hooks
    only look (their return value is ignored; `Transformer.run_with_cache` uses them). The no-hook path
    is one attribute test, so unhooked points cost almost nothing; `active` lets the model skip
    computing per-head tensors nobody asked for, and `intervened` tells it whether a value it shows
    might be replaced (or needs its own gradient), so it can show a cheap view otherwise.
    Change the lists only through `HookRegistry` (it keeps `active` in sync).
    """

    __slots__ = ("site", "name", "fwd", "bwd", "read", "active", "intervened")

    def __init__(self, site: Site) -> None:
        self.site = site
        self.name = site.name
        self.fwd: list[HookFn] = []
        self.bwd: list[HookFn] = []
        self.read: list[HookFn] = []
        self.active = False
        self.intervened = False

    def sync(self) -> None:
        """Recompute `active` and `intervened` after the lists changed."""
        self.intervened = bool(self.fwd) or bool(self.bwd)
        self.active = self.intervened or bool(self.read)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        for fn in self.fwd:
            out = fn(x, self.site)
            if out is not None:
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"hook {getattr(fn, '__name__', fn)!r} at {self.name} returned {type(out).__name__}; "
                        "return a Tensor to replace the activation or None to keep it"
                    )
                if out.shape != x.shape:
                    raise HookShapeError(
                        f"hook {getattr(fn, '__name__', fn)!r} at {self.name} returned shape {tuple(out.shape)}, "
                        f"expected {tuple(x.shape)}"
                    )
                x = out
        if self.bwd:
            if not torch.is_grad_enabled():
                raise RuntimeError(
                    f"backward hook at {self.name} needs gradients, but the forward runs under torch.no_grad()"
                )
            if not x.requires_grad:
                # Nothing upstream needs a gradient (frozen weights): make this activation a leaf that does.
                x = x.detach().requires_grad_(True)
            for fn in self.bwd:
                x.register_hook(_grad_hook(fn, self.site))
        if self.read:
            # inside torch.func transforms the readers see a plain tensor that outlives them (vmapped dims first)
            seen = unwrapped(x)
            for fn in self.read:
                fn(seen, self.site)
        return x

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, fwd={len(self.fwd)}, bwd={len(self.bwd)}, read={len(self.read)})"


def _grad_hook(fn: HookFn, site: Site) -> Callable[[torch.Tensor], torch.Tensor | None]:
    def hook(grad: torch.Tensor) -> torch.Tensor | None:
        out = fn(grad, site)
        if out is not None and out.shape != grad.shape:
            raise HookShapeError(
                f"backward hook at {site.name} returned shape {tuple(out.shape)}, expected {tuple(grad.shape)}"
            )
        return out

    return hook


class HookRegistry:
    """The hook points of one model, by canonical name, and scoped (un)registration."""

    def __init__(self, points: Iterable[HookPoint], describe: Callable[[str], str] | None = None) -> None:
        self.points: dict[str, HookPoint] = {}
        for p in points:
            if p.name in self.points:
                raise ValueError(f"two hook points are named {p.name!r}")
            self.points[p.name] = p
        self._describe = describe

    def __contains__(self, name: object) -> bool:
        return name in self.points

    def __iter__(self) -> Iterator[str]:
        return iter(self.points)

    def __len__(self) -> int:
        return len(self.points)

    def resolve(self, target: HookTarget) -> list[HookPoint]:
        """The hook points a name, Site, (short, layer) tuple or filter refers to (an error if none)."""
        if callable(target) and not isinstance(target, (str, Site, tuple)):
            found = [p for name, p in self.points.items() if target(name)]
            if not found:
                raise ValueError("hook filter matched no hook point of this model")
            return found
        try:
            name = Site.parse(target).name
        except ValueError as err:
            if isinstance(target, str):
                raise ValueError(self._unknown(target)) from None
            raise err
        point = self.points.get(name)
        if point is None:
            raise ValueError(self._unknown(name))
        return [point]

    def _unknown(self, name: str) -> str:
        if self._describe is not None:
            reason = self._describe(name)
            if reason:
                return reason
        close = suggest(name, list(self.points))
        hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
        return f"unknown hook point {name!r}{hint}"

    @contextlib.contextmanager
    def scoped(
        self,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        bwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        read_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
    ) -> Iterator[None]:
        """Attach hooks for the duration of the ``with`` block; always detached afterwards.
        ``read_hooks`` only look at the activation (after the forward hooks replaced it)."""
        # Resolve everything before attaching anything, so a bad name leaves no hook behind.
        plan = [(p, fn, "fwd") for target, fn in fwd_hooks for p in self.resolve(target)]
        plan += [(p, fn, "bwd") for target, fn in bwd_hooks for p in self.resolve(target)]
        plan += [(p, fn, "read") for target, fn in read_hooks for p in self.resolve(target)]
        attached: list[tuple[HookPoint, HookFn, str]] = []
        try:
            for point, fn, way in plan:
                getattr(point, way).append(fn)
                attached.append((point, fn, way))
                point.sync()
            yield
        finally:
            for point, fn, way in reversed(attached):
                hooks = getattr(point, way)
                for i in range(len(hooks) - 1, -1, -1):
                    if hooks[i] is fn:
                        del hooks[i]
                        break
                point.sync()

    def clear(self) -> None:
        """Remove every hook (normally unnecessary: scoped hooks remove themselves)."""
        for p in self.points.values():
            p.fwd.clear()
            p.bwd.clear()
            p.read.clear()
            p.sync()

    @property
    def any_active(self) -> bool:
        return any(p.active for p in self.points.values())
