"""`susceptibility` against its closed form on a regular model where the response is not zero.

Linear regression at its exact minimiser w* with half-MSE: L_q = L* + 1/2 d^T H d (d = w - w*). Shifting the
data to (2x, 2y) makes L_q' = 4 L_q, so D = L_q' - L_q = 3 L_q and L_h = (1 + 3h) L_q. The tempered, localised
posterior is Gaussian with precision nbeta (1 + 3h) H + gamma I, so llc(h) = 1/2 sum_i a_i / (a_i + gamma) with
a_i = nbeta (1 + 3h) lambda_i (H's eigenvalues), and

    chi = d llc / dh at h = 0 = 3/2 sum_i nbeta lambda_i gamma / (nbeta lambda_i + gamma)^2.

With gamma ~ nbeta * lambda the response is large (about 3/8 per parameter); leaving out the covariance term of
the estimator would double it, a wrong sign of it would make it 3x larger.
"""

from __future__ import annotations

import math

import torch

from interplab.dynamics import SGLDConfig, mse_loss, susceptibility

N = 1000


def test_susceptibility_of_a_curvature_shift_equals_the_closed_form():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 2, generator=g)
    noise = torch.randn(N, 1, generator=g)
    noise = noise - x @ torch.linalg.lstsq(x, noise).solution  # the empirical minimiser is the planted one
    y = x @ torch.tensor([[1.0], [-2.0]]) + noise
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    nbeta = N / math.log(N)
    lam = torch.linalg.eigvalsh(x.T @ x / N).double()  # the Hessian of half-MSE
    gamma = float(nbeta * lam.mean())
    expected = float((1.5 * nbeta * lam * gamma / (nbeta * lam + gamma) ** 2).sum())
    # mixes (R-hat 1.0096, ESS bulk 880 of 24,000 draws); 5 CPU-s
    cfg = SGLDConfig(step_size=2e-4, gamma=gamma, chains=8, draws=3000, burn_in=200, batch_size=None, seed=0)
    got = susceptibility(model, (x, y), (2 * x, 2 * y), mse_loss, cfg)
    with torch.no_grad():
        assert math.isclose(got.delta_loss, 3 * float(mse_loss(model(x), (x, y))), rel_tol=1e-5)
    assert abs(got.chi - expected) <= 3 * got.se + 0.03 * expected, (got.chi, got.se, expected)
    assert got.se < 0.1 * expected  # the check can tell the closed form from its 2x and 3x mistakes
