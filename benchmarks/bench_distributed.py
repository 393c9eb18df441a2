"""Multi-process scaling of SAE training and activation caching on CPU: 1, 2 and 4 processes under torchrun
(gloo), each with one thread, on the same work (strong scaling: a fixed global batch and a fixed token stream).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_distributed.py [--out benchmarks/results/distributed.json]
        [--rounds 3] [--procs 1,2,4]

Each measurement is one torchrun launch; inside it every rank times the work alone (after a barrier, so
process start-up and imports are not counted) in wall-clock and CPU time. Process counts are interleaved
over rounds; medians. Scaling efficiency = throughput(N) / (N * throughput(1)): 1.0 is perfect; CPU
efficiency = cpu(1) / cpu(N) (see `summarise`). The machine
this was measured on has the core count recorded in the JSON (2 here, shared with other jobs): 4 processes
on 2 cores cannot scale past 2x, and wall-clock numbers depend on the other jobs; CPU time per row says what
each process did (communication and waiting included).

Training: a ReLU SAE (d_in 256, d_sae 2048) for 40 steps of 2048 rows read from a cache
(`interplab.sae.sweep.cache_source`), gradients all-reduced. Caching: a 4-layer d_model 128 model over 96
token batches of 8 x 128, one hook, float32 (`cache_activations`, each rank its share of the batches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOOK = "blocks.1.hook_resid_post"
D_IN, D_SAE, BATCH, STEPS = 256, 2048, 2048, 40
N_BATCHES, B, SEQ = 96, 8, 128


def _model(d_model: int = 128, n_layers: int = 4):  # noqa: ANN202
    from interplab.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=d_model, n_layers=n_layers, n_heads=4, d_vocab=512, n_ctx=SEQ, d_mlp=4 * d_model
    )
    return Transformer(cfg)


def _tokens() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 512, (B, SEQ), generator=g) for _ in range(N_BATCHES)]


def worker(job: str, work: Path, result: Path) -> None:
    """One rank of one measurement (run by torchrun)."""
    from interplab.sae import SAEConfig, SAETrainConfig, create_sae, train_saes
    from interplab.sae.disk_store import cache_activations
    from interplab.sae.sweep import cache_source
    from interplab.train import distributed

    torch.set_num_threads(1)
    info = distributed.init_distributed(torch.device("cpu"))
    if job == "cache":
        model, toks = _model(), _tokens()
        distributed.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        res = cache_activations(model, toks, [HOOK], work / "cache", shard_rows=8192)
        rows = res.rows
    else:
        torch.manual_seed(0)
        sae = create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="relu", hook_name=HOOK))
        cfg = SAETrainConfig(total_steps=STEPS, autocast=False, coefficient=1e-3, b_dec_init="zeros",
                             dead_after_tokens=10**9, log_every=10)  # fmt: skip
        source = cache_source(work / "acts", [HOOK], batch_size=BATCH, steps=STEPS)
        distributed.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        out = train_saes(sae, source.batches, cfg)
        rows = out.tokens
    distributed.barrier()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    cpus = distributed.all_reduce_sum(torch.tensor([cpu], dtype=torch.float64))
    if info.main:
        result.write_text(json.dumps({"wall_s": wall, "cpu_s": float(cpus), "rows": rows}))
    distributed.shutdown(info)


def _launch(job: str, n: int, work: Path) -> dict[str, float]:
    if job == "cache":
        shutil.rmtree(work / "cache", ignore_errors=True)
    out = work / f"{job}_{n}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           __file__, "--worker", job, str(work), str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{job} x{n} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def summarise(runs: dict[str, dict[int, list[dict[str, float]]]]) -> dict[str, object]:
    """Medians per job and process count; speed-up and scaling efficiency from wall-clock time, and the CPU
    efficiency cpu(1) / cpu(N): the share of the total CPU time that is the one-process work (what the
    parallel version costs in extra work: communication, per-rank overheads), independent of how much of the
    shared machine each process got."""
    results: dict[str, object] = {}
    for job, by_n in runs.items():
        rows = next(iter(by_n.values()))[0]["rows"]
        wall = {n: statistics.median(m["wall_s"] for m in ms) for n, ms in by_n.items()}
        cpu = {n: statistics.median(m["cpu_s"] for m in ms) for n, ms in by_n.items()}
        one = 1 in wall
        results[job] = {
            "rows": rows,
            "wall_s": {str(n): round(v, 3) for n, v in wall.items()},
            "rows_per_s": {str(n): round(rows / v, 1) for n, v in wall.items()},
            "speedup": {str(n): round(wall[1] / v, 3) for n, v in wall.items()} if one else None,
            "scaling_efficiency": {str(n): round(wall[1] / v / n, 3) for n, v in wall.items()}
            if one
            else None,
            "cpu_s_total": {str(n): round(v, 3) for n, v in cpu.items()},
            "cpu_us_per_row": {str(n): round(1e6 * v / rows, 2) for n, v in cpu.items()},
            "cpu_efficiency": {str(n): round(cpu[1] / v, 3) for n, v in cpu.items()} if one else None,
            "launches": {str(n): len(ms) for n, ms in by_n.items()},
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distributed.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--worker", nargs=3, metavar=("JOB", "WORK", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
        return
    from interplab.sae.disk_store import cache_activations

    procs = [int(p) for p in args.procs.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    try:
        # the training data: one cache of enough rows for STEPS steps (written once, by one process)
        g = torch.Generator().manual_seed(1)
        acts = [
            torch.randint(1, 512, (B, SEQ), generator=g) for _ in range(STEPS * BATCH // (B * (SEQ - 1)) + 1)
        ]
        cache_activations(_model(D_IN, 2), acts, [HOOK], work / "acts", shard_rows=16384)
        runs: dict[str, dict[int, list[dict[str, float]]]] = {
            j: {n: [] for n in procs} for j in ("train", "cache")
        }
        for r in range(args.rounds):
            for job in ("train", "cache"):
                for n in procs[r % len(procs) :] + procs[: r % len(procs)]:  # rotate the order
                    runs[job][n].append(_launch(job, n, work))
                    print(job, n, runs[job][n][-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = summarise(runs)
    doc = {
        "benchmark": "bench_distributed",
        "settings": {"train": {"d_in": D_IN, "d_sae": D_SAE, "global_batch": BATCH, "steps": STEPS,
                               "architecture": "relu", "dtype": "float32"},
                     "cache": {"d_model": 128, "n_layers": 4, "token_batches": N_BATCHES, "batch": B, "seq": SEQ,
                               "hook": HOOK, "dtype": "float32"},
                     "backend": "gloo", "threads_per_process": 1, "rounds": args.rounds, "statistic": "median"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_at_end": list(os.getloadavg())},
        "results": results,
        "launches_raw": {j: {str(n): v for n, v in by.items()} for j, by in runs.items()},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
