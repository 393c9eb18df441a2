"""How good is an attribution? Linear datamodeling score (LDS) and planted-data recovery (AUC)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from interplab.hooks.site import Site, SiteKind
from interplab.model.transformer import Transformer


def _ranks(x: Tensor) -> Tensor:
    """Average ranks along the last dimension (ties share their mean rank)."""
    x = x.double()
    order = x.argsort(dim=-1)
    ranks = torch.empty_like(x)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], dtype=torch.float64).expand_as(x).contiguous())
    # average ties
    flat_x, flat_r = x.reshape(-1, x.shape[-1]), ranks.reshape(-1, x.shape[-1])
    for row in range(flat_x.shape[0]):
        vals, inverse, counts = torch.unique(flat_x[row], return_inverse=True, return_counts=True)
        if len(vals) < flat_x.shape[1]:
            sums = torch.zeros(len(vals), dtype=torch.float64).index_add_(0, inverse, flat_r[row])
            flat_r[row] = (sums / counts)[inverse]
    return flat_r.reshape(x.shape)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation along the last dimension."""
    ra, rb = _ranks(a), _ranks(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-30)


def lds(scores: Tensor, subsets: Tensor, actual: Tensor) -> Tensor:
    """Linear datamodeling score (Park et al. 2023).

    scores [n_target, n_train]: attribution of each target to each training example;
    subsets [n_models, n_train] bool: which examples each retrained model saw;
    actual [n_models, n_target]: the target measured on each retrained model.
    Returns the Spearman correlation between predicted (sum of scores over the subset) and actual target values
    across models, per target [n_target]; its mean is the LDS."""
    if subsets.shape[1] != scores.shape[-1]:
        raise ValueError(f"subsets cover {subsets.shape[1]} examples but scores cover {scores.shape[-1]}")
    if actual.shape != (subsets.shape[0], scores.shape[0]):
        raise ValueError(
            f"actual must be [n_models={subsets.shape[0]}, n_target={scores.shape[0]}], "
            f"got {tuple(actual.shape)}"
        )
    predicted = subsets.double() @ scores.double().T  # [n_models, n_target]
    return spearman(predicted.T, actual.double().T)


def auc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of ranking ``positives`` (bool [n]) above the rest by ``scores`` [n]
    (the Mann-Whitney statistic; ties count half)."""
    positives = positives.bool()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs positives and negatives, got {n_pos} and {n_neg}")
    ranks = _ranks(scores.double()) + 1
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ablation_check(
    model: Transformer, head: tuple[int, int], attributed: Tensor, others: Tensor
) -> dict[str, float]:
    """The check of the training-process-transparency work: zero-ablate the attributed component (a head's
    output, ``attn.hook_z``) and compare the rise of the next-token loss on the attributed sequences with the rise
    on other sequences. A faithful attribution makes the first clearly larger."""
    layer, h = head

    def zero(z: Tensor, site: object) -> Tensor:
        z = z.clone()
        z[:, :, h] = 0
        return z

    def mean_loss(tokens: Tensor, hooked: bool) -> float:
        with torch.no_grad():
            if hooked:
                logits = model.run_with_hooks(tokens, fwd_hooks=[(Site(SiteKind.Z, layer).name, zero)])
            else:
                logits = model(tokens)
            return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()))

    rise_attr = mean_loss(attributed, True) - mean_loss(attributed, False)
    rise_other = mean_loss(others, True) - mean_loss(others, False)
    return {
        "loss_rise_attributed": rise_attr,
        "loss_rise_others": rise_other,
        "ratio": rise_attr / rise_other if rise_other != 0 else float("inf"),
    }
