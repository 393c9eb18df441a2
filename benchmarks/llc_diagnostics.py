"""Did the SGLD chains mix? R-hat and bulk / tail ESS (`interplab.dynamics.mcmc`) of the LLC estimates of the
analytic validation cases (tests/dynamics/test_llc.py: the same models, data and settings), at the tests'
draws and at 4x the draws, and of the small transformer of bench_llc.py at its settings and with a burn-in
and more draws. Not a speed benchmark: a measurement of the diagnostics, for docs/dynamics.md (JSON output;
wall seconds are given only to size the runs).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/llc_diagnostics.py --out benchmarks/results/llc_diagnostics.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from interplab.dynamics import LLCConvergenceWarning, SGLDConfig, estimate_llc, lm_loss, mse_loss  # noqa: E402
from interplab.dynamics.llc import LLCEstimate, default_nbeta  # noqa: E402
from interplab.io import atomic_write_json  # noqa: E402
from tests.dynamics import test_llc as cases  # noqa: E402


def _row(name: str, theory: float | None, run: Callable[[], LLCEstimate]) -> dict:
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LLCConvergenceWarning)
        est = run()
    cfg = est.config
    row = {
        "case": name,
        "theory": theory,
        "llc": est.llc,
        "se": est.se,
        "rhat": est.rhat,
        "ess_bulk": est.ess_bulk,
        "ess_tail": est.ess_tail,
        "ess_bulk_per_chain": est.ess_bulk / est.chains,
        "converged": est.converged,
        "chains": est.chains,
        "draws": cfg.draws,
        "burn_in": cfg.burn_in,
        "step_size": cfg.step_size,
        "nbeta": est.nbeta,
        "init_loss": est.init_loss,
        "wall_s": time.perf_counter() - t,
    }
    print(json.dumps(row), flush=True)
    return row


def _validation(scale: int, step_scale: float = 1.0) -> list[dict]:
    def more(cfg: SGLDConfig) -> SGLDConfig:
        return SGLDConfig(
            **{**vars(cfg), "draws": scale * cfg.draws, "step_size": step_scale * cfg.step_size}
        )

    rows = []
    model, data = cases._linear(4)
    rows.append(
        _row("full-rank regression d=4", 2.0, lambda: estimate_llc(model, data, mse_loss, more(cases.CFG)))
    )
    x, y = cases._regression(4, torch.tensor([[1.0, -2.0, 0.5, 0.0]]), seed=1)
    quartic = cases._Quartic(4)
    with torch.no_grad():
        quartic.w.copy_(torch.linalg.lstsq(x, y).solution[:-1, 0])
    planted = SGLDConfig(
        step_size=2e-4, gamma=cases.GAMMA, chains=8, draws=3000, burn_in=500, batch_size=None
    )
    rows.append(
        _row(
            "planted degenerate direction",
            1.75,
            lambda: estimate_llc(quartic, (x, y), mse_loss, more(planted)),
        )
    )
    for shape in [(3, 2, 3, 1), (4, 2, 3, 1)]:
        dln, dln_data = cases._dln_at_truth(*shape)
        lam, m = cases.aoyagi_rrr(*shape)
        target = cases.finite_nbeta_llc(lam, m, default_nbeta(cases.N))
        name = f"deep linear {shape[0]}-{shape[1]}-{shape[2]} rank {shape[3]}"
        rows.append(
            _row(name, target, lambda d=dln, dd=dln_data: estimate_llc(d, dd, mse_loss, more(cases.DLN_CFG)))
        )
    for r in rows:
        r["settings"] = "tests" + (f", {scale}x draws" if scale != 1 else "")
        r["settings"] += f", {step_scale:g}x step size" if step_scale != 1 else ""
    return rows


def _transformer() -> list[dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_llc import trained_model

    model, tokens = trained_model(300)
    bench = SGLDConfig(step_size=1e-4, gamma=100.0, nbeta=30.0, chains=4, draws=50, burn_in=0, batch_size=16)
    longer = SGLDConfig(**{**vars(bench), "draws": 200, "burn_in": 50})
    rows = []
    for label, cfg in (("bench_llc settings", bench), ("burn-in 50, 200 draws", longer)):
        row = _row(
            "transformer of bench_llc.py", None, lambda c=cfg: estimate_llc(model, (tokens,), lm_loss, c)
        )
        row["settings"] = label
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llc_diagnostics.json")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4], help="multiples of the tests' draws")
    ap.add_argument(
        "--step-scales", type=float, nargs="+", default=[4.0], help="also 4x draws at these step multiples"
    )
    ap.add_argument("--no-transformer", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [r for s in args.scales for r in _validation(s)]
    rows += [r for s in args.step_scales for r in _validation(4, s)]
    if not args.no_transformer:
        rows += _transformer()
    atomic_write_json(
        args.out,
        {
            "what": "R-hat (rank-normalised split) and bulk/tail ESS of LLC estimates; threshold R-hat < 1.01",
            "torch": torch.__version__,
            "threads": 1,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
