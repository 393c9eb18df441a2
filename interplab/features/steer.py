"""Feature steering: add a feature's decoder direction to the SAE's site, or clamp the feature to a value,
while the model generates, and compare with the unsteered continuation.

>>> result = steer_generate(model, sae, prompt, feature=12, value=8.0, mode=SteerMode.ADD)   # doctest: +SKIP
>>> result.steered_text                                                                       # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import Enum

import torch
from jaxtyping import Int
from torch import Tensor

from interplab.features.collect import check_sae_fits, decoder_directions


class SteerMode(str, Enum):
    """How the feature is steered at every position of the SAE's site."""

    ADD = "add"
    """add ``value * d_f`` to the activation (``d_f``: the decoder direction in the model's units)"""
    CLAMP = "clamp"
    """set the feature's activation to ``value``: add ``(value - a_f(x)) * d_f`` (the SAE error is kept)"""


@dataclass(frozen=True)
class SteeringResult:
    """A prompt's greedy continuation with and without steering."""

    feature: int
    value: float
    mode: SteerMode
    prompt: list[int]
    baseline: list[int]
    steered: list[int]
    baseline_text: str
    steered_text: str

    def save(self, path) -> None:
        from interplab.io import atomic_write_text

        atomic_write_text(path, json.dumps({**asdict(self), "mode": self.mode.value}, indent=2))

    def plot(self):
        import plotly.graph_objects as go

        return go.Figure(
            go.Table(
                header={"values": ["", "continuation"]},
                cells={
                    "values": [
                        ["baseline", f"steered ({self.mode.value} {self.value:g})"],
                        [self.baseline_text, self.steered_text],
                    ]
                },
            )
        )


def steering_hook(sae, feature: int, value: float, mode: SteerMode):
    """A forward hook for the SAE's site that steers ``feature``."""
    mode = SteerMode(mode)
    direction = decoder_directions(sae, torch.tensor([feature]))[0]

    def hook(x: Tensor, _site) -> Tensor:
        d = direction.to(x.dtype)
        if mode is SteerMode.ADD:
            return x + value * d
        act = sae.encode(x.to(sae.W_enc.dtype))[..., feature].to(x.dtype)
        return x + (value - act)[..., None] * d

    return hook


@torch.no_grad()
def greedy_continue(model, prompt: Int[Tensor, " pos"], n_new: int, fwd_hooks=()) -> list[int]:
    """Greedy continuation (`interplab.model.generate` with the KV cache; the hooks apply at every step)."""
    from interplab.model.generate import generate

    n_new = min(n_new, model.cfg.n_ctx - prompt.shape[0])
    if n_new <= 0:
        return []
    out = generate(model, prompt[None], max_new_tokens=n_new, fwd_hooks=list(fwd_hooks))
    return out.new_tokens[0].tolist()


def decode(model, ids: list[int]) -> str:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return " ".join(f"#{i}" for i in ids)
    return tok.decode(ids)


def steer_generate(
    model,
    sae,
    prompt: Int[Tensor, " pos"] | list[int] | str,
    feature: int,
    value: float,
    mode: SteerMode = SteerMode.ADD,
    *,
    max_new_tokens: int = 20,
) -> SteeringResult:
    """Greedy continuations of ``prompt`` without and with ``feature`` steered (see `SteerMode`)."""
    hook = check_sae_fits(model, sae)
    if not 0 <= feature < sae.cfg.d_sae:
        raise ValueError(f"feature {feature} is out of range: the SAE has d_sae={sae.cfg.d_sae} features")
    if isinstance(prompt, str):
        prompt = model.to_tokens(prompt)[0]
    prompt = torch.as_tensor(prompt, dtype=torch.long).flatten()
    if prompt.numel() == 0:
        raise ValueError("the prompt is empty")
    base = greedy_continue(model, prompt, max_new_tokens)
    steered = greedy_continue(
        model, prompt, max_new_tokens, [(hook, steering_hook(sae, feature, value, mode))]
    )
    return SteeringResult(
        feature=feature,
        value=float(value),
        mode=SteerMode(mode),
        prompt=prompt.tolist(),
        baseline=base,
        steered=steered,
        baseline_text=decode(model, base),
        steered_text=decode(model, steered),
    )
