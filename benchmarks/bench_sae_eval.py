"""Evaluation-suite wall time (`interplab sae bench`) on the demo model: a TopK k-sweep trained with several
seeds at the demo's SAE site, then every metric (core, k-sparse probing of first letters and Python token
types with plain and balanced accuracy, absorption, the offline autointerp score of ``--autointerp`` features
per SAE) with its reseed noise. Writes the timings and the comparison table.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sae_eval.py --model runs/demo/final \\
        --out benchmarks/results/sae_eval.json --table-dir docs/images

``--model`` defaults to runs/demo/final (``interplab demo`` writes it); SAEs are trained here (``--steps``
steps of ``--batch`` rows per seed and k), so the benchmark needs nothing else.

``--demo-run RUN`` measures the suite on the demo's own SAE instead: the SAE ``interplab demo`` trains on its
1,500-step run (its stage-3 command, `interplab.cli.demo.sae_train_command`: TopK, expansion 8, k 16, 600
steps of 1,024 rows; ``RUN/sae`` is used as it is when the demo made it) and ``--seeds - 1`` reseeds of the
same command (``--seed 1, 2, ...``, in ``--work``, kept there for reruns), then times ``bench_saes`` in this
process (core metrics and the autointerp metric apart) and ``interplab sae bench`` end to end as a child
process (wall, CPU, peak RSS) on the same SAEs and tokens:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sae_eval.py --demo-run runs/demo --work runs/sae-reseeds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _child import timed_process  # noqa: E402  (benchmarks/, the script's folder)

from interplab.cli.demo import SAE_HOOK as HOOK  # noqa: E402  (the demo's SAE site)
from interplab.cli.demo import SAE_STEPS, DemoOutputs, sae_train_command  # noqa: E402
from interplab.sae.sweep import sae_name  # noqa: E402


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
    ap.add_argument("--demo-run", type=Path, help="the demo's run: bench its own SAE and reseeds of it")
    ap.add_argument(
        "--work", type=Path, help="--demo-run: where the reseeds are trained (default: a temp dir)"
    )
    ap.add_argument(
        "--cli-rounds", type=int, default=3, help="--demo-run: runs of `interplab sae bench` timed"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.demo_run is not None:
        args.model = str(args.demo_run / "final")
        if args.out == ap.get_default("out"):
            args.out = str(ROOT / "benchmarks" / "results" / "sae_eval_demo.json")

    from interplab import load_model
    from interplab.features.autointerp import AutointerpConfig, autointerp_metric
    from interplab.plots import save_figure
    from interplab.sae import load_sae
    from interplab.sae.activations import corpus_token_batches
    from interplab.sae.bench import bench_saes, tokenizer_labellers
    from interplab.sae.evaluate import evaluate_sae

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_sae_eval_"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    sae_runs = [work / f"seed{seed}" for seed in range(args.seeds)]
    if args.demo_run is not None:
        sae_runs = demo_saes(args.demo_run, work, args.seeds, args.threads, env)
    else:
        for seed, folder in enumerate(sae_runs):
            subprocess.run(
                [sys.executable, "-m", "interplab", "sae", "train", "--model", args.model, "--hook", HOOK,
                 "--out", str(folder), "--arch", "topk", "--expansion", "4", "--sweep",
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
    for seed, sae_run in enumerate(sae_runs):
        for folder in sorted((sae_run / "saes").iterdir()):
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
            model,
            data.batches,
            workdir=Path(
                tempfile.mkdtemp(prefix="autointerp_", dir=work)
            ),  # fresh: a kept database is resumed
            cfg=AutointerpConfig(n_features=args.autointerp),
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
    if args.demo_run is not None:
        trained = {"what": "interplab sae bench on the demo's own SAE (its stage-3 command) and reseeds of it",
                   "demo_run": str(args.demo_run), "sae_runs": [str(r) for r in sae_runs],
                   "sae_command": "interplab " + " ".join(sae_train_command(DemoOutputs(args.demo_run), SAE_STEPS, 1)),
                   "sae_steps": SAE_STEPS, "sae_batch": 1024, "d_sae": next(iter(saes.values()))[1].cfg.d_sae}  # fmt: skip
    else:
        trained = {"what": "interplab sae bench on the demo model: TopK k-sweep x seeds, every metric with reseed "
                   "noise", "ks": args.ks, "sae_steps": args.steps, "sae_batch": args.batch}  # fmt: skip
    out = {
        **trained,
        "model": str(args.model),
        "hook": HOOK,
        "seeds": args.seeds,
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
        "load_avg_after_bench": list(os.getloadavg()),
    }
    if args.demo_run is not None:  # the command a user types, on the same SAEs and tokens, as its own process
        cli = ["sae", "bench", *map(str, sae_runs), "--model", args.model, "--batches", str(args.batches),
               "--autointerp", str(args.autointerp), "--threads", str(args.threads), "--out"]  # fmt: skip
        out["cli_command"] = "interplab " + " ".join(cli) + " OUT"
        rows = []
        for _ in range(args.cli_rounds):  # a fresh --out each time: its autointerp databases would be resumed
            report = tempfile.mkdtemp(prefix="cli_bench_", dir=work)
            rows.append(timed_process([sys.executable, "-m", "interplab", *cli, report], env, ROOT))
        out["cli"] = {
            **{f"median_{k}": round(statistics.median(r[k] for r in rows), 2) for k in ("wall_s", "cpu_s", "peak_rss_mb")},
            "rounds": rows,
        }  # fmt: skip
    out |= {
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


def demo_saes(run: Path, work: Path, seeds: int, threads: int, env: dict) -> list[Path]:
    """The demo's own SAE run (``RUN/sae``, trained by its stage-3 command unless the demo already did) and
    ``seeds - 1`` reseeds of the same command in ``work`` (each kept, so a rerun trains nothing)."""
    from interplab import runs

    if not DemoOutputs(run).final.exists():
        raise SystemExit(
            f"{run} holds no trained model: run `interplab demo --no-features --out {run}` first"
        )
    work.mkdir(parents=True, exist_ok=True)
    folders = [DemoOutputs(run).sae_run, *(work / f"seed{seed}" for seed in range(1, seeds))]
    for seed, folder in enumerate(folders):
        if runs.detect(folder / runs.SAES / sae_name(HOOK)) is runs.Kind.SAE:
            continue
        cmd = sae_train_command(DemoOutputs(run), SAE_STEPS, threads)
        cmd[cmd.index("--out") + 1] = str(folder)
        subprocess.run(
            [sys.executable, "-m", "interplab", *cmd, *(["--seed", str(seed)] if seed else [])],
            check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return folders


if __name__ == "__main__":
    main()
