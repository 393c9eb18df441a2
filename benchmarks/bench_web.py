"""Load test of the feature explorer: latency p50/p95/p99 of a realistic request mix on a 16k-feature
database, 8 concurrent clients, over loopback only. Bounded: at most ``--requests`` requests and
``--max-seconds`` of load (whichever ends first); the server runs in a subprocess bound to 127.0.0.1.

The mix: feature pages (60%), the feature JSON (15%), feature-list pages in every order and at random
pages (10%), token and text search (10%), label writes from the app's own origin (5%).

    OMP_NUM_THREADS=1 python benchmarks/bench_web.py --out benchmarks/results/web.json

``--backend postgresql`` serves the same database from PostgreSQL: a database named ``big`` on the server of
``--postgres-url`` (an admin URL; default: a throwaway server started from Debian's binaries, as the tests do,
`tests/postgres.py`), built there by the same builder.

    OMP_NUM_THREADS=1 python benchmarks/bench_web.py --backend postgresql --out benchmarks/results/web_postgresql.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only, by construction


def build_db(path: Path | str, n_features: int, n_seqs: int, seed: int = 0, seq_len: int = 64) -> dict:
    """A feature database of ``n_features`` latents (a random SAE on a tiny random model), built by the
    real builder so every table and index is what `interplab features build` writes."""
    import torch

    from interplab.features import FeatureBuildConfig
    from interplab.features.build import build_feature_db
    from interplab.model import ModelConfig, Transformer
    from interplab.sae import SAEConfig, create_sae

    torch.manual_seed(seed)
    model = Transformer(
        ModelConfig(d_model=32, n_layers=1, n_heads=2, d_vocab=512, n_ctx=max(64, seq_len), name="bench")
    )
    sae = create_sae(
        SAEConfig(d_in=32, d_sae=n_features, architecture="relu", hook_name="blocks.0.hook_resid_post")
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, n_features) / 32**0.5)
        sae.b_enc.fill_(-0.3)  # sparse firing
        sae.W_dec.copy_(torch.randn(n_features, 32) / 32**0.5)
    tokens = torch.randint(0, 512, (n_seqs, seq_len), generator=torch.Generator().manual_seed(seed))
    t0, c0 = time.perf_counter(), time.process_time()
    build_feature_db(path, model, sae, tokens, FeatureBuildConfig(top_k=10, n_samples=10, batch_size=16))
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "tokens": tokens.numel(),
        "bytes": db_bytes(path),
    }


def db_bytes(db: Path | str) -> int:
    """The size of a database: its file, or its PostgreSQL database (``pg_database_size``)."""
    if isinstance(db, Path):
        return db.stat().st_size
    from interplab.features.reader import FeatureReader

    with FeatureReader(db) as r, r.engine.connect() as c:
        return int(c.exec_driver_sql("SELECT pg_database_size(current_database())").scalar_one())


def postgres_server(url: str | None):
    """A server to hold the benchmark's database: ``url``'s, or a throwaway one (`tests.postgres`)."""
    sys.path.insert(0, str(ROOT))
    from tests.postgres import PostgresServer

    return PostgresServer(url) if url else PostgresServer.start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _plan(n: int, n_features: int, rng: random.Random) -> list[tuple[str, str, str, bytes | None]]:
    """(kind, method, path, body) for ``n`` requests."""
    out = []
    orders = ["feature", "-density", "density", "-loss_effect", "-max_act"]
    for _ in range(n):
        f = rng.randrange(n_features)
        u = rng.random()
        if u < 0.60:
            out.append(("feature_page", "GET", f"/db/big/feature/{f}", None))
        elif u < 0.75:
            out.append(("feature_json", "GET", f"/api/db/big/feature/{f}", None))
        elif u < 0.85:
            page = rng.randrange(n_features // 100)
            out.append(("list_page", "GET", f"/db/big/?order={rng.choice(orders)}&page_no={page}", None))
        elif u < 0.95:
            q = rng.choice([f"token=%23{rng.randrange(512)}", "q=def", "q=feature%20label"])
            out.append(("search", "GET", f"/db/big/search?{q}", None))
        else:
            body = json.dumps({"explanation": f"feature label {rng.randrange(10**6)}"}).encode()
            out.append(("label_write", "POST", f"/api/db/big/feature/{f}/label", body))
    return out


def load(port: int, plan, concurrency: int, max_seconds: float) -> dict:
    times: dict[str, list[float]] = {}
    statuses: dict[int, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    queue = list(reversed(plan))
    deadline = time.perf_counter() + max_seconds
    origin = {"Origin": f"http://{HOST}:{port}", "Content-Type": "application/json"}

    def worker() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        while time.perf_counter() < deadline:
            with lock:
                if not queue:
                    break
                kind, method, path, body = queue.pop()
            t0 = time.perf_counter()
            try:
                conn.request(method, path, body=body, headers=origin if body else {})
                r = conn.getresponse()
                r.read()
                status = r.status
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=60)
                with lock:
                    errors.append(f"{method} {path}: {err!r}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                times.setdefault(kind, []).append(dt)
                statuses[status] = statuses.get(status, 0) + 1
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"times": times, "statuses": statuses, "errors": errors, "wall": wall, "left": len(queue)}


def quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))] * 1000  # noqa: E731
    return {
        "n": len(xs),
        "p50_ms": q(0.5),
        "p95_ms": q(0.95),
        "p99_ms": q(0.99),
        "mean_ms": statistics.mean(xs) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "web.json"))
    ap.add_argument("--db", help="an existing feature database named big.db (default: build one)")
    ap.add_argument("--features", type=int, default=16384)
    ap.add_argument("--seqs", type=int, default=64, help="sequences of 64 tokens for the built database")
    ap.add_argument("--requests", type=int, default=800, help="at most this many requests")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="at most this long under load")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sequence of the built database")
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument(
        "--postgres-url", help="admin URL of a PostgreSQL server (default: start a throwaway one)"
    )
    args = ap.parse_args()
    if not (1 <= args.requests <= 100_000 and 0 < args.max_seconds <= 600 and 1 <= args.concurrency <= 64):
        ap.error("--requests 1..100000, --max-seconds (0, 600], --concurrency 1..64")
    server = postgres_server(args.postgres_url) if args.backend == "postgresql" and not args.db else None
    with tempfile.TemporaryDirectory() as tmp:
        build = None
        db: Path | str
        if args.db:
            db = args.db if "://" in args.db else Path(args.db)
        elif server is not None:
            db = server.new_db(name="big")  # served as /db/big/
            build = build_db(db, args.features, args.seqs, seq_len=args.seq_len)
        else:
            db = Path(tmp) / "big.db"
            build = build_db(db, args.features, args.seqs, seq_len=args.seq_len)
        from interplab.features.reader import FeatureReader

        n_features = FeatureReader(db).n_features()
        port = _free_port()
        code = (
            f"import sys, uvicorn; sys.path.insert(0, {str(ROOT)!r}); from interplab.web.app import create_app; "
            f"from interplab.web.guard import SERVER_OPTIONS; "
            f"uvicorn.run(create_app([{str(db)!r}]), host={HOST!r}, port={port}, **SERVER_OPTIONS)"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        app = subprocess.Popen([sys.executable, "-c", code], env=env)
        try:
            for _ in range(300):
                try:
                    with socket.create_connection((HOST, port), timeout=1):
                        break
                except OSError:
                    time.sleep(0.1)
            rng = random.Random(0)
            load(port, _plan(20, n_features, rng), 1, 30)  # warm-up (not measured)
            result = load(port, _plan(args.requests, n_features, rng), args.concurrency, args.max_seconds)
        finally:
            app.terminate()
            app.wait(timeout=10)
            if server is not None:
                server.stop()
    all_times = [t for ts in result["times"].values() for t in ts]
    out = {
        "benchmark": "web",
        "backend": args.backend,
        "n_features": n_features,
        "db_build": build,
        "concurrency": args.concurrency,
        "requests_planned": args.requests,
        "requests_done": len(all_times),
        "max_seconds": args.max_seconds,
        "wall_s": result["wall"],
        "requests_per_s": len(all_times) / result["wall"],
        "overall": quantiles(all_times),
        "by_kind": {k: quantiles(v) for k, v in sorted(result["times"].items())},
        "statuses": {str(k): v for k, v in sorted(result["statuses"].items())},
        "errors": result["errors"][:20],
        "goal": "p95 < 200 ms at 8 concurrent",
        "goal_met": quantiles(all_times)["p95_ms"] < 200,
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("overall", "by_kind", "statuses", "goal_met")}, indent=2))


if __name__ == "__main__":
    main()
