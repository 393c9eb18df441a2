"""bergson 2.5.1 (PyPI ``bergson``, EleutherAI's attribution library) beside interplab: its projected per-example
gradients and its dense per-layer preconditioned influence of one MLP classifier, the problem handed over as files.

bergson runs in its own interpreter (``.peers/bergson``, built by ``bash scripts/peers.sh bergson``;
`tests.peers.peer_python("bergson")` finds it) and reads what `tests.kronfluence_peer.write_problem` writes;
``benchmarks/_bergson_peer.py`` does the jobs named and writes its results back (safetensors), including the
projection matrices it drew. Used by tests/data_attribution/test_bergson_peer.py and
benchmarks/bench_attribution_peers.py.

The projection: bergson projects a linear layer's gradient ``G [d_out, d_in]`` to ``left @ G @ right^T`` with
``left [p, d_out]`` and ``right [p, d_in]`` (no bias). That is interplab's `FactoredProjector` with ``P_out =
left^T`` and ``P_in = right^T`` (the bias row zero): `bergson_projector` builds it from the matrices bergson
returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from interplab.data_attribution import methods
from interplab.data_attribution.factored import FactoredProjector, linear_sites
from interplab.io import atomic_write_json, load_tensors
from tests.peers import run_runner

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "_bergson_peer.py"
JOBS = ("features", "influence")  # what the runner can do


def run_bergson(
    python: str,
    folder: Path,
    jobs: list[str],
    *,
    projection_dim: int,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Run the peer on ``folder`` (from `write_problem`) for ``jobs`` (of `JOBS`) at ``projection_dim``: its
    tensors and its report (version, seconds). A failed run raises RuntimeError with the peer's stderr."""
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown or not jobs:
        raise ValueError(f"jobs must be a non-empty list of {', '.join(map(repr, JOBS))}, got {jobs}")
    if projection_dim <= 0:
        raise ValueError(f"projection_dim must be a positive integer, got {projection_dim}")
    atomic_write_json(folder / "bergson.json", {"jobs": jobs, "projection_dim": projection_dim})
    report = run_runner(python, RUNNER, folder, name="bergson", env=env, timeout=timeout)
    return load_tensors(folder / "bergson_out.safetensors"), report


def bergson_projector(model: nn.Module, mats: dict[str, Tensor]) -> FactoredProjector:
    """interplab's projector over ``model``'s ``nn.Linear`` layers (in order) with the matrices bergson drew
    (``layer{i}.left``, ``layer{i}.right`` from `run_bergson`'s ``"features"`` job)."""
    sites = linear_sites(model)
    p_in, p_out = [], []
    for i, s in enumerate(sites):
        left, right = mats[f"layer{i}.left"].float(), mats[f"layer{i}.right"].float()
        if left.shape[1] != s.d_out or right.shape[1] != s.d_in:
            raise ValueError(
                f"layer {i} is {s.d_out} x {s.d_in}, but bergson's matrices are {tuple(left.shape)} and "
                f"{tuple(right.shape)}"
            )
        p_in.append(right.T)  # d_in rows: the bias coordinate, which bergson leaves out, projects to zero
        p_out.append(left.T)
    return FactoredProjector.from_matrices(sites, p_in, p_out)


def blockwise_influence(
    train: Tensor, query: Tensor, shapes: tuple[tuple[int, int], ...], *, damping: float
) -> Tensor:
    """interplab's influence ``[m, n]`` (`methods.influence`, sign ``-q^T (H + c I)^-1 g / n``) with one dense
    block per layer: ``H`` each layer's second moment ``F^T F / n`` of the projected training features."""
    n, out, start = train.shape[0], 0.0, 0
    for a, b in shapes:
        f, q = train[:, start : start + a * b].double(), query[:, start : start + a * b].double()
        out = out + methods.influence(f.T @ f / n, f, q, damping=damping).double()
        start += a * b
    assert isinstance(out, Tensor)
    return out
