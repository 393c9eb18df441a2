"""Speed of the offline default of ``interplab features score`` (embedding + baseline scorers): features scored
per second by the batched path (`score_features` with `EmbeddingScorer.score_many`: one encode call per chunk of
features, cached embeddings, scores written per chunk) against the per-feature path it replaced (one encode call
and one transaction per explanation), on a planted database of ``--features`` token features (one explanation
each) built from standard-library code. Interleaved rounds on fresh copies, medians; the model is loaded once
(outside the timing) and shared.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/bench_score_speed.py \
        --features 128 --rounds 2 --out benchmarks/results/score_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from interplab.features.planted import PlantedFeature, build_planted_db, stdlib_tokens  # noqa: E402
from interplab.features.scorers import (  # noqa: E402
    BaselineScorer,
    EmbeddingScorer,
    ScoreResult,
    activating_windows,
    auc,
    non_activating_windows,
    score_features,
)
from interplab.features.writer import FeatureWriter  # noqa: E402


class PerFeatureEmbedding:
    """The path before batching: one encode call per explanation, no cache (no ``score_many``)."""

    def __init__(self, model, n_examples: int = 10) -> None:
        self.model, self.n_examples = model, n_examples
        self.name, self.prompt_version, self.backend_name = (
            "embedding",
            "scorers-1",
            "sentence:all-MiniLM-L6-v2",
        )

    def score(self, explanation, record, reader, *, rng) -> ScoreResult:
        vocab = reader.vocab()
        windows = activating_windows(record, self.n_examples, rng) + non_activating_windows(
            record, reader, self.n_examples, rng
        )
        emb = self.model.encode(
            [explanation] + [w.text(vocab) for w in windows], normalize_embeddings=True, convert_to_numpy=True
        )
        sims = (emb[1:] @ emb[0]).astype(np.float64).tolist()
        truth = [w.activating for w in windows]
        return ScoreResult(
            auc(sims, truth), len(windows), {"chance": 0.5, "similarities": sims, "truth": truth}
        )


class PerFeatureBaseline(BaselineScorer):
    """The baseline scorer without ``score_many``, so `score_features` takes one feature at a time."""

    score_many = None  # type: ignore[assignment]


def token_features(n: int) -> list[PlantedFeature]:
    tok, tokens = stdlib_tokens(192, 64, 1024)
    vocab = [tok.decode([i]) for i in range(tok.vocab_size)]
    common = [
        t for t, _ in Counter(tokens.flatten().tolist()).most_common() if re.fullmatch(r" ?\w+", vocab[t])
    ]
    if len(common) < n:
        raise SystemExit(f"--features at most {len(common)} (word tokens of the corpus)")
    return [
        PlantedFeature(
            f'the token "{vocab[t].strip()}"', re.escape(vocab[t]), re.escape(vocab[t].strip()), False
        )
        for t in common[:n]
    ]


def run(path: Path, scorers) -> tuple[float, float, dict]:
    t0, c0 = time.perf_counter(), time.process_time()
    with FeatureWriter(path) as w:
        got = score_features(w, scorers, seed=0)
    return time.perf_counter() - t0, time.process_time() - c0, got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/score_speed.json")
    args = ap.parse_args()
    feats = token_features(args.features)
    with tempfile.TemporaryDirectory() as tmp:
        db = build_planted_db(
            Path(tmp) / "base.db", features=feats, shuffle=[(i + 1) % len(feats) for i in range(len(feats))]
        )
        with FeatureWriter(
            db.path
        ) as w:  # one explanation per feature, as the demo's baseline explainer gives
            w.engine.dispose()
        import sqlalchemy as sa

        eng = sa.create_engine(f"sqlite:///{db.path}")
        with eng.begin() as c:
            c.execute(sa.text("DELETE FROM explanations WHERE explainer = 'shuffled'"))
        eng.dispose()
        batched = EmbeddingScorer()
        batched.embed(["warm-up"])  # loads the model (outside the timing)
        model = batched._model
        times: dict[str, list] = {"per_feature": [], "batched": []}
        check = {}
        for rnd in range(args.rounds):
            for kind in ("per_feature", "batched") if rnd % 2 == 0 else ("batched", "per_feature"):
                copy = Path(tmp) / f"{kind}-{rnd}.db"
                shutil.copy(db.path, copy)
                if kind == "batched":
                    scorer = EmbeddingScorer()
                    scorer._model = model  # a fresh cache, the loaded model
                    scorers = [scorer, BaselineScorer()]
                else:
                    scorers = [PerFeatureEmbedding(model), PerFeatureBaseline()]
                wall, cpu, got = run(copy, scorers)
                if kind == "batched":
                    encoded = len(scorer._cache)
                times[kind].append((wall, cpu))
                check[kind] = {k: r.value for k, r in got.items()}
                print(f"round {rnd} {kind}: {wall:.1f} s", flush=True)
    same = check["per_feature"].keys() == check["batched"].keys() and all(
        check["per_feature"][k] == check["batched"][k] or (check["per_feature"][k] != check["per_feature"][k])
        for k in check["per_feature"]
    )
    res = {}
    for kind, ts in times.items():
        wall = statistics.median(t[0] for t in ts)
        cpu = statistics.median(t[1] for t in ts)
        res[kind] = {
            "median_cpu_s": round(cpu, 2),
            "features_per_cpu_s": round(args.features / cpu, 3),
            "wall_s": [round(t[0], 2) for t in ts],
            "cpu_s": [round(t[1], 2) for t in ts],
            "median_wall_s": round(wall, 2),
            "features_per_s": round(args.features / wall, 3),
            "projected_1024_features_min": round(1024 / (args.features / wall) / 60, 2),
        }
    result = {
        "kind": "benchmark",
        "name": "score_speed",
        "settings": {
            "features": args.features,
            "explanations_per_feature": 1,
            "rounds": args.rounds,
            "scorers": ["embedding", "baseline"],
            "n_examples": 10,
            "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        },  # fmt: skip
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()[0]},
        **res,
        "speedup_wall": round(res["per_feature"]["median_wall_s"] / res["batched"]["median_wall_s"], 2),
        "speedup_cpu": round(res["per_feature"]["median_cpu_s"] / res["batched"]["median_cpu_s"], 2),
        "texts": {
            "per_feature_encoded": sum(1 + 2 * 10 for _ in range(args.features)),
            "batched_encoded": encoded,
        },
        "same_values": same,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
