"""LLC estimation: interplab vs devinterp 2.0 on the same model, data and sampler settings (JSON output).

Cases (`CASES`): the recorded runs' small interplab attention-only transformer (trained a few hundred steps on
repeated random tokens, so its weights sit near a minimum), a mid-size transformer with MLPs, and two of the
validation's regression models (`_llc_models.py`: full-rank linear regression and a 4 -> 2 -> 3 deep linear
network, full batch). devinterp runs in its own venv (``.peers/devinterp`` or ``INTERPLAB_DEVINTERP_PYTHON``,
torch 2.13 CPU, built by ``bash scripts/peers.sh devinterp``) with the checkout on PYTHONPATH so it loads the
same model, through its public ``devinterp.slt.llc.llc`` with the same SGLD step size, nbeta, localisation, chains, draws and batch size (no
burn-in: devinterp averages every step).

Rounds are interleaved (interplab's default path, with ``--compile`` interplab's compiled path, interplab's
per-chain reference path, devinterp, ...; the compiled path's first call, the compile, is timed before the
rounds and recorded apart as ``compile_first_call``); the
report gives medians of wall and CPU seconds of the estimator call alone (imports, model loading and training
excluded on both sides), the calls' voluntary and involuntary context switches (a wall time far above the CPU
time with no voluntary switches is the machine's other jobs, not waiting), both estimates with their
chain-to-chain SE (of one round: the rounds repeat the same seed), whether they agree within 2 combined SEs,
and the arithmetic floor: chains x draws x the FLOPs of one forward and backward (torch's counter) over the
process's measured float32 GEMM rate, and the fraction of it each contender reaches. The previous report is
kept under ``history``.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_llc.py --out benchmarks/results/llc.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from interplab.dynamics import SGLDConfig, estimate_llc, lm_loss, mse_loss  # noqa: E402
from interplab.io import save_tensors  # noqa: E402
from interplab.model import ModelConfig, Transformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # _llc_models
MODEL: dict[str, Any] = dict(
    d_model=64, n_layers=2, n_heads=4, d_vocab=128, n_ctx=64, positional="rotary", attn_only=True
)
TRAIN_STEPS = 200
"""Adam steps of the benchmark model: the run recorded in results/llc.json used 200 (its L(w*) 2.54293 is the
loss after 200 steps; after 300 it is 1.71447)"""
DRAWS = 50
"""draws per chain of results/llc.json"""


def trained_model(
    steps: int = TRAIN_STEPS, seed: int = 0, arch: dict[str, Any] | None = None, windows: int = 256
) -> tuple[Transformer, torch.Tensor]:
    """The benchmark model and its data: 256 windows of 64 tokens (a random half repeated once), the model
    trained on them with Adam for ``steps`` steps. A function of ``steps`` and ``seed`` only: trained on one
    thread whatever the caller's thread count (matmul reductions split over threads round differently, and
    the training amplifies it), the batch order from its own generator, the initialisation from ``seed``.
    ``arch``: another architecture than `MODEL` (its ``n_ctx`` the window length), ``windows`` of them."""
    arch = MODEL if arch is None else arch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's global generator is neither read nor moved
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(seed)
            half = torch.randint(0, arch["d_vocab"], (windows, arch["n_ctx"] // 2), generator=g)
            tokens = torch.cat([half, half], 1)
            model = Transformer(ModelConfig(**arch))
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            for _ in range(steps):
                batch = tokens[torch.randint(0, windows, (32,), generator=g)]
                logits = model(batch)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tokens


def init_loss(model: Transformer, tokens: torch.Tensor) -> float:
    """L(w*) of the benchmark model on its windows (what `estimate_llc` reports as ``init_loss``)."""
    with torch.no_grad():
        logits = model(tokens)
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()))


MID = dict(
    d_model=128,
    n_layers=4,
    n_heads=4,
    d_vocab=512,
    n_ctx=128,
    d_mlp=512,
    positional="rotary",
    attn_only=False,
)
"""the mid-size transformer: 4 layers with GELU MLPs, 0.9M parameters, 8 x 128 tokens a step"""
CASES: dict[str, dict] = {
    "transformer": {
        "arch": MODEL,
        "train_steps": TRAIN_STEPS,
        "chains": 4,
        "draws": DRAWS,
        "batch_size": 16,
        "lr": 1e-4,
        "gamma": 100.0,
        "nbeta": 30.0,
    },
    "transformer-mid": {
        "arch": MID,
        "train_steps": 100,
        "windows": 128,
        "chains": 4,
        "draws": 20,
        "batch_size": 8,
        "lr": 1e-4,
        "gamma": 100.0,
        "nbeta": 30.0,
    },
    "regression-d4": {
        "model": {"kind": "linear", "d": 4},
        "chains": 4,
        "draws": 500,
        "batch_size": None,
        "lr": 2e-4,
        "gamma": 1.0,
        "nbeta": 1000 / math.log(1000),
    },
    "deep-linear-4-2-3": {
        "model": {"kind": "dln", "shape": [4, 2, 3]},
        "chains": 4,
        "draws": 500,
        "batch_size": None,
        "lr": 2e-4,
        "gamma": 1.0,
        "nbeta": 1000 / math.log(1000),
    },
}
"""what bench_llc compares: the transformer of the recorded runs (its settings as before), a mid-size one
(compute-bound), and two of the validation's regression models (overhead-bound: a step is microseconds of
arithmetic), full batch as the tests run them"""


def _ours(
    model: torch.nn.Module, data: tuple, loss, cfg: SGLDConfig, vectorize: bool | None, compile: bool = False
) -> dict:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    w, c = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short chains: not mixed, and said so in docs/dynamics.md
        est = estimate_llc(model, data, loss, cfg, vectorize=vectorize, compile=compile)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "llc": est.llc,
        "per_chain": list(est.per_chain),
        "init_loss": est.init_loss,
        "wall_s": wall,
        "cpu_s": cpu,
        "voluntary_switches": r1.ru_nvcsw - r0.ru_nvcsw,
        "involuntary_switches": r1.ru_nivcsw - r0.ru_nivcsw,
    }


def _theirs(python: str, model_file: Path, data_file: Path, settings: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [
            python,
            str(ROOT / "benchmarks" / "_devinterp_llc.py"),
            str(model_file),
            str(data_file),
            json.dumps(settings),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"devinterp failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _se(per_chain: list[float]) -> float:
    return statistics.stdev(per_chain) / math.sqrt(len(per_chain)) if len(per_chain) > 1 else math.nan


def _summary(rows: list[dict]) -> dict:
    return {
        "llc_median": statistics.median(r["llc"] for r in rows),
        "llc_rounds": [r["llc"] for r in rows],
        "per_chain": rows[0]["per_chain"],
        "se": _se(rows[0]["per_chain"]),
        "init_loss": rows[0]["init_loss"],
        "wall_s_median": statistics.median(r["wall_s"] for r in rows),
        "cpu_s_median": statistics.median(r["cpu_s"] for r in rows),
        "cpu_s_rounds": [r["cpu_s"] for r in rows],
        "wall_s_rounds": [r["wall_s"] for r in rows],
        "voluntary_switches_median": statistics.median(r["voluntary_switches"] for r in rows),
        "involuntary_switches_median": statistics.median(r["involuntary_switches"] for r in rows),
    }


def matmul_rate() -> float:
    """The best float32 GEMM rate of this process (one thread), FLOP/s: the arithmetic floor's denominator."""
    best = 0.0
    for m, k, n, reps in ((1024, 64, 192, 200), (1024, 128, 512, 50), (2048, 2048, 2048, 3)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        c = time.process_time()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * m * k * n * reps / (time.process_time() - c))
    return best


