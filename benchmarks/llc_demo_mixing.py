"""Which SGLD settings make the demo run's LLC estimates mix? Trials of `estimate_llc` on checkpoints of the
demo run (``interplab demo --no-features --out runs/demo``: induction-2l, 1,500 steps), on the data
``interplab llc`` uses (`run_tokens`), each with its settings, estimate, R-hat, bulk / tail ESS, the draws'
drift (the per-draw LLC averaged over chains in four quarters of the draws) and CPU seconds, appended to a JSON
as each finishes (so an interrupted study keeps what it measured). Not a speed benchmark: a measurement of
the mixing, for docs/dynamics.md.

    nice -n 10 python benchmarks/llc_demo_mixing.py --run runs/demo --step 700 \\
        --trial step_size=1e-4,gamma=100,draws=100,burn_in=20,batch_size=4 \\
        --trial step_size=1e-3,gamma=100,draws=400,burn_in=200,batch_size=4

A trial is ``key=value`` pairs of `SGLDConfig` fields, plus ``component=L0H0`` (a head; default the whole
model), ``seqs=N`` and ``seq_len=N`` (the data: default 64 windows of 128 tokens, the docs' command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from interplab import runs  # noqa: E402
from interplab.dynamics import LLCConvergenceWarning, SGLDConfig, estimate_llc, lm_loss  # noqa: E402
from interplab.dynamics.run import parse_components, run_tokens  # noqa: E402
from interplab.io import atomic_write_json  # noqa: E402
from interplab.model.io import load_native  # noqa: E402

_INT = {"chains", "draws", "burn_in", "batch_size", "seed", "seqs", "seq_len"}


def parse_trial(text: str) -> dict[str, object]:
    """``step_size=1e-3,draws=400`` as a dict of typed values."""
    out: dict[str, object] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key in _INT:
            out[key] = int(value)
        elif key == "component":
            out[key] = value.strip()
        elif key == "nbeta" and value.strip() == "None":
            out[key] = None
        else:
            out[key] = float(value)
    return out


def quarters(trace: torch.Tensor, burn_in: int, nbeta: float, init_loss: float) -> list[float]:
    """The per-draw LLC averaged over chains, in four quarters of the draws: a trend means the chains still
    move (the burn-in was too short for the simulated time)."""
    draws = nbeta * (trace[:, burn_in:].double() - init_loss)
    return [float(q.mean()) for q in draws.chunk(4, dim=1)]


def blocks(trace: torch.Tensor, n: int = 60) -> list[list[float]]:
    """Every chain's loss trace (burn-in included) as the means of ``n`` equal blocks of steps, to look at."""
    size = max(1, trace.shape[1] // n)
    cut = trace[:, : size * (trace.shape[1] // size)].double()
    return [[round(float(v), 5) for v in row] for row in cut.view(trace.shape[0], -1, size).mean(2)]


def trial(run_dir: Path, step: int, spec: dict[str, object], compile: bool) -> dict[str, object]:
    spec = dict(spec)
    component = spec.pop("component", None)
    seqs = int(spec.pop("seqs", 64))  # type: ignore[call-overload]
    seq_len = int(spec.pop("seq_len", 128))  # type: ignore[call-overload]
    cfg = SGLDConfig(**spec)  # type: ignore[arg-type]
    ckpt = next(c for c in runs.TrainRun.open(run_dir).checkpoints() if c.step == step)
    model = load_native(ckpt.path)
    tokens = run_tokens(run_dir, seqs, seq_len)
    comp = parse_components(model, [str(component)])[0] if component else None
    t, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LLCConvergenceWarning)
        est = estimate_llc(model, (tokens,), lm_loss, cfg, component=comp, compile=compile)
    row: dict[str, object] = {
        "checkpoint": step,
        "component": est.component,
        "seqs": seqs,
        "seq_len": seq_len,
        **{k: v for k, v in vars(cfg).items() if k != "explode"},
        "nbeta": est.nbeta,
        "simulated_time": cfg.draws * cfg.step_size,
        "burn_in_time": cfg.burn_in * cfg.step_size,
        "llc": est.llc,
        "se": est.se,
        "per_chain": list(est.per_chain),
        "rhat": est.rhat,
        "ess_bulk": est.ess_bulk,
        "ess_tail": est.ess_tail,
        "converged": est.converged,
        "quarters": quarters(est.trace, cfg.burn_in, est.nbeta, est.init_loss),
        "trace_blocks": blocks(est.trace),
        "init_loss": est.init_loss,
        "n_params": est.n_params,
        "compile": compile,
        "wall_s": time.perf_counter() - t,
        "cpu_s": time.process_time() - cpu,
        "load": os.getloadavg()[0],
    }
    print(json.dumps({k: v for k, v in row.items() if k != "per_chain"}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--step", type=int, nargs="+", default=[700], help="checkpoint steps")
    ap.add_argument("--trial", action="append", required=True, help="key=value,... (see above)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="", help="a note stored with these trials")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llc_demo_mixing.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {"trials": []}
    doc.setdefault(
        "setup",
        {
            "run": "interplab demo --no-features (induction-2l, 1,500 steps)",
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": args.threads,
        },
    )
    for step in args.step:
        for text in args.trial:
            row = trial(args.run, step, parse_trial(text), args.compile)
            row["label"] = args.label
            doc["trials"].append(row)
            atomic_write_json(args.out, doc)


if __name__ == "__main__":
    main()
