"""The feature database on SQLite and on PostgreSQL: build time of a demo-size database (the demo's SAE size,
d_sae 1024, over its 256 sequences of 128 tokens; a random SAE on a tiny random model, written by the real
builder), the time to copy it from SQLite into PostgreSQL (`interplab features copy`), and the latency of a
feature read, a text search and a label write. Backends interleaved over ``--rounds`` rounds; medians, with
CPU time of this process (PostgreSQL's own server processes are not in it). PostgreSQL: ``--postgres-url``
(an admin URL) or a throwaway server on loopback (`tests/postgres.py`).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_feature_db.py \\
        --out benchmarks/results/feature_db_backends.json
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

from benchmarks.bench_web import build_db, postgres_server  # noqa: E402


def timed(fn, n: int) -> dict:
    """Median wall and CPU milliseconds of ``n`` calls."""
    walls, cpus = [], []
    for i in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(i)
        walls.append((time.perf_counter() - t0) * 1000)
        cpus.append((time.process_time() - c0) * 1000)
    return {"median_ms": statistics.median(walls), "cpu_median_ms": statistics.median(cpus), "n": n}


def queries(db) -> dict:
    from interplab.features.reader import FeatureReader
    from interplab.features.writer import FeatureWriter

    reader, writer = FeatureReader(db), FeatureWriter(db)
    n = reader.n_features()
    out = {
        "feature": timed(lambda i: reader.feature((i * 37) % n), 50),
        "search_text": timed(lambda i: reader.search_text(f"#{(i * 13) % 512}"), 20),
        "set_label": timed(lambda i: writer.set_label((i * 11) % n, f"label {i}"), 50),
    }
    reader.close()
    writer.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "feature_db_backends.json"))
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--postgres-url", help="admin URL of a PostgreSQL server (default: start a throwaway one)"
    )
    args = ap.parse_args()
    if not (1 <= args.rounds <= 10 and 1 <= args.features <= 65536 and 1 <= args.seqs <= 4096):
        ap.error("--rounds 1..10, --features 1..65536, --seqs 1..4096")
    from interplab.features.writer import copy_database

    server = postgres_server(args.postgres_url)
    rounds: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                row: dict = {}
                for backend in ("sqlite", "postgresql") if r % 2 == 0 else ("postgresql", "sqlite"):
                    db = Path(tmp) / f"r{r}.db" if backend == "sqlite" else server.new_db(name=f"bench_r{r}")
                    row[backend] = build_db(db, args.features, args.seqs, seq_len=args.seq_len)
                    row[backend]["queries"] = queries(db)
                    row[backend + "_db"] = db
                target = server.new_db(name=f"bench_copy_r{r}")
                t0, c0 = time.perf_counter(), time.process_time()
                copy_database(row["sqlite_db"], target)
                row["copy_sqlite_to_postgresql"] = {
                    "seconds": time.perf_counter() - t0,
                    "cpu_seconds": time.process_time() - c0,
                }
                del row["sqlite_db"], row["postgresql_db"]
                rounds.append(row)
                print(json.dumps({"round": r, **{k: v.get("seconds") for k, v in row.items()}}))
    finally:
        server.stop()

    def med(*path: str) -> float:
        vals = []
        for row in rounds:
            v = row
            for p in path:
                v = v[p]
            vals.append(float(v))
        return statistics.median(vals)

    summary = {
        b: {
            "build_s": med(b, "seconds"),
            "build_cpu_s": med(b, "cpu_seconds"),
            "bytes": int(med(b, "bytes")),
            **{f"{q}_ms": med(b, "queries", q, "median_ms") for q in ("feature", "search_text", "set_label")},
        }
        for b in ("sqlite", "postgresql")
    }
    summary["copy_sqlite_to_postgresql_s"] = med("copy_sqlite_to_postgresql", "seconds")
    summary["build_ratio_postgresql_over_sqlite"] = (
        summary["postgresql"]["build_s"] / summary["sqlite"]["build_s"]
    )
    out = {
        "benchmark": "feature_db_backends",
        "settings": {
            "d_sae": args.features,
            "n_seqs": args.seqs,
            "seq_len": args.seq_len,
            "top_k": 10,
            "n_samples": 10,
            "rounds": args.rounds,
            "postgres": "given URL" if args.postgres_url else "throwaway server on loopback (fsync off)",
        },
        "summary": summary,
        "rounds": rounds,
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
