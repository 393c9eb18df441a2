"""The feature database: contents, determinism, resume, migrations, search, labels, bad input."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from interplab.features import FeatureBuildConfig
from interplab.features.build import build_feature_db
from interplab.features.store import FeatureNotFound, FeatureStore
from tests.features.planted import make_sae, planted_sae

CFG = FeatureBuildConfig(
    top_k=4, n_samples=4, window_left=3, window_right=1, batch_size=4, checkpoint_every=1
)


def _sae():
    torch.manual_seed(7)
    return make_sae(32, 12)


def test_planted_database_contents(tmp_path, model, tokens):
    sae = planted_sae(model, 10)
    build_feature_db(tmp_path / "f.db", model, sae, tokens, CFG)
    store = FeatureStore(tmp_path / "f.db")
    assert store.n_features() == 10
    counts = torch.bincount(tokens.flatten(), minlength=40)
    for j in range(10):
        rec = store.feature(j)
        assert rec["n_fires"] == int(counts[j])
        assert rec["density"] == pytest.approx(float(counts[j]) / tokens.numel(), rel=1e-12)
        assert rec["top_token"] == j
        assert all(c["tokens"][3] == j for c in rec["top"] + rec["samples"])
        assert sum(rec["hist"]) == rec["n_fires"]
        # which features fire on token j? exactly feature j
        assert [h.feature for h in store.search_token(j)] == [j]
    assert store.token_counts()[5] == int(counts[5])
    assert store.meta()["status"] == "complete"


def test_building_twice_gives_the_same_database(tmp_path, model, tokens):
    build_feature_db(tmp_path / "a.db", model, _sae(), tokens, CFG)
    build_feature_db(
        tmp_path / "b.db", model, _sae(), tokens, CFG.__class__(**{**CFG.to_dict(), "checkpoint_every": 0})
    )
    a, b = FeatureStore(tmp_path / "a.db").dump(), FeatureStore(tmp_path / "b.db").dump()
    a["meta"] = [r for r in a["meta"] if r[0] != "fingerprint"]
    b["meta"] = [r for r in b["meta"] if r[0] != "fingerprint"]
    assert a == b
    assert len(a["contexts"]) > 0


@pytest.mark.parametrize("per_pass, stop_at", [(0, 3), (5, 9)])
def test_resuming_an_interrupted_build_gives_the_same_database(tmp_path, model, tokens, per_pass, stop_at):
    cfg = FeatureBuildConfig(**{**CFG.to_dict(), "features_per_pass": per_pass})
    build_feature_db(tmp_path / "ref.db", model, _sae(), tokens, cfg)
    calls = []

    class Interrupted(Exception):
        pass

    def progress(stage, i, total):
        calls.append(stage)
        if len(calls) == stop_at:
            raise Interrupted

    with pytest.raises(Interrupted):
        build_feature_db(tmp_path / "cut.db", model, _sae(), tokens, cfg, progress=progress)
    assert (tmp_path / "cut.db.build").is_dir()  # the streaming state was saved
    report = build_feature_db(tmp_path / "cut.db", model, _sae(), tokens, cfg)
    assert report.passes_skipped == (1 if per_pass else 0)
    assert FeatureStore(tmp_path / "cut.db").dump() == FeatureStore(tmp_path / "ref.db").dump()
    assert not (tmp_path / "cut.db.build").exists()


def test_rebuild_with_other_settings_is_refused(tmp_path, model, tokens):
    build_feature_db(tmp_path / "f.db", model, _sae(), tokens, CFG)
    with pytest.raises(ValueError, match="overwrite"):
        build_feature_db(tmp_path / "f.db", model, _sae(), tokens[:8], CFG)
    build_feature_db(tmp_path / "f.db", model, _sae(), tokens[:8], CFG, overwrite=True)
    assert FeatureStore(tmp_path / "f.db").meta()["fingerprint"]["n_tokens"] == 8 * 16


def test_labels_search_and_navigation(tmp_path, model, tokens):
    build_feature_db(tmp_path / "f.db", model, _sae(), tokens, CFG)
    store = FeatureStore(tmp_path / "f.db")
    store.set_label(3, "fires on closing brackets")
    assert store.feature(3)["label"]["explanation"] == "fires on closing brackets"
    assert [h["feature"] for h in store.search_text("brackets")] == [3]
    assert store.neighbours(0) == (None, 1) and store.neighbours(11) == (10, None)
    assert 0 <= store.random_feature() < 12
    center = store.feature(0)["top"][0]["tokens"][3]
    assert any(h["feature"] == 0 for h in store.search_text(f"#{center}"))
    with pytest.raises(FeatureNotFound):
        store.feature(12)
    with pytest.raises(FeatureNotFound):
        store.set_label(99, "x")
    rows = store.list_features(order="-density", limit=3)
    assert [r["density"] for r in rows] == sorted((r["density"] for r in rows), reverse=True)
    with pytest.raises(ValueError, match="unknown order"):
        store.list_features(order="bogus")


def test_missing_database_and_non_database(tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature database"):
        FeatureStore(tmp_path / "missing.db")
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE x (a INT)").connection.commit()
    with pytest.raises(ValueError, match="not a feature database"):
        FeatureStore(tmp_path / "other.db")


def test_version_1_database_is_migrated(tmp_path, model, tokens):
    from sqlalchemy import create_engine, inspect

    from interplab.features import schema

    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    schema.migrate(engine, target=1)
    assert not inspect(engine).has_table("labels")
    engine.dispose()
    store = FeatureStore(tmp_path / "old.db")
    assert schema.schema_version(store.engine) == schema.SCHEMA_VERSION
    assert inspect(store.engine).has_table("labels")
