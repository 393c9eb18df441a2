"""End to end: ``interplab attribute`` over the demo run's formation window, time and memory per route.

The demo's 1,500-step ``induction-2l`` run on python-stdlib (``interplab demo --no-features`` trains it when
``--run`` holds no trained model; an existing run is reused as it is) is attributed with the command a user
types, ``interplab attribute RUN --target induction:best --window auto``, once with the default
``--grads factored`` and once with ``--grads exact`` per round, the order alternating between rounds. Each
attribution is its own child process, so its wall time, CPU time (user + system, from ``os.wait4``) and peak
resident memory are that route's alone (start-up and import included: what the user waits for). Inside the
child the call to `attribute_run` is timed apart, and the report's window, checkpoints, candidates and tokens
are recorded. Medians over rounds, ratios exact / factored, the load average with every run; the two routes'
rankings are compared (Spearman) and each route's scores checked to repeat bit for bit across rounds.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attribution_run.py --run runs/demo --rounds 3

Results merge into ``benchmarks/results/attribution_run.json`` (sections replaced move to ``history``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _child import timed_process  # noqa: E402  (benchmarks/, the script's folder)

ROUTES = ("factored", "exact")
TARGET = "induction:best"
TIMES = ("wall_s", "cpu_s", "peak_rss_mb", "attribute_run_s", "attribute_run_cpu_s", "import_cpu_s", "save_s")
SIZES = ("target", "window", "window_checkpoints", "checkpoint_terms", "run_checkpoints", "candidates")


def child(args: argparse.Namespace) -> None:
    """Run ``interplab attribute`` in this process (as ``python -m interplab attribute`` would) with its call
    to `attribute_run` timed, and write the phase times and the result's sizes to ``args.child``."""
    t_start, c_start = time.perf_counter(), time.process_time()
    import interplab.cli.attribute as cli_attribute
    from interplab.cli.main import app

    t_import, c_import = time.perf_counter(), time.process_time()
    inner = cli_attribute.attribute_run
    seen: dict = {}

    def timed_attribute_run(*a, **kw):
        w, c = time.perf_counter(), time.process_time()
        result = inner(*a, **kw)
        seen.update(attribute_run_s=time.perf_counter() - w, attribute_run_cpu_s=time.process_time() - c)
        seen["result"] = result
        return result

    cli_attribute.attribute_run = timed_attribute_run
    app(args.cli, standalone_mode=False)
    result = seen.pop("result")
    from interplab.data_attribution.run import _open_run

    cfg, ckpts = _open_run(Path(result.run_dir))
    n, seq = result.example_ids.numel(), cfg.data.seq_len
    report = {
        "import_s": t_import - t_start,
        "import_cpu_s": c_import - c_start,
        **seen,
        "in_process_s": time.perf_counter() - t_start,
        "in_process_cpu_s": time.process_time() - c_start,
        "window": list(result.window),
        # the window's checkpoints; each but the last is a term (its gradients taken, standing for the steps
        # up to the next one)
        "window_checkpoints": len(result.steps) + 1,
        "checkpoint_terms": int(result.per_step.shape[0]),
        "run_checkpoints": len(ckpts),
        "candidates": n,
        "seq_len": seq,
        "tokens": n * seq,
        "grads": result.grads,
        "target": result.target,
    }
    Path(args.child).write_text(json.dumps(report, indent=1) + "\n")


