"""Steering: add, subtract or project out a direction at a hook point; mean-difference vectors.

>>> vec = mean_difference(model, happy_tokens, sad_tokens, "blocks.1.hook_resid_pre")
>>> logits = model.run_with_hooks(tokens, [steering_hook(vec.site, vec.vector, coefficient=4.0)])
>>> logits = model.run_with_hooks(tokens, [steering_hook(vec.site, vec.vector, mode="project_out")])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.hooks.points import HookFn
from interplab.hooks.site import Site
from interplab.model import Transformer
from interplab.plots import save_result


class SteerMode(str, Enum):
    ADD = "add"  # act + coefficient * direction (a negative coefficient subtracts)
    PROJECT_OUT = "project_out"  # act - (act . d) d with d the unit direction


def steering_hook(
    site: str | Site | tuple,
    direction: Float[Tensor, " d"],
    *,
    coefficient: float = 1.0,
    mode: SteerMode | str = SteerMode.ADD,
    positions: Sequence[int] | None = None,
) -> tuple[str, HookFn]:
    """A ``(site, hook)`` that steers the site's last dimension along ``direction`` (at ``positions`` of
    dimension 1 only, if given)."""
    site, mode = Site.parse(site), SteerMode(mode)
    direction = torch.as_tensor(direction).float().reshape(-1)
    if mode is SteerMode.PROJECT_OUT and float(direction.norm()) == 0:
        raise ValueError("cannot project out a zero direction")

    def steer(act: Tensor, s: Site) -> Tensor:
        if act.shape[-1] != direction.numel():
            raise ValueError(f"direction has {direction.numel()} dims, {s.name} has {act.shape[-1]}")
        d = direction.to(act.device, act.dtype)
        if mode is SteerMode.ADD:
            new = act + coefficient * d
        else:
            unit = d / d.norm()
            new = act - (act @ unit)[..., None] * unit
        if positions is None:
            return new
        keep = torch.zeros(act.shape[1], dtype=torch.bool, device=act.device)
        keep[list(positions)] = True
        return torch.where(keep.view(1, -1, *([1] * (act.dim() - 2))), new, act)

    return site.name, steer


@dataclass(frozen=True)
class SteeringVector:
    """mean(activations on set A) - mean(activations on set B) at one site and position."""

    vector: Tensor
    """the difference of means [d]"""
    site: str
    """the hook point it was read at"""
    projections_a: Tensor
    """each A example's activation projected on the unit vector"""
    projections_b: Tensor
    """each B example's activation projected on the unit vector"""

    def __repr__(self) -> str:
        return (
            f"SteeringVector({self.site}, norm {self.norm:.4g}; mean projection A "
            f"{float(self.projections_a.mean()):.3g}, B {float(self.projections_b.mean()):.3g})"
        )

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def hook(
        self,
        coefficient: float = 1.0,
        mode: SteerMode | str = SteerMode.ADD,
        positions: Sequence[int] | None = None,
    ) -> tuple[str, HookFn]:
        return steering_hook(self.site, self.vector, coefficient=coefficient, mode=mode, positions=positions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "norm": self.norm,
            "vector": self.vector.tolist(),
            "projections_a": self.projections_a.tolist(),
            "projections_b": self.projections_b.tolist(),
        }

    def plot(self, title: str | None = None):  # noqa: ANN201 - plotly Figure
        """How well the direction separates the two sets: histograms of the projections."""
        import plotly.graph_objects as go

        fig = go.Figure(
            [
                go.Histogram(x=self.projections_a.tolist(), name="A", opacity=0.6),
                go.Histogram(x=self.projections_b.tolist(), name="B", opacity=0.6),
            ]
        )
        fig.update_layout(
            barmode="overlay",
            template="plotly_white",
            xaxis_title="projection on the direction",
            title=title or f"mean-difference direction at {self.site} (norm {self.norm:.3g})",
        )
        return fig

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return save_result(self, path)


def _read(model: Transformer, tokens: Tensor, site: Site, position: int) -> Tensor:
    _, cache = model.run_with_cache(torch.as_tensor(tokens).to(model.W_E.device), [site])
    act = cache[site.name]
    return act[:, position].reshape(act.shape[0], -1).float()


def mean_difference(
    model: Transformer,
    tokens_a: Int[Tensor, "batch pos"],
    tokens_b: Int[Tensor, "batch pos"],
    site: str | Site | tuple,
    *,
    position: int = -1,
) -> SteeringVector:
    """The steering vector mean(A) - mean(B) of ``site`` at ``position`` (default: the last)."""
    site = Site.parse(site)
    a, b = _read(model, tokens_a, site, position), _read(model, tokens_b, site, position)
    vec = a.mean(0) - b.mean(0)
    unit = vec / vec.norm().clamp(min=1e-12)
    return SteeringVector(
        vector=vec.cpu(), site=site.name, projections_a=(a @ unit).cpu(), projections_b=(b @ unit).cpu()
    )
