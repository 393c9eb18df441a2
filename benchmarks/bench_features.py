"""Feature-dashboard benchmark: build time per feature against SAEDashboard, a 4096-latent SAE over many
tokens of the demo corpus on CPU, and feature-page latency under a bounded loopback load.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_features.py --out benchmarks/results/features.json

SAEDashboard runs in its own virtual environment (``--sd-python``, default .peers/saedashboard/bin/python, made
by ``bash scripts/peers.sh saedashboard``: CPU torch 2.13.0, sae-dashboard 0.8.0 with TransformerLens 2.17.0,
transformers 4.56.2 and sae-lens 6.54.12, every version pinned), on the same model
weights (loaded into a HookedSAETransformer, logits checked against ours), the same SAE and tokens.
The model is a randomly initialised 2-layer transformer (the cost does not depend on training); the SAE a
ReLU SAE with random directions whose biases are calibrated so each latent fires on ~1% of tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HOOK = "blocks.1.hook_resid_post"


def make_model():
    from interplab.model import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(
        ModelConfig(
            d_model=128, n_layers=2, n_heads=4, d_vocab=1024, n_ctx=128, act_fn="gelu", name="bench-2l"
        )
    )


def make_sae(model, d_sae: int, tokens, density: float = 0.01):
    from interplab.sae import SAEConfig, create_sae

    torch.manual_seed(1)
    sae = create_sae(SAEConfig(d_in=128, d_sae=d_sae, architecture="relu", hook_name=HOOK))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(128, d_sae) / 128**0.5)
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=-1, keepdim=True))
        sae.b_dec.zero_()
        sae.b_enc.zero_()
        _, cache = model.run_with_cache(tokens[:16], names=[HOOK])
        pre = sae.pre_acts(cache[HOOK].reshape(-1, 128))
        sae.b_enc.copy_(-torch.quantile(pre, 1 - density, dim=0))
    return sae


def demo_tokens(n_tokens: int, seq_len: int = 128):
    """Sequences of the demo corpus (python-stdlib, BPE 1024) and its tokenizer, or random ids without one."""
    try:
        from interplab.data import build_token_store, corpus_tokenizer, open_corpus

        corpus = open_corpus("python-stdlib")
        tok = corpus_tokenizer(corpus, 1024)
        store = build_token_store(corpus, tok, "train")
        n = min(n_tokens // seq_len, store.n_sequences(seq_len))
        return store.sequences(torch.arange(n), seq_len), "python-stdlib (BPE 1024, train split)", tok
    except Exception as err:  # the corpus needs the standard library's sources
        g = torch.Generator().manual_seed(0)
        return (
            torch.randint(0, 1024, (n_tokens // seq_len, seq_len), generator=g),
            f"random ids ({err})",
            None,
        )


def ours(model, sae, tokens, path: Path, **cfg_kw) -> dict:
    from interplab.features import FeatureBuildConfig
    from interplab.features.build import build_feature_db

    path.unlink(missing_ok=True)
    cfg = FeatureBuildConfig(**cfg_kw)
    t0, c0 = time.perf_counter(), time.process_time()
    build_feature_db(path, model, sae, tokens, cfg, overwrite=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "db_bytes": size,
        "n_features": int(sae.cfg.d_sae),
        "n_tokens": tokens.numel(),
        "tokens_per_s": tokens.numel() / wall,
        "per_feature_s": wall / sae.cfg.d_sae,
    }


def sd_prepare(model, sae, tokens, work: Path) -> None:
    from safetensors.torch import save_file

    c = model.cfg
    tl = {
        "d_model": c.d_model,
        "d_head": c.d_head,
        "n_layers": c.n_layers,
        "n_ctx": c.n_ctx,
        "n_heads": c.n_heads,
        "d_mlp": c.d_mlp,
        "d_vocab": c.d_vocab,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "eps": c.norm_eps,
        "positional_embedding_type": "standard",
        "default_prepend_bos": False,
    }
    (work / "spec.json").write_text(
        json.dumps({"tl_config": tl, "d_in": 128, "d_sae": int(sae.cfg.d_sae), "hook_name": HOOK})
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "model.safetensors"))
    save_file({"tokens": tokens.contiguous()}, str(work / "tokens.safetensors"))
    with torch.no_grad():
        save_file({"logits": model(tokens[:2]).contiguous()}, str(work / "reference.safetensors"))
    save_file(
        {k: getattr(sae, k).detach().contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
        str(work / "sae.safetensors"),
    )
    if model.tokenizer is not None:
        model.tokenizer.save(work / "tokenizer.json")


def sd_run(python: str, work: Path, n_features: int) -> dict:
    out = work / "sd_result.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": ""}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [python, str(ROOT / "benchmarks" / "sd_runner.py"), str(work), str(n_features), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(work),
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    res = json.loads(out.read_text())
    res["process_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return res


def baseline_build(root: str, seqs: int, work: Path) -> dict:
    """`ours` with the interplab checkout at ``root`` (e.g. main, to measure a change side by side): a child
    process imports that checkout's interplab and this benchmark's model, SAE and tokens, and times the build
    there (the child's imports are outside the timing, as they are for ours)."""
    out = work / "baseline.json"
    code = (
        "import sys, json, torch; from pathlib import Path; "
        f"sys.path.insert(0, {root!r}); sys.path.insert(1, {str(ROOT / 'benchmarks')!r}); "
        "import interplab, bench_features as bf; "
        f"assert interplab.__file__.startswith({str(Path(root).resolve())!r}), interplab.__file__; "
        "torch.set_num_threads(1); model = bf.make_model(); "
        f"tokens, _, tok = bf.demo_tokens({seqs * 128}); model.tokenizer = tok; tokens = tokens[:{seqs}]; "
        f"r = bf.ours(model, bf.make_sae(model, 2048, tokens), tokens, Path({str(work / 'baseline.db')!r})); "
        f"r['interplab'] = interplab.__file__; Path({str(out)!r}).write_text(json.dumps(r))"
    )
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(work)
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the baseline build at {root} failed: {proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def same_database(a: Path, b: Path) -> bool:
    """Whether two feature databases hold the same contents in every table (the build fingerprint aside, which
    records the code's config version), read through this checkout's `FeatureReader.contents`, which gives
    both context layouts (schema 3: a row per context; 4: packed) as the same rows, so a build by another
    checkout compares whatever its schema version. Also the same full-text search results for each word of
    the 30 most frequent tokens."""
    from interplab.features.reader import FeatureReader

    def logical(db: Path) -> dict:
        with FeatureReader(db) as r:
            rows = r.contents()
            counts, vocab = r.token_counts(), r.vocab()
            common = sorted(counts, key=lambda t: (-counts[t], t))[:30]
            rows["search"] = [r.search_text(vocab[t].strip()) for t in common if vocab[t].strip()]
        rows["meta"] = [row for row in rows["meta"] if row[0] != "fingerprint"]
        return rows

    return logical(a) == logical(b)


def compare_with_saedashboard(args, model, tokens_all) -> dict:
    tokens = tokens_all[: args.sd_seqs]
    sae = make_sae(model, 2048, tokens)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sd_error = None
        if Path(args.sd_python).exists():
            sd_prepare(model, sae, tokens, work)
        else:
            sd_error = f"no SAEDashboard environment at {args.sd_python}"
        for r in range(args.rounds):
            row = {"round": r}
            if sd_error is None:
                try:
                    row["saedashboard"] = sd_run(args.sd_python, work, args.sd_features)
                except RuntimeError as err:
                    sd_error = f"SAEDashboard failed: {err}"
            # the baseline (if any) before ours in even rounds, after in odd ones
            if args.baseline and r % 2 == 0:
                row["baseline"] = baseline_build(args.baseline, args.sd_seqs, work)
            row["interplab"] = ours(model, sae, tokens, work / "ours.db")
            if args.baseline and r % 2 == 1:
                row["baseline"] = baseline_build(args.baseline, args.sd_seqs, work)
            rounds.append(row)
        if args.baseline:
            same = same_database(work / "ours.db", work / "baseline.db")
    out = {
        "setting": {
            "model": "2 layers, d_model 128, 4 heads, d_vocab 1024 (random init)",
            "hook": HOOK,
            "d_sae": 2048,
            "tokens": f"{tokens.shape[0]} x {tokens.shape[1]}",
            "saedashboard_features": args.sd_features,
            "interplab_features": 2048,
        },
        "rounds": rounds,
    }
    ours_pf = statistics.median(r["interplab"]["per_feature_s"] for r in rounds)
    out["interplab_per_feature_s"] = ours_pf
    out["interplab_total_s"] = statistics.median(r["interplab"]["wall_s"] for r in rounds)
    if args.baseline:
        out["baseline"] = {
            "root": args.baseline,
            "per_feature_s": statistics.median(r["baseline"]["per_feature_s"] for r in rounds),
            "cpu_s": statistics.median(r["baseline"]["cpu_s"] for r in rounds),
            "same_database": same,
        }
        out["interplab_cpu_s"] = statistics.median(r["interplab"]["cpu_s"] for r in rounds)
    if sd_error is not None:
        out["saedashboard_error"] = sd_error
    sd_rows = [r["saedashboard"] for r in rounds if "saedashboard" in r]
    if sd_rows:
        sd_pf = statistics.median(r["total_s"] / r["n_features"] for r in sd_rows)
        out["saedashboard_per_feature_s"] = sd_pf
        out["saedashboard_data_per_feature_s"] = statistics.median(
            r["data_s"] / r["n_features"] for r in sd_rows
        )
        out["saedashboard_html_bytes_per_feature"] = statistics.median(
            r["html_bytes"] / r["n_features"] for r in sd_rows
        )
        out["speedup_per_feature"] = sd_pf / ours_pf
        # CPU time of the work itself (SAEDashboard: after its imports; ours: the whole build)
        sd_cpu = statistics.median(r["cpu_s"] / r["n_features"] for r in sd_rows)
        ours_cpu = statistics.median(r["interplab"]["cpu_s"] / r["interplab"]["n_features"] for r in rounds)
        out["speedup_per_feature_cpu"] = sd_cpu / ours_cpu
        if args.baseline:
            out["baseline"]["speedup_per_feature"] = sd_pf / out["baseline"]["per_feature_s"]
            out["baseline"]["speedup_per_feature_cpu"] = sd_cpu / (out["baseline"]["cpu_s"] / 2048)
        out["model_logit_max_abs_diff"] = max(r["logit_max_abs_diff"] for r in sd_rows)
    return out


def large_build(args, model, tokens) -> dict:
    sae = make_sae(model, 4096, tokens)
    with tempfile.TemporaryDirectory() as tmp:
        res = ours(model, sae, tokens, Path(tmp) / "large.db", checkpoint_every=50)
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_latency(args, model, tokens) -> dict:
    import httpx

    sae = make_sae(model, args.latency_features, tokens)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "big.db"
        build = ours(model, sae, tokens, db, cooccurrence=False)
        port = _free_port()
        code = (
            f"import sys, uvicorn; sys.path.insert(0, {str(ROOT)!r}); from interplab.web.app import create_app; "
            f"from interplab.web.guard import SERVER_OPTIONS; "
            f"uvicorn.run(create_app([{str(db)!r}]), host='127.0.0.1', port={port}, **SERVER_OPTIONS)"
        )
        server = subprocess.Popen(
            [sys.executable, "-c", code], env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    httpx.get(base + "/", timeout=1.0)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            rng = random.Random(0)
            ids = [rng.randrange(args.latency_features) for _ in range(args.requests)]
            with httpx.Client() as c:
                for f in ids[:10]:
                    c.get(f"{base}/db/big/feature/{f}").raise_for_status()
            times: list[float] = []
            lock = threading.Lock()
            queue = list(ids)

            def worker() -> None:
                with httpx.Client() as c:
                    while True:
                        with lock:
                            if not queue:
                                return
                            f = queue.pop()
                        t0 = time.perf_counter()
                        r = c.get(f"{base}/db/big/feature/{f}")
                        dt = time.perf_counter() - t0
                        r.raise_for_status()
                        with lock:
                            times.append(dt)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
        finally:
            server.terminate()
            server.wait(timeout=10)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))] * 1000  # noqa: E731
    return {
        "n_features": args.latency_features,
        "db_build": build,
        "requests": len(times),
        "concurrency": args.concurrency,
        "p50_ms": q(0.5),
        "p95_ms": q(0.95),
        "p99_ms": q(0.99),
        "mean_ms": statistics.mean(times) * 1000,
        "requests_per_s": len(times) / wall,
        "goal_p95_ms": 200,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "features.json"))
    ap.add_argument("--sd-python", default=str(ROOT / ".peers" / "saedashboard" / "bin" / "python"))
    ap.add_argument(
        "--sd-seqs", type=int, default=256, help="sequences of 128 tokens for the SAEDashboard comparison"
    )
    ap.add_argument("--sd-features", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--baseline",
        default="",
        help="another interplab checkout (e.g. /path/to/main) built in the same rounds, to measure a change",
    )
    ap.add_argument("--large-tokens", type=int, default=1 << 20)
    ap.add_argument("--latency-features", type=int, default=16384)
    ap.add_argument("--latency-tokens", type=int, default=32768)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--parts", default="compare,large,latency")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    model = make_model()
    tokens, source, tokenizer = demo_tokens(max(args.large_tokens, args.sd_seqs * 128, args.latency_tokens))
    model.tokenizer = tokenizer  # both tools decode token strings
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": 1,
            "load_average_at_start": os.getloadavg(),
        },
        "tokens_source": source,
        "torch": torch.__version__,
    }
    out = Path(args.out)
    if out.is_file():  # keep the parts not rerun
        result = {**json.loads(out.read_text()), **result}
    if "compare" in parts:
        result[f"vs_saedashboard_{args.sd_seqs}x128"] = compare_with_saedashboard(args, model, tokens)
    if "large" in parts:
        result["large_build_4096"] = large_build(args, model, tokens[: args.large_tokens // 128])
    if "latency" in parts:
        result["page_latency"] = page_latency(args, model, tokens[: args.latency_tokens // 128])
    result["machine"]["load_average_at_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
