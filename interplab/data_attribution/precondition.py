"""AdamW-aware preconditioning from the optimiser state a training checkpoint keeps.

interplab's trainer saves ``optimizer.safetensors`` in every checkpoint: per parameter (indexed in the order of
its two AdamW parameter groups: matrices ``W_*`` first, then the rest) ``exp_avg``, ``exp_avg_sq`` and ``step``.
An AdamW step moves a parameter by ``lr * m_hat / (sqrt(v_hat) + eps)``; to first order (momentum ignored, as
in the 2026 AdamW-aware influence work and `GradientRecorder`) a training example's share of the update is its
gradient divided elementwise by ``D = sqrt(v_hat) + eps``, v_hat = exp_avg_sq / (1 - beta2^step).

For factorised projections an elementwise ``1 / D`` on ``G = sum_t g_t x_t^T`` keeps the factorisation only when
``1 / D`` is rank one, ``a b^T``: then ``(1/D) * G = diag(a) G diag(b) = sum_t (a * g_t)(b * x_t)^T``.
`rank_one` gives the best such fit (the leading singular pair, non-negative by Perron-Frobenius), exact when the
second moments factor (as Adafactor assumes); `site_scales` turns it into per-site input / output scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from interplab.data_attribution.factored import LinearSite
from interplab.io import load_tensors
from interplab.runs import OPTIMIZER, STATE, read_json


def adam_inverse_scale(
    checkpoint: str | Path, model: nn.Module, eps: float | None = None
) -> dict[str, Tensor]:
    """``{param name: 1 / (sqrt(v_hat) + eps)}`` from a trainer checkpoint's AdamW state, for the trainable
    parameters of ``model`` (the model the checkpoint holds). Clear errors for checkpoints without it."""
    folder = Path(checkpoint)
    opt_file = folder / OPTIMIZER
    if not opt_file.is_file():
        raise FileNotFoundError(
            f"{folder} keeps no optimiser state ({OPTIMIZER}); AdamW preconditioning needs it"
        )
    state = read_json(folder / STATE)
    groups = state.get("param_groups")
    if not groups:
        raise ValueError(
            f"{folder}/{STATE} has no param_groups: not an AdamW checkpoint of interplab's trainer"
        )
    tensors = load_tensors(opt_file)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    order = [n for n, _ in named if n.rsplit(".", 1)[-1].startswith("W_")]
    order += [n for n, _ in named if not n.rsplit(".", 1)[-1].startswith("W_")]
    indices = [i for g in groups for i in g["params"]]
    if len(indices) != len(order):
        raise ValueError(
            f"{folder}: the optimiser holds {len(indices)} parameters, the model {len(order)} trainable ones"
        )
    shapes = dict(named)
    out = {}
    for name, idx, group in zip(order, indices, [g for g in groups for _ in g["params"]], strict=True):
        v = tensors.get(f"state.{idx}.exp_avg_sq")
        if (
            v is None
        ):  # never updated (e.g. a step-0 checkpoint): Adam's first step is sign-like, D = |g|; use 1
            out[name] = torch.ones_like(shapes[name], dtype=torch.float32)
            continue
        if v.shape != shapes[name].shape:
            raise ValueError(
                f"{folder}: exp_avg_sq of {name} has shape {tuple(v.shape)}, the parameter {tuple(shapes[name].shape)}"
            )
        step = float(tensors[f"state.{idx}.step"])
        beta2 = float(group.get("betas", (0.9, 0.999))[1])
        v_hat = v.float() / (1 - beta2**step)
        out[name] = 1.0 / (v_hat.sqrt() + (eps if eps is not None else float(group.get("eps", 1e-8))))
    return out


def rank_one(d: Tensor, iters: int = 50) -> tuple[Tensor, Tensor]:
    """The best rank-one fit ``a b^T`` (Frobenius) of a non-negative matrix ``d [m, n]``: (a [m], b [n])."""
    if d.dim() != 2:
        raise ValueError(f"rank_one needs a matrix, got shape {tuple(d.shape)}")
    d = d.double()
    b = d.mean(0)
    for _ in range(iters):
        a = d @ b
        a = a / a.norm().clamp_min(1e-300)
        b = d.T @ a
    return a, b


def site_scales(sites: Sequence[LinearSite], inverse_scale: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Per site (input scale [d_in(+1)], output-gradient scale [d_out]) whose outer product best fits the
    sites' ``1 / D`` in their ``[d_out, d_in(+bias)]`` layout (`factored_grads`' ``scales``)."""
    out = []
    for s in sites:
        mat = s.to_matrix(inverse_scale[s.weight][None])[0]
        if s.bias is not None:
            mat = torch.cat([mat, s.bias_to_vec(inverse_scale[s.bias][None])[0][:, None]], dim=1)
        a, b = rank_one(mat)
        out.append((b.float(), a.float()))
    return out
