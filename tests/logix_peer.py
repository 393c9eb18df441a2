"""LogIX 0.1.1 (PyPI ``logix-ai``, the LoGra authors' library) beside interplab: LoGra's per-example projected
gradients and LogIX's K-FAC influence of one MLP classifier, the problem handed over as files.

LogIX runs in its own interpreter (``.peers/logix``, built by ``bash scripts/peers.sh logix``;
`tests.peers.peer_python("logix")` finds it) and reads what `tests.kronfluence_peer.write_problem` writes plus the
projection matrices `write_projection` writes; ``benchmarks/_logix_peer.py`` does the jobs named and writes its
results back (safetensors). Used by tests/data_attribution/test_logix_peer.py.

The projection: LogIX's LoRA beside a linear layer ``d_in -> d_out`` has an encoder ``A [r, d_in]`` and a decoder
``C [d_out, r]`` (``r = min(rank, d_in, d_out)``); the logged gradient of its zero bottleneck is ``(C^T g)(A x)^T``
per position, summed over positions. That is interplab's `FactoredProjector` with ``P_in = A^T`` (the bias row
zero: LogIX does not log biases) and ``P_out = C``: `logra_projector` builds the projector and the matrices both
sides use.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from interplab.data_attribution.factored import FactoredProjector, linear_sites
from interplab.io import atomic_write_json, load_tensors, save_tensors
from tests.peers import run_runner

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "_logix_peer.py"
JOBS = ("logra", "logra_influence", "influence")  # what the runner can do


def logra_projector(
    model: nn.Module, rank: int | None, seed: int = 0
) -> tuple[FactoredProjector, dict[str, Tensor]]:
    """interplab's projector over ``model``'s ``nn.Linear`` layers (in order) with LogIX's LoRA shapes: per layer
    Gaussian ``A [r, d_in]`` and ``C [d_out, r]`` (entries N(0, 1/r)), ``r = min(rank, d_in, d_out)``; returns the
    projector and the matrices as LogIX's runner reads them (``layer{i}.A``, ``layer{i}.C``). ``rank=None``:
    identities instead, the weight gradients unprojected and without biases (what LogIX logs without LoRA)."""
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be a positive integer or None, got {rank}")
    sites = linear_sites(model)
    gen = torch.Generator().manual_seed(seed)
    mats: dict[str, Tensor] = {}
    p_in, p_out = [], []
    for i, s in enumerate(sites):
        if rank is None:
            a, c = torch.eye(s.d_in), torch.eye(s.d_out)
        else:
            r = min(rank, s.d_in, s.d_out)
            a = torch.randn(r, s.d_in, generator=gen) / math.sqrt(r)
            c = torch.randn(s.d_out, r, generator=gen) / math.sqrt(r)
        mats[f"layer{i}.A"], mats[f"layer{i}.C"] = a, c
        p_in.append(a.T)  # d_in rows: the bias coordinate, which LogIX leaves out, projects to zero
        p_out.append(c)
    return FactoredProjector.from_matrices(sites, p_in, p_out), mats


def write_projection(folder: Path, mats: dict[str, Tensor]) -> None:
    save_tensors(folder / "projection.safetensors", {k: v.contiguous() for k, v in mats.items()})


def run_logix(
    python: str, folder: Path, jobs: list[str], *, env: dict[str, str] | None = None, timeout: float = 1800
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Run the peer on ``folder`` (`write_problem`, and `write_projection` for the ``"logra"`` jobs) for ``jobs``
    (of `JOBS`): its tensors and its report (version, seconds). A failed run raises
    RuntimeError with the peer's stderr."""
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown or not jobs:
        raise ValueError(f"jobs must be a non-empty list of {', '.join(map(repr, JOBS))}, got {jobs}")
    atomic_write_json(folder / "logix.json", {"jobs": jobs})
    report = run_runner(python, RUNNER, folder, name="LogIX", env=env, timeout=timeout)
    return load_tensors(folder / "logix_out.safetensors"), report
