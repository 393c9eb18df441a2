"""Per-example gradients of a parameter group, through ``torch.func`` (vmap over grad), chunked to a memory budget.

>>> from interplab.data_attribution import param_group
>>> group = param_group(model, "head:0.1")
>>> g = per_example_grads(model, lm_loss, tokens, group)
>>> g.shape == (tokens.shape[0], group.numel)
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from interplab.data_attribution.params import ParamGroup
from interplab.model.transformer import Transformer

#: an objective: (model, one example's tensors without a batch dim...) -> scalar
Objective = Callable[..., Tensor]
M = TypeVar("M", bound=nn.Module)


def logits_of(model: nn.Module, tokens: Tensor) -> Tensor:
    """The model's logits for ``tokens [batch pos]`` without the forward's input checks (which read tensor values
    and so cannot run under vmap; `per_example_grads` checks the tokens beforehand)."""
    if isinstance(model, Transformer):
        ctx = model.context(tokens)
        return model.unembed_resid(model.run_blocks(model.embed_tokens(tokens, ctx), ctx))
    return model(tokens)


def lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy of one sequence ``tokens [pos]`` (the language-model training loss)."""
    logits = logits_of(model, tokens[None])[0]
    return F.cross_entropy(logits[:-1].float(), tokens[1:])


class _Bound(nn.Module):
    """Lets ``functional_call`` run an arbitrary objective over a model with swapped parameters."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, *example: Tensor) -> Tensor:
        return self.objective(self.model, *example)


def per_example_grads(
    model: nn.Module,
    objective: Objective,
    examples: Tensor | tuple[Tensor, ...],
    group: ParamGroup,
    *,
    chunk_size: int | None = None,
    memory_budget: float = 1e9,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Gradients of ``objective(model, example)`` for each example, restricted to ``group``: [n, group.numel].

    Chunked so that the per-example gradients of the group's full parameters stay under ``memory_budget``
    bytes per chunk (or ``chunk_size`` examples). ``transform`` maps each chunk's gradients [chunk, numel] to
    rows [chunk, ...] (a projection, a norm) as they are made, so the full [n, numel] matrix is never held:
    the result is ``transform`` of the gradients, concatenated over the chunks."""
    examples = examples if isinstance(examples, tuple) else (examples,)
    n = examples[0].shape[0]
    if isinstance(model, Transformer) and not examples[0].is_floating_point():
        model.check_tokens(examples[0], None)
    params = dict(model.named_parameters())
    names = group.param_names
    free = {k: params[k].detach() for k in names}
    frozen = {k: v.detach() for k, v in params.items() if k not in free}
    full_numel = sum(free[k].numel() for k in names)
    if chunk_size is None:
        chunk_size = max(1, int(memory_budget // (4 * max(full_numel, 1) * 3)))
    bound = _Bound(model, objective)

    def f(p: dict[str, Tensor], *example: Tensor) -> Tensor:
        merged = {"model." + k: v for k, v in {**frozen, **p}.items()}
        return functional_call(bound, merged, example)

    per_ex = vmap(grad(f), in_dims=(None,) + (0,) * len(examples))
    out = []
    for start in range(0, n, chunk_size):
        chunk = tuple(e[start : start + chunk_size] for e in examples)
        g = group.flatten(per_ex(free, *chunk), batched=True)
        out.append(g if transform is None else transform(g))
    return torch.cat(out)


def objective_grad(model: M, objective: Callable[[M], Tensor], group: ParamGroup) -> Tensor:
    """The gradient of a scalar function of the model (a target) with respect to ``group``: [group.numel]."""
    return group.flatten(objective_grads(model, objective, group.param_names))


def objective_grads(model: M, objective: Callable[[M], Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """The gradient of a scalar function of the model (a target) with respect to the parameters ``names``,
    by name (zeros where it does not depend on one)."""
    params = dict(model.named_parameters())
    leaves = {k: params[k].detach().clone().requires_grad_(True) for k in names}
    merged = {k: leaves.get(k, v.detach()) for k, v in params.items()}
    bound = _Bound(model, lambda m: objective(m))
    with torch.enable_grad():
        value = functional_call(bound, {"model." + k: v for k, v in merged.items()}, ())
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise ValueError(
                f"a target must return a scalar tensor, got {type(value).__name__} "
                f"{tuple(value.shape) if isinstance(value, Tensor) else ''}"
            )
        if not value.requires_grad:
            raise ValueError(
                "the target is not differentiable with respect to the chosen parameters "
                "(its value does not depend on them through differentiable operations)"
            )
        grads = torch.autograd.grad(value, [leaves[k] for k in names], allow_unused=True)
    return {
        k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(names, grads, strict=True)
    }
