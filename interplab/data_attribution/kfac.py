"""Block-diagonal Kronecker-factored curvature (K-FAC and EK-FAC) for influence functions, per linear site.

For a site with (projected, bias-augmented) inputs x_t and output gradients g_t, one example's gradient is
``G_n = sum_t g_t x_t^T`` and the Fisher block ``F = E_n[vec G_n vec G_n^T]`` is approximated as ``A (x) S`` with
``A = E_tokens[x x^T]`` and ``S = E_n[sum_t g g^T]`` (K-FAC; exact when inputs and output gradients are
independent). EK-FAC (George et al. 2018; Grosse et al. 2023, as in kronfluence) keeps K-FAC's eigenbases
``Q_A``, ``Q_S`` and replaces its eigenvalues by the exact second moments of the gradients in that basis,
``lambda_kj = E_n[(Q_S^T G_n Q_A)_kj^2]``: the best diagonal fit in the Kronecker eigenbasis, exact whenever the
Fisher is diagonal there (in particular whenever K-FAC is exact). The inverse of ``F + damping I`` is then a
rotation, a division and a rotation back. Sites are independent blocks (block-diagonal across layers).

It works in the projector's space (LoGra: the curvature of the projected gradients), so it costs ``k_in^3 +
k_out^3`` per site; with unprojected sides (`FactoredProjector` sizes at least the layer's) it is the ordinary
EK-FAC of the layer.

>>> from interplab.data_attribution.factored import FactoredProjector, factored_grads, linear_sites, lm_losses
>>> proj = FactoredProjector(linear_sites(model), dim_in=8, dim_out=8)
>>> curv = EKFAC.fit(model, lm_losses, tokens, proj)
>>> feats = factored_grads(model, lm_losses, tokens, proj)    # [n, proj.dim]
>>> scores = ekfac_influence(curv, feats, feats[:1], damping=1e-3)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from interplab.data_attribution.factored import BatchObjective, FactoredProjector, capture_factors


@dataclass(frozen=True)
class SiteCurvature:
    """One site's factors: eigenbases ``q_in [k_in, k_in]``, ``q_out [k_out, k_out]`` and eigenvalues
    ``lam [k_out, k_in]`` (EK-FAC's corrected ones, or K-FAC's products ``s_k a_j``)."""

    q_in: Tensor
    q_out: Tensor
    lam: Tensor


@dataclass(frozen=True)
class EKFAC:
    """Block-diagonal (E)K-FAC curvature over a `FactoredProjector`'s sites (float64)."""

    projector: FactoredProjector
    sites: tuple[SiteCurvature, ...]
    corrected: bool
    n_examples: int

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        objective: BatchObjective,
        examples: Tensor | tuple[Tensor, ...],
        projector: FactoredProjector,
        *,
        corrected: bool = True,
        chunk_size: int = 32,
    ) -> EKFAC:
        """Two passes over ``examples``: the covariances (then their eigenbases), then, for EK-FAC, the
        eigenvalue correction. ``objective`` gives per-example losses [n] (for a true Fisher, let it sample the
        labels from the model's own predictions)."""
        examples = examples if isinstance(examples, tuple) else (examples,)
        n = examples[0].shape[0]
        k = len(projector.sites)
        shapes = projector.shapes
        a_sum = [torch.zeros(s[1], s[1], dtype=torch.float64) for s in shapes]
        s_sum = [torch.zeros(s[0], s[0], dtype=torch.float64) for s in shapes]
        tokens = [0] * k

        def chunks() -> list[tuple[list[Tensor], list[Tensor]]]:
            out = []
            for start in range(0, n, chunk_size):
                chunk = tuple(e[start : start + chunk_size] for e in examples)
                xs, gs = capture_factors(model, objective, chunk, projector.sites)
                out.append(
                    tuple(
                        zip(
                            *(
                                projector.project_factors(i, x, g)
                                for i, (x, g) in enumerate(zip(xs, gs, strict=True))
                            ),
                            strict=True,
                        )
                    )
                )
            return out  # type: ignore[return-value]

        passes = chunks()
        for pxs, pgs in passes:
            for i in range(k):
                px, pg = pxs[i].double().flatten(0, 1), pgs[i].double().flatten(0, 1)
                a_sum[i] += px.T @ px
                s_sum[i] += pg.T @ pg
                tokens[i] += px.shape[0]
        curv = []
        for i in range(k):
            a = a_sum[i] / max(tokens[i], 1)
            s = s_sum[i] / n
            ea, qa = torch.linalg.eigh(a)
            es, qs = torch.linalg.eigh(s)
            curv.append(SiteCurvature(qa, qs, es.clamp_min(0)[:, None] * ea.clamp_min(0)[None]))
        if corrected:
            lam = [torch.zeros_like(c.lam) for c in curv]
            for pxs, pgs in passes:
                for i, c in enumerate(curv):
                    rot = torch.einsum("ntk,ntj->nkj", pgs[i].double() @ c.q_out, pxs[i].double() @ c.q_in)
                    lam[i] += rot.pow(2).sum(0)
            curv = [SiteCurvature(c.q_in, c.q_out, lam[i] / n) for i, c in enumerate(curv)]
        return cls(projector, tuple(curv), corrected, n)

    def precondition(self, feats: Tensor, damping: float = 0.0, *, relative: bool = False) -> Tensor:
        """``(F + lambda I)^-1`` applied to features ``[m, dim]`` (the projector's layout), block by block;
        lambda = ``damping``, or ``damping`` x each site's mean eigenvalue when ``relative``."""
        if feats.shape[-1] != self.projector.dim:
            raise ValueError(
                f"features have length {feats.shape[-1]}, the projector gives {self.projector.dim}"
            )
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        blocks = []
        for i, c in enumerate(self.sites):
            blocks.append(_block(self, i, feats, damping * float(c.lam.mean()) if relative else damping))
        return torch.cat(blocks, dim=1)

    def matrix(self) -> Tensor:
        """The dense approximate Fisher ``[dim, dim]`` (block-diagonal; for tests and small models)."""
        blocks = []
        for c in self.sites:
            q = torch.kron(c.q_out, c.q_in)  # vec index (k, j) -> k * ki + j, as the features are laid out
            blocks.append(q @ torch.diag(c.lam.reshape(-1)) @ q.T)
        return torch.block_diag(*blocks)


