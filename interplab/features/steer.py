"""Feature steering: add a feature's decoder direction to the SAE's site, or clamp the feature to a value,
while the model generates, and compare with the unsteered continuation.

Steering strength is relative to the feature's own scale: ``strength`` is a multiple of the feature's max
activation over the corpus (``max_act``, recorded in the feature database), so ``strength=2`` adds twice the
feature's strongest natural firing (``ADD``), or clamps it to twice that (``CLAMP``), whatever the SAE's
units. An absolute ``value`` (in the SAE's activation units) can be given instead.

>>> from interplab.features.store import FeatureStore
>>> rec = FeatureStore("features.db").feature(12)
>>> r = steer_generate(model, sae, [1, 2, 3], feature=12, strength=2.0, max_act=rec["max_act"], max_new_tokens=5)
>>> len(r.steered), len(r.baseline)                     # 5 new tokens, with and without steering
(5, 5)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from enum import Enum

import torch
from jaxtyping import Int
from torch import Tensor

from interplab.features.collect import check_sae_fits, decoder_directions

DEFAULT_STRENGTH = 1.0
"""the default steering strength, in multiples of the feature's max activation"""


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
    """the activation added (``ADD``) or clamped to (``CLAMP``), in the SAE's units: ``strength * max_act``"""
    mode: SteerMode
    prompt: list[int]
    baseline: list[int]
    steered: list[int]
    baseline_text: str
    steered_text: str
    strength: float | None = None
    """``value`` as a multiple of the feature's max activation (None when an absolute value was given)"""
    max_act: float | None = None
    """the feature's max activation over the corpus the strength is relative to"""

    def save(self, path) -> None:
        from interplab.io import atomic_write_text

        atomic_write_text(path, json.dumps({**asdict(self), "mode": self.mode.value}, indent=2))

    def describe(self) -> str:
        """``"add 2x max activation (1.66)"`` or ``"clamp 5"``."""
        if self.strength is None:
            return f"{self.mode.value} {self.value:.3g}"
        return f"{self.mode.value} {self.strength:g}x max activation ({self.value:.3g})"

    def plot(self):
        import plotly.graph_objects as go

        return go.Figure(
            go.Table(
                header={"values": ["", "continuation"]},
                cells={
                    "values": [
                        ["baseline", f"steered ({self.describe()})"],
                        [self.baseline_text, self.steered_text],
                    ]
                },
            )
        )


def steering_value(strength: float | None, max_act: float | None, value: float | None = None) -> float:
    """The activation to steer with: ``strength * max_act``, or ``value`` when given (absolute units)."""
    if value is not None:
        if max_act is not None:
            raise ValueError("give either strength with max_act, or an absolute value, not both")
        if not math.isfinite(value):
            raise ValueError(f"the steering value must be a finite number, not {value}")
        return float(value)
    if strength is None or not math.isfinite(strength):
        raise ValueError(f"the steering strength must be a finite number, not {strength}")
    if max_act is None:
        raise ValueError(
            "the steering strength is a multiple of the feature's max activation: pass max_act "
            "(FeatureStore(db).feature(f)['max_act']) or an absolute value=..."
        )
    if not (math.isfinite(max_act) and max_act > 0):
        raise ValueError(
            f"the feature's max activation is {max_act}: it never fired, so a relative strength means "
            "nothing; give an absolute value instead"
        )
    return float(strength) * float(max_act)


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
    strength: float | None = DEFAULT_STRENGTH,
    mode: SteerMode = SteerMode.ADD,
    *,
    max_act: float | None = None,
    value: float | None = None,
    max_new_tokens: int = 20,
) -> SteeringResult:
    """Greedy continuations of ``prompt`` without and with ``feature`` steered (see `SteerMode`).

    The steering activation is ``strength * max_act`` (``max_act``: the feature's max activation over the
    corpus, ``FeatureStore(db).feature(feature)["max_act"]``), or the absolute ``value`` when given."""
    hook = check_sae_fits(model, sae)
    if not 0 <= feature < sae.cfg.d_sae:
        raise ValueError(f"feature {feature} is out of range: the SAE has d_sae={sae.cfg.d_sae} features")
    mode = SteerMode(mode)
    act = steering_value(strength, max_act, value)
    relative = value is None
    direction = decoder_directions(sae, torch.tensor([feature]))[0]
    if not torch.isfinite(act * direction).all():
        raise ValueError(f"steering with {act:g} overflows: the feature's direction times it is not finite")
    if isinstance(prompt, str):
        prompt = model.to_tokens(prompt)[0]
    prompt = torch.as_tensor(prompt, dtype=torch.long).flatten()
    if prompt.numel() == 0:
        raise ValueError("the prompt is empty")
    base = greedy_continue(model, prompt, max_new_tokens)
    steered = greedy_continue(model, prompt, max_new_tokens, [(hook, steering_hook(sae, feature, act, mode))])
    return SteeringResult(
        feature=feature,
        value=act,
        mode=mode,
        prompt=prompt.tolist(),
        baseline=base,
        steered=steered,
        baseline_text=decode(model, base),
        steered_text=decode(model, steered),
        strength=float(strength) if relative else None,
        max_act=float(max_act) if relative else None,
    )
