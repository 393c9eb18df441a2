"""LLC estimation: interplab vs devinterp 2.0 on the same model, data and sampler settings (JSON output).

The model is a small interplab attention-only transformer (the demo's architecture, smaller), trained for a
few hundred steps on repeated random tokens so that its weights sit near a minimum; the data are the same
token windows for both. devinterp runs in its own venv (``.peers/devinterp``, torch 2.13 CPU, built by
``bash scripts/peers.sh devinterp``) with the checkout on PYTHONPATH so it loads the same model folder, through
its public ``devinterp.slt.llc.llc`` with the same SGLD step size, nbeta, localisation, chains, draws and batch
size (no burn-in: devinterp averages every step).

Rounds are interleaved (interplab per chain, interplab with the chains in one vmap, devinterp, ...); the report gives medians of wall and CPU seconds
of the estimator call alone (imports and model loading excluded on both sides), both estimates with their
chain-to-chain SE, and whether they agree within 2 combined SEs.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_llc.py --out benchmarks/results/llc.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from interplab.dynamics import SGLDConfig, estimate_llc, lm_loss  # noqa: E402
from interplab.io import save_tensors  # noqa: E402
from interplab.model import ModelConfig, Transformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(d_model=64, n_layers=2, n_heads=4, d_vocab=128, n_ctx=64, positional="rotary", attn_only=True)
TRAIN_STEPS = 200
"""Adam steps of the benchmark model: the run recorded in results/llc.json used 200 (its L(w*) 2.54293 is the
loss after 200 steps; after 300 it is 1.71447)"""
DRAWS = 50
"""draws per chain of results/llc.json"""


def trained_model(steps: int = TRAIN_STEPS, seed: int = 0) -> tuple[Transformer, torch.Tensor]:
    """The benchmark model and its data: 256 windows of 64 tokens (a random half repeated once), the model
    trained on them with Adam for ``steps`` steps. A function of ``steps`` and ``seed`` only: trained on one
    thread whatever the caller's thread count (matmul reductions split over threads round differently, and
    the training amplifies it), the batch order from its own generator, the initialisation from ``seed``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's global generator is neither read nor moved
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(seed)
            half = torch.randint(0, MODEL["d_vocab"], (256, MODEL["n_ctx"] // 2), generator=g)
            tokens = torch.cat([half, half], 1)
            model = Transformer(ModelConfig(**MODEL))
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            for _ in range(steps):
                batch = tokens[torch.randint(0, 256, (32,), generator=g)]
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


def _ours(model: Transformer, tokens: torch.Tensor, cfg: SGLDConfig, vectorize: bool = False) -> dict:
    w, c = time.perf_counter(), time.process_time()
    est = estimate_llc(model, (tokens,), lm_loss, cfg, vectorize=vectorize)
    return {
        "llc": est.llc,
        "per_chain": list(est.per_chain),
        "init_loss": est.init_loss,
        "wall_s": time.perf_counter() - w,
        "cpu_s": time.process_time() - c,
    }


def _theirs(python: str, model_dir: Path, tokens_file: Path, settings: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [
            python,
            str(ROOT / "benchmarks" / "_devinterp_llc.py"),
            str(model_dir),
            str(tokens_file),
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
    pooled = [v for r in rows for v in r["per_chain"]]  # every round used the same seed on our side
    return {
        "llc_median": statistics.median(r["llc"] for r in rows),
        "llc_rounds": [r["llc"] for r in rows],
        "se_round0": _se(rows[0]["per_chain"]),
        "se_pooled": _se(pooled),
        "init_loss": rows[0]["init_loss"],
        "wall_s_median": statistics.median(r["wall_s"] for r in rows),
        "cpu_s_median": statistics.median(r["cpu_s"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devinterp-python", default=str(ROOT / ".peers" / "devinterp" / "bin" / "python"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=TRAIN_STEPS)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=DRAWS)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--gamma", type=float, default=100.0)
    ap.add_argument("--nbeta", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llc.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tokens = trained_model(args.train_steps)
    cfg = SGLDConfig(
        step_size=args.lr,
        gamma=args.gamma,
        nbeta=args.nbeta,
        chains=args.chains,
        draws=args.draws,
        burn_in=0,
        batch_size=args.batch_size,
    )
    settings = {
        "lr": args.lr,
        "gamma": args.gamma,
        "nbeta": args.nbeta,
        "chains": args.chains,
        "draws": args.draws,
        "batch_size": args.batch_size,
        "seed": 0,
    }
    ours, vmapped, theirs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "model")
        save_tensors(Path(tmp) / "tokens.safetensors", {"tokens": tokens})
        for r in range(args.rounds):
            ours.append(_ours(model, tokens, cfg))
            vmapped.append(_ours(model, tokens, cfg, vectorize=True))
            theirs.append(
                _theirs(
                    args.devinterp_python, Path(tmp) / "model", Path(tmp) / "tokens.safetensors", settings
                )
            )
            print(
                f"round {r}: interplab {ours[-1]['llc']:.3f} in {ours[-1]['wall_s']:.1f} s, "
                f"devinterp {theirs[-1]['llc']:.3f} in {theirs[-1]['wall_s']:.1f} s",
                flush=True,
            )
    a, b, v = _summary(ours), _summary(theirs), _summary(vmapped)
    se = math.hypot(a["se_round0"], b["se_pooled"])
    report = {
        "what": "LLC of one model: interplab estimate_llc (chains batched by vmap) vs devinterp 2.0 llc()",
        "model": MODEL,
        "n_windows": int(tokens.shape[0]),
        "train_steps": args.train_steps,
        "model_init_loss": init_loss(model, tokens),
        "torch": torch.__version__,
        "sampler": settings | {"burn_in": 0},
        "torch_threads": 1,
        "rounds": args.rounds,
        "interplab": a,
        "interplab_vmap": v,
        "devinterp": b,
        "difference": a["llc_median"] - b["llc_median"],
        "combined_se": se,
        "agree_within_2se": abs(a["llc_median"] - b["llc_median"]) <= 2 * se,
        "speedup_wall": b["wall_s_median"] / a["wall_s_median"],
        "speedup_cpu": b["cpu_s_median"] / a["cpu_s_median"],
        "speedup_cpu_vmap": b["cpu_s_median"] / v["cpu_s_median"],
        "goal": "interplab >= 3x faster",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "difference",
                    "combined_se",
                    "agree_within_2se",
                    "speedup_wall",
                    "speedup_cpu",
                    "speedup_cpu_vmap",
                )
            }
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
