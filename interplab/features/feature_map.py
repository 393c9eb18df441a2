"""A 2-D map of an SAE's features: PCA of its unit-normalised decoder directions (UMAP is not a
dependency). Points that lie close have similar output directions.

>>> xy = decoder_pca(sae)            # [d_sae, 2]                                # doctest: +SKIP
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.features.collect import decoder_directions
from interplab.sae import SAE


@torch.no_grad()
def decoder_pca(sae: SAE, dims: int = 2) -> Float[Tensor, "feature dims"]:
    """The features' coordinates on the top ``dims`` principal axes of their unit decoder directions
    (centred; each axis' sign fixed so its largest-magnitude coordinate is positive, so the map is the same
    on every run)."""
    w = decoder_directions(sae).double()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w = w - w.mean(0)
    if not 0 < dims <= min(w.shape):
        raise ValueError(f"dims={dims}: the SAE's decoder has shape {tuple(w.shape)}")
    _, _, vh = torch.linalg.svd(w, full_matrices=False)
    xy = w @ vh[:dims].T
    sign = torch.sign(xy.gather(0, xy.abs().argmax(0, keepdim=True)))
    return (xy * torch.where(sign == 0, 1.0, sign)).float()
