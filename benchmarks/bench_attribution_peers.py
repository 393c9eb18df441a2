"""EK-FAC influence side by side with kronfluence 1.0.1 (JSON output).

Two models on sklearn's digits, each scored by interplab's `EKFAC` / `ekfac_influence` and by kronfluence (its own
venv, ``benchmarks/_kronfluence_peer.py``, the problem handed over as safetensors + JSON), same weights, data,
per-layer block-diagonal scope and absolute damping:

1. ``digits_softmax``: the LDS benchmark's softmax regression (600 train, 64 query, L2 1e-2, the damping; the
   same subsets and retrained models as `lds_experiment`): score agreement (Pearson and Spearman of the score
   matrices, max difference), LDS of each (with the exact-Hessian influence as the ceiling), for the empirical
   Fisher (true labels: the two compute the same thing) and the true Fisher (labels sampled from the model:
   interplab 8 draws per example, kronfluence its one draw per example per pass); wall and CPU time.
2. ``digits_mlp``: a 64-256-256-10 tanh MLP trained on 1,500 digits (two hidden layers, three blocks), 64
   queries: agreement and time (no retraining, so no LDS).

Times: interplab's fit + scores in this process; kronfluence's ``fit_all_factors`` + ``compute_pairwise_scores``
measured inside its process (its import and start-up, reported apart, are excluded), both on one thread,
interleaved in rounds; medians and the ratio.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attribution_peers.py \\
        --kronfluence-python .peers/kronfluence/bin/python --out benchmarks/results/attribution_peers.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from interplab.data_attribution import lds, methods  # noqa: E402
from interplab.data_attribution.convex import _test_losses, digits, fit, hessian_of_mean_loss  # noqa: E402
from interplab.data_attribution.evaluate import spearman  # noqa: E402
from interplab.data_attribution.params import param_group  # noqa: E402
from interplab.data_attribution.per_example import per_example_grads  # noqa: E402
from interplab.io import atomic_write_json  # noqa: E402
from tests.kronfluence_peer import interplab_ekfac, mlp, run_kronfluence, to_interplab, write_problem  # noqa: E402
from tests.peers import peer_env  # noqa: E402


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    a, b = ours.double(), theirs.double()
    return {
        "pearson": float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]),
        "spearman": float(spearman(a.flatten(), b.flatten())),
        "spearman_per_query_mean": float(spearman(a, b).mean()),
        "max_abs_diff_over_max_abs": float((a - b).abs().max() / b.abs().max()),
    }


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def compare(
    python: str,
    model: torch.nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    *,
    activation: str,
    damping: float,
    rounds: int,
    fisher_labels: torch.Tensor | None = None,
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Interleaved rounds of both; (report, our scores, theirs in our convention)."""
    fisher = "empirical" if fisher_labels is None else "true"
    ours_t: list[dict] = []
    theirs_t: list[dict] = []
    ours = theirs = None
    with tempfile.TemporaryDirectory() as tmp:
        write_problem(
            Path(tmp),
            model,
            train,
            query,
            activation=activation,
            damping=damping,
            fisher=fisher,
            batch_size=512,
        )
        for _ in range(rounds):
            w, c = time.perf_counter(), time.process_time()
            ours = interplab_ekfac(model, train, query, damping=damping, fisher_labels=fisher_labels)
            ours_t.append({"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c})
            w = time.perf_counter()
            raw, report = run_kronfluence(python, Path(tmp), env=peer_env())
            process_wall = time.perf_counter() - w
            theirs_t.append({**report["rounds"][0], "process_wall_s": process_wall})
            theirs = to_interplab(raw, len(train[1]))
    assert ours is not None and theirs is not None
    out = {
        "fisher": fisher,
        "damping": damping,
        "n_train": len(train[1]),
        "n_query": len(query[1]),
        "n_params": sum(p.numel() for p in model.parameters()),
        "kronfluence_version": report["version"],
        "agreement": agreement(ours, theirs),
        "interplab": {
            "wall_s": _median(ours_t, "wall_s"),
            "cpu_s": _median(ours_t, "cpu_s"),
            "rounds": ours_t,
        },
        "kronfluence": {
            k: _median(theirs_t, k)
            for k in ("wall_s", "cpu_s", "fit_wall_s", "score_wall_s", "process_wall_s")
        }
        | {"rounds": theirs_t},
    }
    out["speedup_wall"] = out["kronfluence"]["wall_s"] / out["interplab"]["wall_s"]
    out["speedup_cpu"] = out["kronfluence"]["cpu_s"] / out["interplab"]["cpu_s"]
    return out, ours, theirs


def digits_softmax(python: str, rounds: int, n_models: int) -> dict:
    l2, n_train, n_test, seed = 1e-2, 600, 64, 0
    x, y, xt, yt = digits(n_train, n_test, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    subsets = torch.rand(n_models, n_train, generator=gen) < 0.5  # as lds_experiment draws them
    actual = torch.stack([_test_losses(fit(x[s], y[s], l2=l2), xt, yt) for s in subsets])
    full = fit(x, y, l2=l2)
    group = param_group(full, "all")
    exact = methods.influence(
        hessian_of_mean_loss(full, x, y, l2),
        per_example_grads(full, _ce_one, (x, y), group),
        per_example_grads(full, _ce_one, (xt, yt), group),
    )
    model = full.float()
    with torch.no_grad():
        p = F.softmax(model(x.float()), -1)
    sampled = torch.multinomial(p, 8, replacement=True, generator=torch.Generator().manual_seed(0)).T
    out: dict = {
        "n_models": n_models,
        "l2": l2,
        "lds_exact_hessian_influence": float(lds(exact, subsets, actual).mean()),
    }
    for name, labels, r in (("empirical_fisher", None, rounds), ("true_fisher", sampled, 1)):
        rep, ours, theirs = compare(
            python, model, (x, y), (xt, yt), activation="none", damping=l2, rounds=r, fisher_labels=labels
        )
        rep["lds"] = {
            "interplab": float(lds(ours, subsets, actual).mean()),
            "kronfluence": float(lds(theirs, subsets, actual).mean()),
        }
        out[name] = rep
    return out


def _ce_one(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x[None]), y[None])


def digits_mlp(python: str, rounds: int) -> dict:
    x, y, xt, yt = digits(1500, 64, 0)
    model = mlp([64, 256, 256, 10], "tanh", seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x.float()), y).backward()
        opt.step()
    rep, _, _ = compare(python, model, (x, y), (xt, yt), activation="tanh", damping=1e-3, rounds=rounds)
    with torch.no_grad():
        rep["train_accuracy"] = float((model(x.float()).argmax(-1) == y).double().mean())
    return rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/attribution_peers.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--kronfluence-python", default=str(ROOT / ".peers" / "kronfluence" / "bin" / "python"))
    args = ap.parse_args()
    if not Path(args.kronfluence_python).exists():
        raise SystemExit(
            f"--kronfluence-python {args.kronfluence_python} does not exist: run `bash scripts/peers.sh kronfluence`"
        )
    torch.set_num_threads(1)
    start = time.perf_counter()
    report = {
        "machine": {
            "threads": 1,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(),
        },
        "digits_softmax": digits_softmax(args.kronfluence_python, args.rounds, args.models),
        "digits_mlp": digits_mlp(args.kronfluence_python, args.rounds),
    }
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    report["seconds_total"] = time.perf_counter() - start
    atomic_write_json(args.out, report)
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
