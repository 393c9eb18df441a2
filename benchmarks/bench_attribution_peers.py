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

3. ``logix`` (``--only logix``, LogIX 0.1.1 in its own venv, ``benchmarks/_logix_peer.py``): on the same
   digits MLP, LoGra's rank-16 projected per-example gradients of all 1,500 training examples by interplab's
   `factored_grads`, by LogIX's LoRA logging and by a naive loop (one backward pass per example, the exact
   gradient projected with the same matrices), interleaved in rounds (LogIX's seconds measured inside its
   process); feature agreement. Then K-FAC influence, raw (every weight, no biases, as LogIX logs) and in the
   LoGra space, by LogIX and by interplab (``corrected=False``; EK-FAC beside it), same absolute damping:
   agreement and LDS over ``--models`` MLPs retrained from the same initialisation on random halves.

4. ``bergson`` (``--only bergson``, bergson 2.5.1 in its own venv, ``benchmarks/_bergson_peer.py``): on the same
   MLP, bergson's projected per-example gradients (``GradientProcessor(projection_dim=16)``, its own Gaussian
   matrices, which its runner hands back so interplab's `factored_grads` projects with the same ones; no
   biases) by its ``InMemoryCollector`` and by interplab, interleaved rounds; then its dense per-layer
   preconditioned influence (``DensePreconditioner``, absolute damping) beside interplab's `methods.influence`
   block by block on the same features: agreement, time and LDS over the same retrained MLPs.

