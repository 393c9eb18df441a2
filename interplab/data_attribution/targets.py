"""Targets: differentiable scalar functions of a model's parameters that attribution explains.

Each target is a `Target` (name + ``fn(model) -> scalar``). Mechanism scores read attention patterns through
hooks, so they follow the parameters when those are swapped in by ``torch.func``.

>>> t = parse_target(model, "induction:1.2")
>>> t(model)
tensor(..., grad_fn=<SelectBackward0>)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from interplab.analysis.heads import masked_score, pattern_masks, repeated_random_tokens
from interplab.data_attribution.per_example import logits_of
from interplab.hooks.site import Site, SiteKind
from interplab.model.config import ModelConfig
from interplab.model.transformer import Transformer

if TYPE_CHECKING:
    from interplab.sae.base import SAE


@dataclass(frozen=True)
class Target:
    """A named differentiable scalar function of the model. ``rises``: whether the target grows as what it
    measures forms (a mechanism score) or falls (a loss); ``window="auto"`` in `attribute_run` follows it."""

    name: str
    fn: Callable[[Transformer], Tensor]
    rises: bool = True

    def __call__(self, model: Transformer) -> Tensor:
        return self.fn(model)


def _default_probe(cfg: ModelConfig) -> Tensor:
    """16 sequences of random tokens repeated once (half length up to 32), as formation scores them."""
    return repeated_random_tokens(cfg.d_vocab, min(32, cfg.n_ctx // 2), 16, distinct=False)


def _pattern(model: Transformer, tokens: Tensor, layer: int) -> Tensor:
    """Attention pattern [batch, head, q, k] of ``layer``, differentiable in the parameters."""
    store: dict[str, Tensor] = {}

    def grab(x: Tensor, site: object) -> None:
        store["p"] = x

    with model.hooks(fwd_hooks=[(Site(SiteKind.PATTERN, layer).name, grab)]):
        ctx = model.context(tokens)
        model.run_blocks(model.embed_tokens(tokens, ctx), ctx, stop=layer + 1)
    return store["p"]


def _check_head(model: Transformer, layer: int, head: int) -> None:
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} does not exist: the model has {cfg.n_layers} layers")
    if not 0 <= head < cfg.n_heads:
        raise ValueError(f"head {head} does not exist: the model has {cfg.n_heads} heads per layer")


def _pattern_score_target(
    model: Transformer, layer: int, head: int, probe: Tensor | None, score: str, name: str
) -> Target:
    """The head's pattern score ``score`` (`interplab.analysis.heads.masked_score`: the definition
    `head_scores` and formation use) on ``probe``, differentiable in the parameters."""
    _check_head(model, layer, head)
    probe = probe if probe is not None else _default_probe(model.cfg)
    # induction: the targets of the probe's construction (x x), as formation scores it
    period = probe.shape[1] // 2 if score == "induction" else None
    mask = pattern_masks(probe, period=period)[score]

    def fn(m: Transformer) -> Tensor:
        p = _pattern(m, probe, layer)[:, head : head + 1]
        return masked_score(p, mask.to(p.device))[0]

    return Target(f"{name}:{layer}.{head}", fn)


def induction_target(model: Transformer, layer: int, head: int, probe: Tensor | None = None) -> Target:
    """Mean attention from each position of the second half of a repeated sequence to the token after the
    previous occurrence of its token (the induction score, with the probe's construction targets)."""
    return _pattern_score_target(model, layer, head, probe, "induction", "induction")


def prev_token_target(model: Transformer, layer: int, head: int, probe: Tensor | None = None) -> Target:
    """Mean attention from each position to the previous one (the previous-token score)."""
    return _pattern_score_target(model, layer, head, probe, "previous_token", "prev")


def loss_target(tokens: Tensor, name: str = "loss") -> Target:
    """Mean next-token loss on ``tokens [batch pos]`` (e.g. one test example)."""
    tokens = tokens if tokens.dim() == 2 else tokens[None]

    def fn(m: Transformer) -> Tensor:
        logits = logits_of(m, tokens)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())

    return Target(name, fn, rises=False)


