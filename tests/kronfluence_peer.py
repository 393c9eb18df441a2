"""kronfluence 1.0.1 beside interplab: EK-FAC influence of one MLP classifier, the problem handed over as files.

kronfluence runs in its own interpreter (``.peers/kronfluence``, built by ``bash scripts/peers.sh kronfluence``;
`tests.peers.peer_python("kronfluence")` finds it) and reads what `write_problem` writes: the MLP's weights and
the train/query examples (safetensors) and the settings (JSON). ``benchmarks/_kronfluence_peer.py`` fits its
EK-FAC factors, scores every query against every training example and writes the score matrix back
(safetensors). Used by tests/data_attribution/test_kronfluence_peer.py and benchmarks/bench_attribution_peers.py.

The two conventions: kronfluence's score is ``g_query^T (F + lambda I)^-1 g_train`` (positive = the training
example lowers the query's loss), interplab's `ekfac_influence` the predicted change of the query's loss after
adding the example with weight 1/n, ``-g_query^T (F + lambda I)^-1 g_train / n``: `to_interplab` maps one to the
other. Both damp with an absolute ``lambda`` here (kronfluence's ``damping_factor``; interplab's
``relative_damping=False``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from interplab.data_attribution.factored import FactoredProjector, factored_grads, linear_sites
from interplab.data_attribution.kfac import EKFAC, ekfac_influence
from interplab.io import atomic_write_json, load_tensors, save_tensors
from tests.peers import run_runner

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "_kronfluence_peer.py"
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "none": None}


def mlp(sizes: list[int], activation: str = "tanh", seed: int = 0) -> nn.Sequential:
    """``Linear, act, ..., Linear`` through ``sizes`` (float32), the architecture the peer rebuilds."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if len(sizes) < 2:
        raise ValueError(f"sizes needs an input and an output size, got {sizes}")
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        act = ACTIVATIONS[activation]
        if i < len(sizes) - 2 and act is not None:
            layers.append(act())
    return nn.Sequential(*layers)


def per_example_ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def trained_mlp(
    sizes: list[int], n_train: int, n_query: int, steps: int, seed: int = 0
) -> tuple[nn.Sequential, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A small tanh `mlp` trained ``steps`` full-batch Adam steps (lr 1e-2) on Gaussian inputs with random labels
    (generator seed 1): the model, the train and the query examples of the peer-parity tests."""
    model = mlp(sizes, "tanh", seed=seed)
    gen = torch.Generator().manual_seed(1)
    d, k = sizes[0], sizes[-1]
    x, y = torch.randn(n_train, d, generator=gen), torch.randint(0, k, (n_train,), generator=gen)
    xq, yq = torch.randn(n_query, d, generator=gen), torch.randint(0, k, (n_query,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, (x, y), (xq, yq)


def write_problem(
    folder: Path,
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    *,
    activation: str,
    damping: float,
    fisher: str = "empirical",
    rounds: int = 1,
    batch_size: int = 256,
) -> Path:
    """The files `benchmarks/_kronfluence_peer.py` reads, in ``folder``; returns ``folder``. ``model``'s
    ``nn.Linear`` layers, in order, with ``activation`` between them, must be the whole model (as `mlp` builds
    it, or the digits softmax regression with ``activation="none"``)."""
    if fisher not in ("empirical", "true"):
        raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    tensors = {
        "x_train": train[0].float(),
        "y_train": train[1],
        "x_query": query[0].float(),
        "y_query": query[1],
    }
    for i, lin in enumerate(linears):
        tensors[f"layer{i}.weight"] = lin.weight.detach().float()
        tensors[f"layer{i}.bias"] = lin.bias.detach().float()
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "problem.safetensors", tensors)
    atomic_write_json(
        folder / "problem.json",
        {
            "activation": activation,
            "damping": damping,
            "fisher": fisher,
            "rounds": rounds,
            "batch_size": batch_size,
        },
    )
    return folder


def run_kronfluence(
    python: str, folder: Path, *, env: dict[str, str] | None = None, timeout: float = 1800
) -> tuple[Tensor, dict[str, Any]]:
    """Run the peer on ``folder`` (from `write_problem`): kronfluence's scores ``[m, n]`` (its convention) and
    its report (version, per-round seconds). A failed run raises RuntimeError with the peer's stderr."""
    report = run_runner(python, RUNNER, folder, name="kronfluence", env=env, timeout=timeout)
    return load_tensors(folder / "scores.safetensors")["scores"], report


def to_interplab(kronfluence_scores: Tensor, n_train: int) -> Tensor:
    """kronfluence's ``g_q^T H^-1 g_i`` as interplab's predicted loss change ``-g_q^T H^-1 g_i / n``."""
    return -kronfluence_scores.double() / n_train


def interplab_ekfac(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    *,
    damping: float,
    fisher_labels: Tensor | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """interplab's EK-FAC influence ``[m, n]`` over every linear layer of ``model`` (unprojected sides, so the
    ordinary per-layer EK-FAC); the Fisher from the true labels (empirical) or from ``fisher_labels`` ``[k, n]``
    (k labels per training example drawn from the model: the true Fisher)."""
    x, y = train[0].float(), train[1]
    proj = FactoredProjector(linear_sites(model), dim_in=10**9, dim_out=10**9)
    if fisher_labels is None:
        fit_on: tuple[Tensor, Tensor] = (x, y)
    else:
        fit_on = (x.repeat(fisher_labels.shape[0], 1), fisher_labels.reshape(-1))
    curv = EKFAC.fit(model, per_example_ce, fit_on, proj, chunk_size=chunk_size)
    feats = factored_grads(model, per_example_ce, (x, y), proj, chunk_size=chunk_size)
    q = factored_grads(model, per_example_ce, (query[0].float(), query[1]), proj, chunk_size=chunk_size)
    return ekfac_influence(curv, feats, q, damping=damping, relative_damping=False).double()
