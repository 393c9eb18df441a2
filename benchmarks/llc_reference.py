"""The exact (Metropolis-corrected) HMC reference values of the LLC estimator's target for the deep linear
networks of tests/dynamics/test_llc.py (the same models and data; gamma = 1, full batch): what
``nbeta (E[L_n] - L_n(w*))`` is at a finite nbeta under the tempered, localised posterior, with no sampler
bias, for docs/dynamics.md ("Why 3.19 and not 3.5") and the tests' docstrings. Not a speed benchmark; CPU
seconds are recorded to size the runs (one thread).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/llc_reference.py            # every case, ~15 CPU minutes
    python benchmarks/llc_reference.py --cases dln-3-2-3@145 --chains 512  # one case, more chains
    python benchmarks/llc_reference.py --cases dln-3-2-3@145 --chains 64 --burn-in 2000 --seed 1 \
        --out benchmarks/results/llc_reference_burnin.json      # does a 3x longer burn-in move the value?

Each row is merged into benchmarks/results/llc_reference.json as soon as it exists (a case re-run replaces
its row). The precision is the chain-to-chain SE of the row; the first-half / second-half means of the draws
are recorded too (a drift between them would mean the burn-in was short).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from interplab.dynamics import HMCConfig, LLCConvergenceWarning, estimate_llc_hmc, mse_loss  # noqa: E402
from interplab.io import atomic_write_json  # noqa: E402
from tests.dynamics import test_llc as cases  # noqa: E402

SHAPES = {"dln-3-2-3": (3, 2, 3, 1), "dln-4-2-3": (4, 2, 3, 1)}
# case -> (nbeta, leapfrog steps, chains, draws, burn-in): the leapfrog step adapts to ~1 / sqrt(nbeta), so
# the larger nbeta gets more leapfrog steps per iteration to keep the trajectory long enough to move along
# the singular set (whose width is set by gamma, not nbeta)
CASES: dict[str, tuple[float, int, int, int, int]] = {
    "dln-3-2-3@145": (cases.N / math.log(cases.N), 8, 256, 1000, 600),
    "dln-4-2-3@145": (cases.N / math.log(cases.N), 8, 256, 1000, 600),
    "dln-3-2-3@1000": (1000.0, 16, 128, 600, 400),
    "dln-3-2-3@10000": (10000.0, 32, 64, 500, 400),
}


def run_case(name: str, chains: int | None, draws: int | None, seed: int, burn_in: int | None = None) -> dict:
    shape_name, _ = name.split("@")
    nbeta, leapfrog, c, d, burn = CASES[name]
    model, data = cases._dln_at_truth(*SHAPES[shape_name])
    lam, m = cases.aoyagi_rrr(*SHAPES[shape_name])
    cfg = HMCConfig(
        step_size=0.5 / math.sqrt(nbeta),
        leapfrog_steps=leapfrog,
        gamma=cases.GAMMA,
        nbeta=nbeta,
        chains=chains or c,
        draws=draws or d,
        burn_in=burn if burn_in is None else burn_in,
        seed=seed,
    )
    t, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LLCConvergenceWarning)
        est = estimate_llc_hmc(model, data, mse_loss, cfg)
    draws_ = est.trace[:, cfg.burn_in :]
    half = draws_.shape[1] // 2
    halves = [
        float(nbeta * (draws_[:, s].mean() - est.init_loss)) for s in (slice(0, half), slice(half, None))
    ]
    row = {
        "case": name,
        "shape": shape_name,
        "nbeta": nbeta,
        "gamma": cfg.gamma,
        "llc": est.llc,
        "se": est.se,
        "aoyagi_lambda": lam,
        "multiplicity": m,
        "finite_nbeta_formula": cases.finite_nbeta_llc(lam, m, nbeta),
        "first_half": halves[0],
        "second_half": halves[1],
        "acceptance": est.acceptance,
        "step_size": est.step_size,
        "leapfrog_steps": cfg.leapfrog_steps,
        "chains": cfg.chains,
        "draws": cfg.draws,
        "burn_in": cfg.burn_in,
        "seed": seed,
        "rhat": est.rhat,
        "rhat_distance": est.rhat_distance,
        "distance_halves": [
            float(est.distance[:, cfg.burn_in :][:, s].mean()) for s in (slice(0, half), slice(half, None))
        ],
        "ess_bulk": est.ess_bulk,
        "ess_tail": est.ess_tail,
        "warnings": [str(w.message) for w in caught],
        "init_loss": est.init_loss,
        "wall_s": time.perf_counter() - t,
        "cpu_s": time.process_time() - cpu,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--chains", type=int, help="override every case's chains")
    ap.add_argument("--draws", type=int, help="override every case's draws")
    ap.add_argument("--burn-in", type=int, help="override every case's burn-in")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llc_reference.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.cases:
        row = run_case(name, args.chains, args.draws, args.seed, args.burn_in)
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        rows = [r for r in old.get("rows", []) if r["case"] != name] + [row]
        atomic_write_json(
            args.out,
            {
                "what": "exact (Metropolis-corrected) HMC of the LLC estimator's target, deep linear networks "
                "of tests/dynamics/test_llc.py, gamma 1, full batch (interplab.dynamics.estimate_llc_hmc)",
                "torch": torch.__version__,
                "threads": 1,
                "rows": rows,
            },
        )


if __name__ == "__main__":
    main()