def neuron_target(model: Transformer, layer: int, neuron: int, probe: Tensor) -> Target:
    """Mean post-activation of one MLP neuron over the probe tokens."""
    cfg = model.cfg
    if cfg.attn_only or not 0 <= layer < cfg.n_layers or not 0 <= neuron < cfg.d_mlp:
        raise ValueError(
            f"neuron {layer}.{neuron} does not exist ({cfg.n_layers} layers, d_mlp={cfg.d_mlp}, "
            f"attn_only={cfg.attn_only})"
        )

    def fn(m: Transformer) -> Tensor:
        store: dict[str, Tensor] = {}
        with m.hooks(fwd_hooks=[(Site(SiteKind.MLP_POST, layer).name, lambda x, s: store.update(a=x))]):
            ctx = m.context(probe)
            m.run_blocks(m.embed_tokens(probe, ctx), ctx, stop=layer + 1)
        return store["a"][..., neuron].mean()

    return Target(f"neuron:{layer}.{neuron}", fn)


def composition_target(
    model: Transformer, kind: str, sender: tuple[int, int], receiver: tuple[int, int]
) -> Target:
    """Composition score (Elhage et al. 2021) between a sender head's OV circuit and a receiver head's
    Q, K or V input: ||M||_F / (||A||_F ||B||_F) for the product M of the two circuits."""
    if kind not in ("q", "k", "v"):
        raise ValueError(f"composition kind must be 'q', 'k' or 'v', got {kind!r}")
    _check_head(model, *sender)
    _check_head(model, *receiver)
    if receiver[0] <= sender[0]:
        raise ValueError(f"the receiver {receiver} must be in a later layer than the sender {sender}")

    def fn(m: Transformer) -> Tensor:
        a1, a2 = m.blocks[sender[0]].attn, m.blocks[receiver[0]].attn
        ov1 = a1.W_V[sender[1]] @ a1.W_O[sender[1]]
        h2 = receiver[1]
        second = a2.W_V[h2] @ a2.W_O[h2] if kind == "v" else a2.W_Q[h2] @ a2.W_K[h2].T
        prod = {"q": ov1 @ second, "k": second @ ov1.T, "v": ov1 @ second}[kind]
        return prod.norm() / (ov1.norm() * second.norm())

    return Target(f"composition:{kind}:{sender[0]}.{sender[1]}->{receiver[0]}.{receiver[1]}", fn)


def feature_target(model: Transformer, sae: SAE, probe: Tensor, feature: int) -> Target:
    """Mean activation of one SAE feature (``sae.encode`` at ``sae.cfg.hook_name``) over the probe tokens."""
    hook = sae.cfg.hook_name

    def fn(m: Transformer) -> Tensor:
        store: dict[str, Tensor] = {}
        with m.hooks(fwd_hooks=[(hook, lambda x, s: store.update(a=x))]):
            logits_of(m, probe)
        return sae.encode(store["a"])[..., feature].mean()

    return Target(f"feature:{hook}:{feature}", fn)


def parse_target(model: Transformer, spec: str, probe: Tensor | None = None) -> Target:
    """``induction:L.H``, ``prev:L.H``, ``neuron:L.N`` (needs probe), ``composition:K:L1.H1->L2.H2``, ``loss`` (needs probe)."""
    kind, _, arg = spec.partition(":")
    try:
        if kind in ("induction", "prev"):
            layer, head = (int(x) for x in arg.split("."))
            return (induction_target if kind == "induction" else prev_token_target)(model, layer, head, probe)
        if kind == "neuron" and probe is not None:
            layer, neuron = (int(x) for x in arg.split("."))
            return neuron_target(model, layer, neuron, probe)
        if kind == "composition":
            ckind, _, pair = arg.partition(":")
            s, r = pair.split("->")
            return composition_target(model, ckind, _head(s), _head(r))
        if kind == "loss" and probe is not None:
            return loss_target(probe)
    except (ValueError, TypeError) as err:
        if "does not exist" in str(err) or "must" in str(err):
            raise
        raise ValueError(f"cannot parse target {spec!r}: {err}") from None
    raise ValueError(
        f"unknown target {spec!r}; valid: induction:L.H, prev:L.H, composition:q|k|v:L1.H1->L2.H2, "
        "neuron:L.N and loss (these two need probe tokens)"
    )


def _head(text: str) -> tuple[int, int]:
    """``"L.H"`` as ``(layer, head)``."""
    layer, head = text.split(".")
    return int(layer), int(head)