def ensure_run(run: Path, env: dict) -> dict:
    """Reuse ``run`` when it holds a trained model, else train it as the demo does (``interplab demo
    --no-features --out RUN``: the ``induction-2l`` preset, 1,500 steps, then the formation report)."""
    from interplab.runs import FINAL

    if (run / FINAL).exists():
        return {"trained_here": False}
    cmd = [sys.executable, "-m", "interplab", "demo", "--no-features", "--out", str(run)]
    print("training:", " ".join(cmd), flush=True)
    return {"trained_here": True, "training": timed_process(cmd, env, ROOT)}


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _write_json(path: Path, sections: dict) -> dict:
    """Merge ``sections`` into the report at ``path``; those they replace move to ``history``."""
    report = json.loads(path.read_text()) if path.exists() else {}
    history = report.pop("history", [])
    for key in sections:
        if key in report:
            history.append({"section": key, "replaced_at": time.strftime("%Y-%m-%d %H:%M"), **report[key]})
    report = {**report, **sections, "history": history}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)  # atomic: the old report stays whole until the new one is complete
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run", type=Path, default=ROOT / "runs" / "demo", help="the demo run (trained if absent)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=256, help="interplab attribute --candidates")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attribution_run.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("cli", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads)}
    run = args.run.resolve()
    info = ensure_run(run, env)

    import torch
    from safetensors.torch import load_file

    from interplab.data_attribution import spearman

    rows: dict[str, list[dict]] = {g: [] for g in ROUTES}
    scores: dict[str, list] = {g: [] for g in ROUTES}
    with tempfile.TemporaryDirectory(prefix="bench_attr_run_") as tmp:
        for r in range(args.rounds):
            for grads in ROUTES if r % 2 == 0 else ROUTES[::-1]:
                folder, phases = Path(tmp) / f"{grads}{r}", Path(tmp) / f"{grads}{r}.json"
                cli = ["attribute", str(run), "--target", TARGET, "--window", "auto", "--grads", grads,
                       "--candidates", str(args.candidates), "--threads", str(args.threads), "--out", str(folder)]  # fmt: skip
                row = timed_process([sys.executable, __file__, "--child", str(phases), "--", *cli], env, ROOT)
                row.update(json.loads(phases.read_text()), round=r)
                # the rest of the process: the report's files (HTML, the PNG through kaleido's Chromium), exit
                row["save_s"] = row["in_process_s"] - row["import_s"] - row["attribute_run_s"]
                row["png_written"] = (folder / "attribution.png").exists()
                rows[grads].append(row)
                saved = load_file(folder / "scores.safetensors")
                scores[grads].append((saved["example_ids"], saved["scores"]))
                print(
                    f"round {r} {grads}: {row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} CPU-s, "
                    f"{row['peak_rss_mb']:.0f} MB peak RSS (attribute_run {row['attribute_run_cpu_s']:.1f} CPU-s; "
                    f"files {row['save_s']:.1f} s, PNG {'written' if row['png_written'] else 'not written'})",
                    flush=True,
                )
    repeat = {
        g: all(torch.equal(s[1], scores[g][0][1]) and torch.equal(s[0], scores[g][0][0]) for s in scores[g])
        for g in ROUTES
    }
    (ids_f, s_f), (ids_e, s_e) = scores["factored"][0], scores["exact"][0]
    if not torch.equal(ids_f, ids_e):
        raise SystemExit("the two routes scored different candidates")
    top_f, top_e = (set(s.argsort(descending=True)[:10].tolist()) for s in (s_f, s_e))
    first = rows["factored"][0]
    summary = {g: {k: round(_median(rows[g], k), 3) for k in TIMES} for g in ROUTES}
    section = {
        "what": "interplab attribute on the demo run's formation window, per route: a child process each, "
        "interleaved rounds, medians",
        "command": f"interplab attribute RUN --target {TARGET} --window auto --grads ROUTE --candidates "
        f"{args.candidates} --threads {args.threads}",
        "run": str(args.run),
        **info,
        "rounds": args.rounds,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        **{k: first[k] for k in (*SIZES, "seq_len", "tokens")},
        "median": summary,
        "ratio_exact_over_factored": {
            k: round(summary["exact"][k] / summary["factored"][k], 2)
            for k in ("wall_s", "cpu_s", "peak_rss_mb", "attribute_run_cpu_s")
        },
        "png_written": {g: sum(r["png_written"] for r in rows[g]) for g in ROUTES},
        "scores_repeat_across_rounds": repeat,
        "spearman_exact_vs_factored": round(float(spearman(s_f, s_e)), 3),
        "top10_overlap": len(top_f & top_e),
        "rows": rows,
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    _write_json(args.out, {"demo_run_end_to_end": section})
    print(json.dumps({k: v for k, v in section.items() if k != "rows"}, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
