"""Did the SGLD chains mix? R-hat and bulk / tail ESS (`interplab.dynamics.mcmc`) of the LLC estimates of the
analytic validation cases (tests/dynamics/test_llc.py: the same models, data and settings), at the tests'
draws and at 4x the draws, and of the small transformer of bench_llc.py at its settings and with a burn-in
and more draws. Not a speed benchmark: a measurement of the diagnostics, for docs/dynamics.md (JSON output;
wall seconds are given only to size the runs).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/llc_diagnostics.py --out benchmarks/results/llc_diagnostics.json

The bias-vs-step curve of one case (32 chains, the same simulated time ``draws * step`` at every step; about
3.5 CPU minutes a case) and the slow tests' mixing settings, into benchmarks/results/llc_step_sweep.json:

    python benchmarks/llc_diagnostics.py --sweep dln-4-2-3      # regression, planted, dln-3-2-3, dln-4-2-3
    python benchmarks/llc_diagnostics.py --mixing regression planted dln-3-2-3 dln-4-2-3
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
    t, cpu = time.perf_counter(), time.process_time()
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
        "cpu_s": time.process_time() - cpu,
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


def _cases() -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...], float, SGLDConfig]]:
    """The validation cases of tests/dynamics/test_llc.py: ``name -> (model, data, theory, the tests' config)``."""
    planted = SGLDConfig(
        step_size=2e-4, gamma=cases.GAMMA, chains=8, draws=3000, burn_in=500, batch_size=None
    )
    configs = {
        "regression": cases.CFG,
        "planted": planted,
        "dln-3-2-3": cases.DLN_CFG,
        "dln-4-2-3": cases.DLN_CFG,
    }
    out = {}
    for name, cfg in configs.items():
        model, data, theory = cases.validation_case(name)
        out[name] = (model, data, theory(default_nbeta(cases.N)), cfg)
    return out


def _sweep(name: str, steps: list[float], chains: int, steps_at_2e4: int) -> list[dict]:
    """The bias-vs-step curve of one case: SGLD at each step size with the same simulated time (``draws *
    step`` fixed, a quarter of it more as burn-in), ``chains`` chains (as cheap per step as 8 on CPU for these
    models: the cost is the per-step overhead)."""
    model, data, theory, cfg = _cases()[name]
    rows = []
    for h in steps:
        draws = round(steps_at_2e4 * 2e-4 / h)
        c = SGLDConfig(
            **{**vars(cfg), "step_size": h, "chains": chains, "draws": draws, "burn_in": draws // 4}
        )
        row = _row(name, theory, lambda c=c: estimate_llc(model, data, mse_loss, c))
        row["settings"] = f"sweep: {chains} chains, step {h:g}, {draws} draws"
        rows.append(row)
    return rows


def _mixing(names: list[str]) -> list[dict]:
    """The slow tests' settings (tests/dynamics/test_llc.py MIXING: mixed and in the unbiased regime)."""
    rows = []
    for name in names:
        model, data, theory = cases.validation_case(name)
        cfg = cases.MIXING[name]
        row = _row(
            name,
            theory(default_nbeta(cases.N)),
            lambda m=model, d=data, c=cfg: estimate_llc(m, d, mse_loss, c),
        )
        row["settings"] = (
            f"slow test (MIXING): step {cfg.step_size:g}, {cfg.draws} draws, burn-in {cfg.burn_in}"
        )
        rows.append(row)
    return rows


def _transformer() -> list[dict]:
    """bench_llc.py's model (its `trained_model` at its `TRAIN_STEPS`, the run of results/llc.json: the same
    L(w*), checked) at its settings, and with a burn-in and more draws."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_llc import DRAWS, TRAIN_STEPS, trained_model

    model, tokens = trained_model(TRAIN_STEPS)
    recorded = json.loads((ROOT / "benchmarks" / "results" / "llc.json").read_text())
    bench = SGLDConfig(
        step_size=1e-4, gamma=100.0, nbeta=30.0, chains=4, draws=DRAWS, burn_in=0, batch_size=16
    )
    longer = SGLDConfig(**{**vars(bench), "draws": 200, "burn_in": 50})
    rows = []
    for label, cfg in (("bench_llc settings", bench), ("burn-in 50, 200 draws", longer)):
        row = _row(
            "transformer of bench_llc.py", None, lambda c=cfg: estimate_llc(model, (tokens,), lm_loss, c)
        )
        row["settings"] = label
        row["train_steps"] = TRAIN_STEPS
        row["llc_json_init_loss"] = recorded["interplab"]["init_loss"]
        row["llc_json_llc"] = recorded["interplab"]["llc_median"]
        rows.append(row)
    if abs(rows[0]["init_loss"] - rows[0]["llc_json_init_loss"]) > 1e-5:
        raise RuntimeError(
            f"bench_llc's model does not reproduce results/llc.json: L(w*) {rows[0]['init_loss']:.6f}, recorded "
            f"{rows[0]['llc_json_init_loss']:.6f}"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llc_diagnostics.json")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4], help="multiples of the tests' draws")
    ap.add_argument(
        "--step-scales", type=float, nargs="+", default=[4.0], help="also 4x draws at these step multiples"
    )
    ap.add_argument("--no-transformer", action="store_true")
    ap.add_argument("--transformer-only", action="store_true", help="re-measure the transformer rows only")
    ap.add_argument(
        "--sweep",
        metavar="CASE",
        help="the bias-vs-step curve of one case (regression, planted, "
        "dln-3-2-3, dln-4-2-3), merged into --sweep-out",
    )
    ap.add_argument("--sweep-steps", type=float, nargs="+", default=[1e-4, 2e-4, 4e-4, 8e-4])
    ap.add_argument("--sweep-chains", type=int, default=32)
    ap.add_argument("--sweep-draws", type=int, default=16000, help="draws at step 2e-4 (scaled as 1 / step)")
    ap.add_argument("--sweep-out", type=Path, default=ROOT / "benchmarks" / "results" / "llc_step_sweep.json")
    ap.add_argument(
        "--mixing",
        metavar="CASE",
        nargs="+",
        help="the slow tests' settings of these cases, merged into --mixing-out",
    )
    ap.add_argument(
        "--mixing-out", type=Path, default=ROOT / "benchmarks" / "results" / "llc_step_sweep.json"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.mixing:
        rows = _mixing(args.mixing)
        old = json.loads(args.mixing_out.read_text()) if args.mixing_out.exists() else {"rows": []}
        keep = [r for r in old.get("mixing", []) if r["case"] not in args.mixing]
        atomic_write_json(args.mixing_out, {**old, "mixing": keep + rows})
        return
    if args.sweep:
        rows = _sweep(args.sweep, args.sweep_steps, args.sweep_chains, args.sweep_draws)
        old = json.loads(args.sweep_out.read_text()) if args.sweep_out.exists() else {"rows": []}
        keep = [r for r in old["rows"] if r["case"] != args.sweep or r["step_size"] not in args.sweep_steps]
        atomic_write_json(
            args.sweep_out, {**old, "torch": torch.__version__, "threads": 1, "rows": keep + rows}
        )
        return
    if args.transformer_only:  # the transformer rows anew, the validation rows of --out kept
        old = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
        rows = [r for r in old if r["case"] != "transformer of bench_llc.py"] + _transformer()
    else:
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