def step_flops(model: torch.nn.Module, batch: tuple, loss) -> int:
    """FLOPs of one chain's SGLD step: the model's forward and backward on one minibatch (torch's counter:
    matmuls and attention; elementwise work is not counted, it is what the floor leaves out)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = loss(model(batch[0]), batch)
        out.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _case(name: str, spec: dict, tmp: Path) -> tuple[torch.nn.Module, tuple, object, Path, Path, dict]:
    """The model, data and loss of a case, written where devinterp reads them, and devinterp's settings."""
    settings = {k: spec[k] for k in ("lr", "gamma", "nbeta", "chains", "draws")} | {"seed": 0}
    if "arch" in spec:
        model, tokens = trained_model(
            spec["train_steps"], arch=spec["arch"], windows=spec.get("windows", 256)
        )
        model.save(tmp / name)
        save_tensors(tmp / f"{name}.safetensors", {"tokens": tokens})
        return (
            model,
            (tokens,),
            lm_loss,
            tmp / name,
            tmp / f"{name}.safetensors",
            settings | {"batch_size": spec["batch_size"]},
        )
    from _llc_models import regression_case
    from safetensors.torch import save_file

    reg, x, y = regression_case(spec["model"])
    save_file({k: v.contiguous() for k, v in reg.state_dict().items()}, tmp / f"{name}.weights")
    save_file({"x": x, "y": y}, tmp / f"{name}.safetensors")
    full = x.shape[0] if spec["batch_size"] is None else spec["batch_size"]
    return (
        reg,
        (x, y),
        mse_loss,
        tmp / f"{name}.weights",
        tmp / f"{name}.safetensors",
        settings | {"batch_size": full, "model": spec["model"]},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--devinterp-python",
        default=os.environ.get(
            "INTERPLAB_DEVINTERP_PYTHON", str(ROOT / ".peers" / "devinterp" / "bin" / "python")
        ),
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time estimate_llc(compile=True) on the transformer cases (its first call, the compile, "
        "recorded apart; the rounds reuse the compiled graphs)",
    )
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--note", default="", help="recorded with the run (e.g. the machine's load)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llc.json")
    args = ap.parse_args()
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; the cases: {', '.join(CASES)}")
    torch.set_num_threads(1)
    rate = matmul_rate()
    cases = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in names:
            spec = CASES[name]
            model, data, loss, model_file, data_file, settings = _case(name, spec, tmp)
            cfg = SGLDConfig(
                step_size=spec["lr"],
                gamma=spec["gamma"],
                nbeta=spec["nbeta"],
                chains=spec["chains"],
                draws=spec["draws"],
                burn_in=0,
                batch_size=spec["batch_size"],
            )
            n = data[0].shape[0]
            batch = tuple(t[: spec["batch_size"] or n] for t in data)
            flops = step_flops(model, batch, loss)
            rows: dict[str, list[dict]] = {"interplab": [], "interplab_reference": [], "devinterp": []}
            compiled = args.compile and "arch" in spec  # the chain-batched path: transformers only
            first_compiled = None
            if compiled:  # the compile (and one estimate), paid once per shape: recorded, not in the rounds
                first_compiled = _ours(model, data, loss, cfg, None, compile=True)
                rows["interplab_compiled"] = []
            for r in range(args.rounds):
                rows["interplab"].append(_ours(model, data, loss, cfg, None))
                if compiled:
                    rows["interplab_compiled"].append(_ours(model, data, loss, cfg, None, compile=True))
                rows["interplab_reference"].append(_ours(model, data, loss, cfg, False))
                rows["devinterp"].append(_theirs(args.devinterp_python, model_file, data_file, settings))
                print(
                    f"{name} round {r}: "
                    + ", ".join(
                        f"{k} {v[-1]['llc']:.3f} in {v[-1]['cpu_s']:.2f} CPU-s" for k, v in rows.items()
                    ),
                    flush=True,
                )
            out = {k: _summary(v) for k, v in rows.items()}
            chain_steps = spec["chains"] * spec["draws"]
            floor = chain_steps * flops / rate
            a, b = out["interplab"], out["devinterp"]
            se = math.hypot(a["se"], b["se"])
            cases[name] = {
                "model": spec.get("arch", spec.get("model")),
                "n": n,
                "n_params": sum(p.numel() for p in model.parameters() if p.requires_grad),  # what is sampled
                "train_steps": spec.get("train_steps"),
                "sampler": settings | {"burn_in": 0, "batch_size": spec["batch_size"]},
                **out,
                "difference": a["llc_median"] - b["llc_median"],
                "combined_se": se,
                "agree_within_2se": abs(a["llc_median"] - b["llc_median"]) <= 2 * se,
                "speedup_cpu": b["cpu_s_median"] / a["cpu_s_median"],
                "speedup_wall": b["wall_s_median"] / a["wall_s_median"],
                "speedup_cpu_vs_reference_path": out["interplab_reference"]["cpu_s_median"]
                / a["cpu_s_median"],
                **(
                    {
                        "compile_first_call": {
                            k: first_compiled[k] for k in ("wall_s", "cpu_s", "llc")
                        },  # the compile's CPU is mostly inductor's worker processes: wall is its cost
                        "speedup_cpu_compiled": b["cpu_s_median"] / out["interplab_compiled"]["cpu_s_median"],
                        "speedup_wall_compiled": b["wall_s_median"]
                        / out["interplab_compiled"]["wall_s_median"],
                        "compiled_agree_within_2se": abs(
                            out["interplab_compiled"]["llc_median"] - b["llc_median"]
                        )
                        <= 2 * math.hypot(out["interplab_compiled"]["se"], b["se"]),
                    }
                    if first_compiled is not None
                    else {}
                ),
                "step_flops": flops,
                "floor_cpu_s": floor,
                "floor_fraction": {k: floor / v["cpu_s_median"] for k, v in out.items()},
            }
            print(
                json.dumps(
                    {
                        k: cases[name].get(k)
                        for k in (
                            "difference",
                            "combined_se",
                            "agree_within_2se",
                            "speedup_cpu",
                            "speedup_wall",
                            "speedup_cpu_compiled",
                            "floor_fraction",
                        )
                    }
                )
            )
    history: list = []
    if args.out.exists():
        old = json.loads(args.out.read_text())
        history = old.pop("history", []) + [old]
        for name, case in old.get("cases", {}).items():  # a case not re-run keeps its last numbers, marked
            if name not in cases:
                cases[name] = {"carried_from": case.get("carried_from", old.get("date"))} | case
    main_case = cases.get("transformer")
    report = {
        "what": "LLC estimate time and value: interplab estimate_llc vs devinterp 2.0 llc(), same model, data "
        "and SGLD settings, rounds interleaved (interplab, interplab's reference path, devinterp), medians",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "note": args.note,
        "torch": torch.__version__,
        "torch_threads": 1,
        "rounds": args.rounds,
        "matmul_flops_per_s": rate,
        "contenders": {
            "interplab": "estimate_llc, default path (chain-batched Transformer forward; vmap for other modules)",
            "interplab_reference": "estimate_llc(vectorize=False): one torch.func.grad_and_value call per chain",
            "interplab_compiled": "estimate_llc(compile=True), with --compile: the chain-batched path through "
            "torch.compile, timed after its first call (compile_first_call)",
            "devinterp": "devinterp.slt.llc.llc 2.0.1 in its own venv (no multi-core option: cores is fixed "
            "at 1; torch threads 1)",
        },
        "goal": "interplab >= 3x faster",
        "cases": cases,
    }
    if main_case is not None:  # the fields earlier readers use (llc_diagnostics.py: the model's L(w*))
        report |= {
            "model": MODEL,
            "n_windows": main_case["n"],
            "train_steps": main_case["train_steps"],
            "model_init_loss": main_case["interplab"]["init_loss"],
            "sampler": main_case["sampler"],
            **{
                k: main_case[k]
                for k in (
                    "interplab",
                    "interplab_reference",
                    "devinterp",
                    "difference",
                    "combined_se",
                    "agree_within_2se",
                    "speedup_cpu",
                    "speedup_wall",
                )
            },
        }
    report["history"] = history
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
