"""AdamW-aware factorised preconditioning: exact when 1 / (sqrt(v_hat) + eps) is rank one."""

import torch
import torch.nn.functional as F
from torch import nn

from interplab.data_attribution.factored import FactoredProjector, factored_grads, linear_sites
from interplab.data_attribution.precondition import rank_one, site_scales


def test_rank_one_preconditioned_factored_equals_exact_elementwise():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    x, y = torch.randn(9, 6), torch.randint(0, 4, (9,))
    a, b = torch.rand(4) + 0.5, torch.rand(7) + 0.5  # 1/D = a b^T over [weight | bias]
    inv = {"weight": torch.outer(a, b[:6]), "bias": a * b[6]}
    ra, rb = rank_one(torch.outer(a, b))
    torch.testing.assert_close(torch.outer(ra, rb).float(), torch.outer(a, b))
    proj = FactoredProjector(linear_sites(lin), dim_in=3, dim_out=2)

    def ce(m, xx, yy):
        return F.cross_entropy(m(xx), yy, reduction="none")

    ours = factored_grads(lin, ce, (x, y), proj, scales=site_scales(proj.sites, inv))
    exact = {"weight": [], "bias": []}
    for i in range(9):
        gw, gb = torch.autograd.grad(ce(lin, x[i : i + 1], y[i : i + 1]).sum(), [lin.weight, lin.bias])
        exact["weight"].append(gw * inv["weight"])
        exact["bias"].append(gb * inv["bias"])
    ref = proj.project_grads({k: torch.stack(v) for k, v in exact.items()})
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