def ekfac_influence(
    curvature: EKFAC,
    train: Tensor,
    target: Tensor,
    *,
    damping: float = 1e-3,
    n_train: int | None = None,
    relative_damping: bool = True,
) -> Tensor:
    """Influence functions with (E)K-FAC curvature, the convention of `methods.influence`: the predicted change
    of the target after adding example i with weight 1/n, ``-g_target^T (F + lambda I)^-1 g_i / n``.
    ``relative_damping``: lambda = damping x the mean eigenvalue (per site), as kronfluence's heuristic; else
    ``damping`` itself."""
    n = n_train if n_train is not None else train.shape[0]
    t = target[None] if target.dim() == 1 else target
    pre = curvature.precondition(t, damping, relative=relative_damping)
    scores = -(pre @ train.double().T) / n
    return (scores[0] if target.dim() == 1 else scores).float()


def _block(curv: EKFAC, i: int, feats: Tensor, damping: float) -> Tensor:
    shapes: Sequence[tuple[int, int]] = curv.projector.shapes
    start = sum(a * b for a, b in shapes[:i])
    ko, ki = shapes[i]
    c = curv.sites[i]
    v = feats[:, start : start + ko * ki].double().reshape(-1, ko, ki)
    rot = c.q_out.T @ v @ c.q_in
    lam = c.lam + damping
    if bool((lam <= 0).any()):
        raise ValueError("the curvature is singular in some direction: pass damping > 0")
    return (c.q_out @ (rot / lam) @ c.q_in.T).flatten(1)