Times: interplab's fit + scores in this process; kronfluence's ``fit_all_factors`` + ``compute_pairwise_scores``
measured inside its process (its import and start-up, reported apart, are excluded), both on one thread,
interleaved in rounds; medians and the ratio.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attribution_peers.py \\
        --kronfluence-python .peers/kronfluence/bin/python --out benchmarks/results/attribution_peers.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attribution_peers.py --only logix --rounds 5 --models 100  # 3., merged
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attribution_peers.py --only bergson --rounds 5 --models 100  # 4., merged
"""

from __future__ import annotations

import argparse
import functools
import json
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
from interplab.data_attribution.factored import factored_grads  # noqa: E402
from interplab.data_attribution.kfac import EKFAC, ekfac_influence  # noqa: E402
from interplab.data_attribution.params import param_group  # noqa: E402
from interplab.data_attribution.per_example import per_example_grads  # noqa: E402
from interplab.io import atomic_write_json  # noqa: E402
from tests.bergson_peer import bergson_projector, blockwise_influence, run_bergson  # noqa: E402
from tests.kronfluence_peer import (  # noqa: E402
    interplab_ekfac,
    mlp,
    per_example_ce,
    run_kronfluence,
    to_interplab,
    write_problem,
)
from tests.logix_peer import logra_projector, run_logix, write_projection  # noqa: E402
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


def _train_mlp(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Sequential:
    """The 64-256-256-10 tanh MLP of the digits cases: seed-0 initialisation, 300 full-batch Adam steps (lr 3e-3)."""
    model = mlp([64, 256, 256, 10], "tanh", seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x.float()), y).backward()
        opt.step()
    return model


def digits_mlp(python: str, rounds: int) -> dict:
    x, y, xt, yt = digits(1500, 64, 0)
    model = _train_mlp(x, y)
    rep, _, _ = compare(python, model, (x, y), (xt, yt), activation="tanh", damping=1e-3, rounds=rounds)
    with torch.no_grad():
        rep["train_accuracy"] = float((model(x.float()).argmax(-1) == y).double().mean())
    return rep


def _naive_projected(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, proj) -> torch.Tensor:
    """One backward pass per example over the linear weights and biases, each gradient projected as it comes."""
    params = [dict(model.named_parameters())[n] for n in proj.param_names]
    rows = []
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(proj.project_grads({k: g[None] for k, g in zip(proj.param_names, grads, strict=True)}))
    return torch.cat(rows)


def _kfac(model, train, query, proj, *, corrected: bool, damping: float) -> torch.Tensor:
    """interplab's (E)K-FAC influence ``[m, n]`` in ``proj``'s space: the fit, both feature passes, the scores."""
    curv = EKFAC.fit(model, per_example_ce, train, proj, corrected=corrected, chunk_size=256)
    feats = factored_grads(model, per_example_ce, train, proj, chunk_size=256)
    q = factored_grads(model, per_example_ce, query, proj, chunk_size=256)
    return ekfac_influence(curv, feats, q, damping=damping, relative_damping=False).double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@functools.cache
def _mlp_lds_problem(n_models: int):
    """The digits MLP of sections 3 and 4, and what its LDS needs: ``(x, y, xt, yt, model, subsets, actual,
    retrain_s)``, ``actual`` the query losses of ``n_models`` MLPs retrained from the same initialisation on
    random halves (generator seed 1)."""
    x, y, xt, yt = digits(1500, 64, 0)
    x, xt = x.float(), xt.float()
    model = _train_mlp(x, y)
    w = time.perf_counter()
    gen = torch.Generator().manual_seed(1)
    subsets = torch.rand(n_models, len(y), generator=gen) < 0.5
    rows = []
    for s in subsets:
        retrained = _train_mlp(x[s], y[s])
        with torch.no_grad():
            rows.append(F.cross_entropy(retrained(xt), yt, reduction="none"))
    return x, y, xt, yt, model, subsets, torch.stack(rows).double(), time.perf_counter() - w


def logix_mlp(python: str, rounds: int, n_models: int, rank: int = 16, damping: float = 1e-3) -> dict:
    """Section 3 (module docstring): LogIX beside interplab on the digits MLP."""
    x, y, xt, yt, model, subsets, actual, retrain_s = _mlp_lds_problem(n_models)
    proj, mats = logra_projector(model, rank=rank, seed=0)
    raw_proj, _ = logra_projector(model, rank=None)
    env = peer_env()
    timings: dict[str, list[dict]] = {"interplab": [], "naive_loop": [], "logix": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_problem(folder, model, (x, y), (xt, yt), activation="tanh", damping=damping, batch_size=256)
        write_projection(folder, mats)
        feats = {}
        for _ in range(rounds):
            for name, fn in (
                ("interplab", lambda: factored_grads(model, per_example_ce, (x, y), proj, chunk_size=256)),
                ("naive_loop", lambda: _naive_projected(model, x, y, proj)),
            ):
                w, c = time.perf_counter(), time.process_time()
                feats[name] = fn()
                timings[name].append({"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c})
            w = time.perf_counter()
            raw, report = run_logix(python, folder, ["logra"], env=env)
            timings["logix"].append(
                {**report["logra"]["rounds"][0], "process_wall_s": time.perf_counter() - w}
            )
            feats["logix"] = raw["logra"]
        w = time.perf_counter()
        raw, report = run_logix(python, folder, ["logra_influence", "influence"], env=env)
        logix_influence_process_s = time.perf_counter() - w
    speed = {
        k: {"wall_s": _median(v, "wall_s"), "cpu_s": _median(v, "cpu_s"), "rounds": v}
        for k, v in timings.items()
    }
    out: dict = {
        "logix_version": report["version"],
        "n_train": len(y),
        "n_query": len(yt),
        "rank": rank,
        "projected_dim": proj.dim,
        "damping": damping,
        "n_models": n_models,
        "retrain_s": retrain_s,
        "features": {
            **speed,
            "max_rel_diff_logix_vs_interplab": _rel(feats["logix"], feats["interplab"]),
            "max_rel_diff_naive_vs_interplab": _rel(feats["naive_loop"], feats["interplab"]),
            "interplab_speedup_vs_naive_cpu": speed["naive_loop"]["cpu_s"] / speed["interplab"]["cpu_s"],
            "interplab_speedup_vs_logix_cpu": speed["logix"]["cpu_s"] / speed["interplab"]["cpu_s"],
            "interplab_speedup_vs_logix_wall": speed["logix"]["wall_s"] / speed["interplab"]["wall_s"],
        },
        "influence": {"logix_process_wall_s": logix_influence_process_s},
    }
    n = len(y)
    for space, p, job in (("raw", raw_proj, "influence"), ("logra", proj, "logra_influence")):
        theirs = to_interplab(raw[job], n)
        row: dict = {"logix": {**report[job], "lds": float(lds(theirs, subsets, actual).mean())}}
        for name, corrected in (("interplab_kfac", False), ("interplab_ekfac", True)):
            w, c = time.perf_counter(), time.process_time()
            ours = _kfac(model, (x, y), (xt, yt), p, corrected=corrected, damping=damping)
            row[name] = {
                "wall_s": time.perf_counter() - w,
                "cpu_s": time.process_time() - c,
                "lds": float(lds(ours, subsets, actual).mean()),
                "agreement_with_logix": agreement(ours, theirs),
            }
        row["interplab_kfac_speedup_vs_logix_cpu"] = row["logix"]["cpu_s"] / row["interplab_kfac"]["cpu_s"]
        out["influence"][space] = row
    return out


def bergson_mlp(python: str, rounds: int, n_models: int, dim: int = 16, damping: float = 1e-3) -> dict:
    """Section 4 (module docstring): bergson beside interplab on the digits MLP."""
    x, y, xt, yt, model, subsets, actual, retrain_s = _mlp_lds_problem(n_models)
    env = peer_env()
    timings: dict[str, list[dict]] = {"interplab": [], "bergson": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_problem(folder, model, (x, y), (xt, yt), activation="tanh", damping=damping, batch_size=256)
        got, report = run_bergson(python, folder, ["features", "influence"], projection_dim=dim, env=env)
        proj = bergson_projector(model, got)
        for r in range(rounds):
            if r:  # the first call's features and times serve round 0
                w = time.perf_counter()
                got, report = run_bergson(python, folder, ["features"], projection_dim=dim, env=env)
                timings["bergson"].append(
                    {**report["features"]["rounds"][0], "process_wall_s": time.perf_counter() - w}
                )
            else:
                timings["bergson"].append(report["features"]["rounds"][0])
                theirs_influence, influence_report = got["influence"], report["influence"]
            w, c = time.perf_counter(), time.process_time()
            ours = factored_grads(model, per_example_ce, (x, y), proj, chunk_size=256)
            timings["interplab"].append({"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c})
    speed = {
        k: {"wall_s": _median(v, "wall_s"), "cpu_s": _median(v, "cpu_s"), "rounds": v}
        for k, v in timings.items()
    }
    w, c = time.perf_counter(), time.process_time()
    train = factored_grads(model, per_example_ce, (x, y), proj, chunk_size=256)
    query = factored_grads(model, per_example_ce, (xt, yt), proj, chunk_size=256)
    scores = blockwise_influence(train, query, proj.shapes, damping=damping)
    ours_influence = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}
    theirs = -theirs_influence.double() / len(y)  # bergson's q^T (H + c I)^-1 g_i in interplab's sign
    return {
        "bergson_version": report["version"],
        "n_train": len(y),
        "n_query": len(yt),
        "projection_dim": dim,
        "projected_dim": proj.dim,
        "damping": damping,
        "n_models": n_models,
        "retrain_s": retrain_s,
        "features": {
            **speed,
            "max_rel_diff_bergson_vs_interplab": _rel(got["features"], ours),
            "interplab_speedup_vs_bergson_cpu": speed["bergson"]["cpu_s"] / speed["interplab"]["cpu_s"],
            "interplab_speedup_vs_bergson_wall": speed["bergson"]["wall_s"] / speed["interplab"]["wall_s"],
        },
        "influence_dense_per_layer": {
            "bergson": {**influence_report, "lds": float(lds(theirs, subsets, actual).mean())},
            "interplab": {**ours_influence, "lds": float(lds(scores, subsets, actual).mean())},
            "agreement": agreement(scores, theirs),
            "interplab_speedup_vs_bergson_cpu": influence_report["cpu_s"] / ours_influence["cpu_s"],
        },
    }


PARTS = ("kronfluence", "logix", "bergson")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/attribution_peers.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--kronfluence-python", default=str(ROOT / ".peers" / "kronfluence" / "bin" / "python"))
    ap.add_argument("--logix-python", default=str(ROOT / ".peers" / "logix" / "bin" / "python"))
    ap.add_argument("--bergson-python", default=str(ROOT / ".peers" / "bergson" / "bin" / "python"))
    ap.add_argument(
        "--only",
        choices=PARTS,
        help="run that peer's sections alone and merge them into --out (default: all)",
    )
    args = ap.parse_args()
    parts = [args.only] if args.only else list(PARTS)
    for part in parts:
        python = getattr(args, f"{part}_python")
        if not Path(python).exists():
            raise SystemExit(f"--{part}-python {python} does not exist: run `bash scripts/peers.sh {part}`")
    torch.set_num_threads(1)
    out = Path(args.out)
    report = json.loads(out.read_text()) if args.only and out.exists() else {}
    start = time.perf_counter()
    machine = {
        "threads": 1,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
    }
    if "kronfluence" in parts:
        report["machine"] = machine
        report["digits_softmax"] = digits_softmax(args.kronfluence_python, args.rounds, args.models)
        report["digits_mlp"] = digits_mlp(args.kronfluence_python, args.rounds)
        report["machine"]["load_avg_at_end"] = os.getloadavg()
        report["seconds_total"] = time.perf_counter() - start
    if "logix" in parts:
        t = time.perf_counter()
        report["logix_digits_mlp"] = logix_mlp(args.logix_python, args.rounds, args.models)
        report["logix_digits_mlp"]["machine"] = machine | {"load_avg_at_end": os.getloadavg()}
        report["logix_digits_mlp"]["seconds_total"] = time.perf_counter() - t
    if "bergson" in parts:
        t = time.perf_counter()
        report["bergson_digits_mlp"] = bergson_mlp(args.bergson_python, args.rounds, args.models)
        report["bergson_digits_mlp"]["machine"] = machine | {"load_avg_at_end": os.getloadavg()}
        report["bergson_digits_mlp"]["seconds_total"] = time.perf_counter() - t
    atomic_write_json(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
