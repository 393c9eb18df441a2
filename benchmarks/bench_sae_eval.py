"""Evaluation-suite wall time (`interplab sae bench`) on the demo model: a TopK k-sweep trained with several
seeds at the demo's SAE site, then every metric (core, k-sparse probing of first letters and Python token
types with plain and balanced accuracy, absorption, the offline autointerp score of ``--autointerp`` features
per SAE) with its reseed noise. Writes the timings and the comparison table.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sae_eval.py --model runs/demo/final \\
        --out benchmarks/results/sae_eval.json --table-dir docs/images

``--model`` defaults to runs/demo/final (``interplab demo`` writes it); SAEs are trained here (``--steps``
steps of ``--batch`` rows per seed and k), so the benchmark needs nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HOOK = "blocks.0.hook_resid_post"  # the demo's SAE site


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo" / "final"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sae_eval.json"))
    ap.add_argument("--table-dir", default=None, help="also write bench.md / frontier PNG here")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ks", default="8,16,32", help="the TopK sweep")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=4, help="evaluation batches of 16 sequences")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--autointerp", type=int, default=32, help="features per SAE for the autointerp metric (0: skip it)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from interplab import load_model
    from interplab.features.autointerp import AutointerpConfig, autointerp_metric
    from interplab.plots import save_figure
    from interplab.sae import load_sae
    from interplab.sae.activations import corpus_token_batches
    from interplab.sae.bench import bench_saes, tokenizer_labellers
    from interplab.sae.evaluate import evaluate_sae

    work = Path(tempfile.mkdtemp(prefix="bench_sae_eval_"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        subprocess.run(
            [sys.executable, "-m", "interplab", "sae", "train", "--model", args.model, "--hook", HOOK,
             "--out", str(work / f"seed{seed}"), "--arch", "topk", "--expansion", "4", "--sweep",
             f"k={args.ks}", "--steps", str(args.steps), "--batch", str(args.batch), "--seed", str(seed),
             "--threads", str(args.threads)],
            check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    train_s = time.perf_counter() - t0

    model = load_model(args.model)
    if model.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer.json: the labelled properties need one")
    seq_len = min(128, model.cfg.n_ctx)
    data = corpus_token_batches(
        model, split="validation", seq_len=seq_len, batch_size=16, n_batches=args.batches
    )
    saes = {}
    for seed in range(args.seeds):
        for folder in sorted((work / f"seed{seed}" / "saes").iterdir()):
            saes[f"seed{seed}/{folder.name}"] = (folder.name, load_sae(folder))
    t0 = time.perf_counter()
    for _, sae in saes.values():
        evaluate_sae(model, sae, data.batches, token_filter=data.token_filter)
    core_s = time.perf_counter() - t0
    extra = {}
    autointerp_s = 0.0
    # the autointerp metric: the offline baseline (no LLM here), what `sae bench --autointerp N` adds; timed apart
    if args.autointerp:
        metric = autointerp_metric(
            model, data.batches, workdir=work / "autointerp", cfg=AutointerpConfig(n_features=args.autointerp)
        )

        def timed(name, sae):
            nonlocal autointerp_s
            t = time.perf_counter()
            try:
                return metric(name, sae)
            finally:
                autointerp_s += time.perf_counter() - t

        extra["autointerp"] = timed
    t0, c0 = time.perf_counter(), time.process_time()
    result = bench_saes(
        model,
        saes,
        data.batches,
        token_filter=data.token_filter,
        labellers=tokenizer_labellers(model.tokenizer),
        extra=extra,
    )
    bench_s, bench_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(int(data.token_filter.mask(b).sum()) for b in data.batches)
    out = {
        "what": "interplab sae bench on the demo model: TopK k-sweep x seeds, every metric with reseed noise",
        "model": str(args.model),
        "hook": HOOK,
        "seeds": args.seeds,
        "ks": args.ks,
        "sae_steps": args.steps,
        "sae_batch": args.batch,
        "n_saes": len(saes),
        "eval_tokens": tokens,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "train_s": round(train_s, 2),
        "core_only_s": round(core_s, 3),
        "bench_s": round(bench_s, 3),
        "bench_s_per_sae": round(bench_s / len(saes), 3),
        "bench_cpu_s": round(bench_cpu_s, 3),
        "autointerp_features": args.autointerp,
        "autointerp_s": round(autointerp_s, 3),
        "bench_s_without_autointerp": round(bench_s - autointerp_s, 3),
        "load_avg_at_end": list(os.getloadavg()),
        "groups": result.groups,
        "table": result.markdown(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    if args.table_dir:
        d = Path(args.table_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "sae_bench.md").write_text(result.markdown())
        for metric in ("fvu", "probe_balanced_python_token_k1", "absorption_first_letter"):
            save_figure(result.plot(metric), d / f"sae_bench_{metric}.png")
        if args.autointerp:
            save_figure(result.plot("autointerp_baseline"), d / "sae_bench_autointerp_baseline.png")
    print(json.dumps({k: v for k, v in out.items() if k not in ("groups", "table")}, indent=1))
    print(result.markdown())


if __name__ == "__main__":
    main()
