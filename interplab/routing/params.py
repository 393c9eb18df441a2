"""Parameter-level routing: the gradient that data of one group sends to each parameter is multiplied by a
weight (a scalar or a tensor of the parameter's shape, e.g. 1 on some MLP units and 0 on the rest).

Activation routes (`Route`) can only mask what lies *upstream* of a site; a parameter route masks any
parameter, downstream ones included. Run one backward per group inside ``ParamRoute.apply``:

>>> unit_mask = (torch.arange(model.cfg.d_mlp) < 8).float()[:, None]   # MLP units 0-7 (rows of W_out)
>>> forget = ParamRoute(weights={"blocks.0.mlp.W_out": unit_mask}, default=0.0)   # forget data: only these units
>>> with forget.apply(model):
...     task.loss(model(batch.tokens), batch).backward()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True, kw_only=True, eq=False)
class ParamRoute:
    """Gradient weights per parameter for one group of data."""

    weights: Mapping[str, float | Tensor] = field(default_factory=dict)
    """parameter name (as in ``model.named_parameters()``) -> weight: a float or a tensor broadcasting to it"""
    default: float = 1.0
    """weight of every parameter not named in ``weights``"""

    def check(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        for name, weight in self.weights.items():
            if name not in params:
                close = [p for p in params if name.split(".")[-1] in p][:6]
                raise ValueError(f"no parameter {name!r} in {type(model).__name__}; similar: {close}")
            if isinstance(weight, Tensor):
                try:
                    torch.broadcast_shapes(weight.shape, params[name].shape)
                except RuntimeError:
                    raise ValueError(
                        f"weight for {name!r} has shape {tuple(weight.shape)}; the parameter is "
                        f"{tuple(params[name].shape)}"
                    ) from None
        return params

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[None]:
        """Backward passes inside the block accumulate weighted gradients into ``param.grad``."""
        params = self.check(model)
        handles = []
        try:
            for name, p in params.items():
                if not p.requires_grad:
                    continue
                weight = self.weights.get(name, self.default)
                if isinstance(weight, Tensor):
                    w = weight.to(device=p.device, dtype=p.dtype)
                    handles.append(p.register_hook(lambda g, w=w: g * w))
                elif weight == 0.0:
                    handles.append(p.register_hook(torch.zeros_like))
                elif weight != 1.0:
                    handles.append(p.register_hook(lambda g, w=float(weight): g * w))
            yield
        finally:
            for h in handles:
                h.remove()
