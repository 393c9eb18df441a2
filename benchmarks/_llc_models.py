"""The regression models of the LLC validation (tests/dynamics/test_llc.py) as plain torch, importable from
devinterp's venv too: a full-rank linear regression and a deep linear network at the most singular point of
its true set, with noise projected out of the inputs' span (the empirical minimiser is the planted one)."""

from __future__ import annotations

import torch


class DLN(torch.nn.Module):
    """``x -> B(A(x))``, no biases: reduced-rank regression ``n_in -> hidden -> n_out``."""

    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.A = torch.nn.Linear(n_in, hidden, bias=False)
        self.B = torch.nn.Linear(hidden, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


def build(spec: dict) -> torch.nn.Module:
    """An empty model of ``spec`` (``{"kind": "linear", "d": 4}`` or ``{"kind": "dln", "shape": [4, 2, 3]}``)."""
    if spec["kind"] == "linear":
        return torch.nn.Linear(spec["d"], 1, bias=False)
    n_in, hidden, n_out = spec["shape"]
    return DLN(n_in, hidden, n_out)


def regression_case(spec: dict, n: int = 1000) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model at its planted minimum and its data ``(x [n d_in], y [n d_out])``."""
    g = torch.Generator().manual_seed(2)
    if spec["kind"] == "linear":
        d = spec["d"]
        truth = torch.arange(1.0, d + 1)[None]
    else:
        n_in, hidden, n_out = spec["shape"]
        rank = spec.get("rank", 1)
        truth = torch.randn(n_out, rank, generator=g) @ torch.randn(rank, n_in, generator=g)
    x = torch.randn(n, truth.shape[1], generator=g)
    noise = torch.randn(n, truth.shape[0], generator=g)
    noise = noise - x @ torch.linalg.lstsq(x, noise).solution
    y = x @ truth.T + noise
    model = build(spec)
    with torch.no_grad():
        if isinstance(model, torch.nn.Linear):
            model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
        elif isinstance(model, DLN):
            u, s, vt = torch.linalg.svd(truth)
            a, b = model.A.weight, model.B.weight
            a.zero_()
            b.zero_()
            a[:rank] = s[:rank, None].sqrt() * vt[:rank]
            b[:, :rank] = u[:, :rank] * s[:rank].sqrt()
    return model, x, y
