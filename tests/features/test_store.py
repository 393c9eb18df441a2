"""The feature database: contents, determinism, resume, migrations, search, labels, bad input."""

from __future__ import annotations

import math
import os
import sqlite3

import numpy as np
import pytest
import torch
from sqlalchemy.exc import OperationalError

from interplab.features import FeatureBuildConfig
from interplab.features.build import build_feature_db
from interplab.features.database import ReadOnlyDatabase, sqlite_engine
from interplab.features.reader import FeatureNotFound, FeatureReader
from interplab.features.writer import FeatureWriter, label_writer, state_dir
from interplab.integrity import IntegrityError
from interplab.runs import VERSIONS, Kind, read_json
from tests.features.planted import make_sae, planted_sae

CFG = FeatureBuildConfig(
    top_k=4, n_samples=4, window_left=3, window_right=1, batch_size=4, checkpoint_every=1
)


def _sae():
    torch.manual_seed(7)
    return make_sae(32, 12)


def test_planted_database_contents(feature_db, model, tokens):
    sae = planted_sae(model, 10)
    db = feature_db("f.db")
    build_feature_db(db, model, sae, tokens, CFG)
    store = FeatureReader(db)
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


def test_building_twice_gives_the_same_database(feature_db, model, tokens):
    dbs = feature_db("a.db"), feature_db("b.db")
    build_feature_db(dbs[0], model, _sae(), tokens, CFG)
    build_feature_db(dbs[1], model, _sae(), tokens, CFG.__class__(**{**CFG.to_dict(), "checkpoint_every": 0}))
    a, b = FeatureReader(dbs[0]).dump(), FeatureReader(dbs[1]).dump()
    a["meta"] = [r for r in a["meta"] if r[0] != "fingerprint"]
    b["meta"] = [r for r in b["meta"] if r[0] != "fingerprint"]
    assert a == b
    assert len(a["context_blocks"]) > 0


@pytest.mark.parametrize("per_pass, stop_at", [(0, 3), (5, 9)])
def test_resuming_an_interrupted_build_gives_the_same_database(feature_db, model, tokens, per_pass, stop_at):
    cfg = FeatureBuildConfig(**{**CFG.to_dict(), "features_per_pass": per_pass})
    ref, cut = feature_db("ref.db"), feature_db("cut.db")
    build_feature_db(ref, model, _sae(), tokens, cfg)
    calls = []

    class Interrupted(Exception):
        pass

    def progress(stage, i, total):
        calls.append(stage)
        if len(calls) == stop_at:
            raise Interrupted

    with pytest.raises(Interrupted):
        build_feature_db(cut, model, _sae(), tokens, cfg, progress=progress)
    assert state_dir(cut).is_dir() and state_dir(cut) != state_dir(ref)  # the streaming state was saved
    report = build_feature_db(cut, model, _sae(), tokens, cfg)
    assert report.passes_skipped == (1 if per_pass else 0)
    assert FeatureReader(cut).dump() == FeatureReader(ref).dump()
    assert not state_dir(cut).exists()


def test_rebuild_with_other_settings_is_refused(feature_db, model, tokens):
    db = feature_db("f.db")
    build_feature_db(db, model, _sae(), tokens, CFG)
    FeatureWriter(db).set_label(2, "from the first build")
    with pytest.raises(ValueError, match="overwrite"):
        build_feature_db(db, model, _sae(), tokens[:8], CFG)
    build_feature_db(db, model, _sae(), tokens[:8], CFG, overwrite=True)
    store = FeatureReader(db)
    assert store.meta()["fingerprint"]["n_tokens"] == 8 * 16
    assert store.labels() == {} and store.n_features() == 12  # replaced, not added to


def test_labels_search_and_navigation(feature_db, model, tokens):
    db = feature_db("f.db")
    build_feature_db(db, model, _sae(), tokens, CFG)
    store, writer = FeatureReader(db), FeatureWriter(db)
    writer.set_label(3, "fires on closing brackets")
    assert store.feature(3)["label"]["explanation"] == "fires on closing brackets"
    assert [h["feature"] for h in store.search_text("brackets")] == [3]
    assert store.neighbours(0) == (None, 1) and store.neighbours(11) == (10, None)
    assert 0 <= store.random_feature() < 12
    center = store.feature(0)["top"][0]["tokens"][3]
    assert any(h["feature"] == 0 for h in store.search_text(f"#{center}"))
    with pytest.raises(FeatureNotFound):
        store.feature(12)
    with pytest.raises(FeatureNotFound):
        writer.set_label(99, "x")
    rows = store.list_features(order="-density", limit=3)
    assert [r["density"] for r in rows] == sorted((r["density"] for r in rows), reverse=True)
    with pytest.raises(ValueError, match="unknown order"):
        store.list_features(order="bogus")


def test_missing_database_and_non_database(tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature database"):
        FeatureReader(tmp_path / "missing.db")
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE x (a INT)").connection.commit()
    with pytest.raises(ValueError, match="not a feature database"):
        FeatureReader(tmp_path / "other.db")


def test_version_1_database_is_migrated(tmp_path, model, tokens):
    from sqlalchemy import create_engine, inspect

    from interplab.features import schema

    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    schema.migrate(engine, target=1)
    assert not inspect(engine).has_table("labels")
    engine.dispose()
    with pytest.raises(
        ReadOnlyDatabase, match="needs a migration"
    ):  # a reader never writes, so never migrates
        FeatureReader(tmp_path / "old.db")
    store = FeatureWriter(tmp_path / "old.db")
    assert schema.schema_version(store.engine) == schema.SCHEMA_VERSION
    assert inspect(store.engine).has_table("labels")
    assert FeatureReader(tmp_path / "old.db").n_features() == 0


@pytest.mark.parametrize("name", ["odd?mode=ro.db", "a#b.db", "100%25.db", "sp ace&x=1.db"])
def test_a_path_is_a_path_whatever_its_characters(tmp_path, model, tokens, name):
    build_feature_db(tmp_path / name, model, _sae(), tokens, CFG)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == [name]
    for given in (tmp_path / name, str(tmp_path / name)):  # a str path is a path too
        store = FeatureReader(given)
        assert store.n_features() == 12 and store.file == (tmp_path / name).resolve()
        store.close()


def test_read_only_open_writes_nothing(tmp_path, model, tokens):
    """mode=ro is enforced by SQLite itself, so this holds as root too (where chmod stops nothing)."""
    db = tmp_path / "ro" / "f.db"
    db.parent.mkdir()
    build_feature_db(db, model, _sae(), tokens, CFG)
    writer = FeatureWriter(db)
    writer.set_label(1, "kept")
    writer.close()  # the last connection checkpoints the WAL into the file
    before = db.read_bytes()
    for immutable in (False, True):
        store = FeatureReader(db)
        if immutable:  # what a read-only filesystem gets (WAL needs its -shm file otherwise)
            store.engine.dispose()
            store.engine = sqlite_engine(db, read_only=True, immutable=True)
        assert store.n_features() == 12 and store.labels()[1]["explanation"] == "kept"
        assert not hasattr(store, "set_label")  # a reader has no method that writes
        with store.engine.connect() as c:  # below the store's own guard, SQLite refuses too
            with pytest.raises(OperationalError, match="readonly|read-only"):
                c.exec_driver_sql("DELETE FROM labels")
            mode = c.exec_driver_sql("PRAGMA journal_mode").scalar()
            assert mode == ("delete" if immutable else "wal")  # immutable ignores the WAL; ro never switches
        store.close()
    assert db.read_bytes() == before and FeatureReader(db).labels()[1]["explanation"] == "kept"
    with pytest.raises(FileNotFoundError, match="no feature database"):  # a reader never creates one
        FeatureReader(tmp_path / "new.db")
    assert not (tmp_path / "new.db").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the mode=ro test covers root")
def test_a_database_in_a_read_only_folder_is_served_read_only(tmp_path, model, tokens):
    db = tmp_path / "ro" / "f.db"
    db.parent.mkdir()
    build_feature_db(db, model, _sae(), tokens, CFG)
    db.chmod(0o444)
    db.parent.chmod(0o555)
    try:
        assert label_writer(db) is None  # served read-only: no label writer
        store = FeatureReader(db)
        assert store.read_only and store.n_features() == 12
        with pytest.raises(ReadOnlyDatabase, match="cannot be written"):
            FeatureWriter(db)
        store.close()
    finally:
        db.parent.chmod(0o755)
        db.chmod(0o644)


def test_a_foreign_sqlite_file_is_never_written_into(tmp_path, model, tokens):
    other = tmp_path / "app.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE users (name TEXT)")
    con.execute("INSERT INTO users VALUES ('ada')")
    con.commit()
    con.close()
    before = other.read_bytes()
    with pytest.raises(ValueError, match="not a feature database .*tables users.*--overwrite"):
        build_feature_db(other, model, _sae(), tokens, CFG)
    with pytest.raises(ValueError, match="not a feature database"):
        FeatureReader(other)
    assert other.read_bytes() == before
    con = sqlite3.connect(other)  # a table named like ours, with another kind marker
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    con.execute("""INSERT INTO meta VALUES ('kind', '"someone.else"'), ('schema_version', '2')""")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="kind 'someone.else'"):
        FeatureWriter(other, create=True)
    (tmp_path / "text.db").write_text("not a database at all, " * 100)
    with pytest.raises(ValueError, match="not an SQLite database"):
        FeatureReader(tmp_path / "text.db")
    build_feature_db(other, model, _sae(), tokens, CFG, overwrite=True)  # told: replaced
    assert (
        FeatureReader(other).n_features() == 12
        and FeatureReader(other).meta()["kind"] == Kind.FEATURE_DB.value
    )


def test_a_changed_value_or_byte_is_named_when_the_feature_is_read(tmp_path, model, tokens):
    db = tmp_path / "f.db"
    build_feature_db(db, model, _sae(), tokens, CFG)
    store = FeatureReader(db)
    text = store.feature(3)["top"][0]["text"]
    assert len(text) >= 4
    store.close()
    con = sqlite3.connect(db)  # a silent change below the store: one activation nudged
    (blob,) = con.execute("SELECT act FROM context_blocks WHERE feature = 5 AND kind = 0").fetchone()
    acts = np.frombuffer(blob, "<f8").copy()
    acts[0] += 1e-6
    con.execute("UPDATE context_blocks SET act = ? WHERE feature = 5 AND kind = 0", (acts.tobytes(),))
    con.commit()
    con.close()
    store = FeatureReader(db)
    with pytest.raises(IntegrityError, match=r"f\.db: feature 5 is corrupt"):
        store.feature(5)
    store.feature(4)  # the others still read
    store.close()
    data = bytearray(db.read_bytes())  # a flipped byte in the file, inside feature 3's context text
    i, found = data.find(text.encode()), 0  # (every copy: the same text may also sit in another row first)
    while i > 0:
        data[i] ^= 0x20 if chr(data[i]).isalpha() else 0x01
        found += 1
        i = data.find(text.encode(), i + 1)
    assert found > 0
    db.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="feature 3 is corrupt"):
        FeatureReader(db).feature(3)


@pytest.mark.parametrize("loss_effect", [-0.0, float("nan"), 1e-300, None])
def test_checksums_survive_what_sqlite_does_to_floats(feature_db, loss_effect):
    """SQLite stores -0.0 as 0 and NaN as NULL: the digest is over the stored values, so it still matches
    (and PostgreSQL stores what SQLite does: the same values read back)."""
    store = FeatureWriter(feature_db("f.db"), create=True)
    row = {"feature": 0, "n_fires": 1, "density": 0.5, "max_act": -0.0, "mean_act": 1 / 3}
    row.update(loss_effect=loss_effect, hist="[1]", logits="{}", cooc="[]", top_token=None)
    ctx = {"feature": 0, "kind": 0, "rank": 0, "token_index": 3, "act": -0.0, "center_token": 1}
    ctx.update(tokens=b"\x01\x00\x00\x00", acts=b"\x00\x00\x00\x80", text="x")
    store.write_features([row], [ctx])
    rec = store.reader().feature(0)
    assert rec["max_act"] == 0.0 and math.copysign(1, rec["max_act"]) == 1.0
    assert rec["loss_effect"] == (None if loss_effect is None or loss_effect != loss_effect else loss_effect)


def test_the_kind_and_version_come_from_the_run_contract_and_the_old_marker_still_opens(
    tmp_path, model, tokens
):
    db = tmp_path / "f.db"
    report = build_feature_db(db, model, _sae(), tokens, CFG)
    meta = FeatureReader(db).meta()
    assert meta["kind"] == Kind.FEATURE_DB.value and meta["schema_version"] == VERSIONS[Kind.FEATURE_DB] == 4
    report.save(tmp_path / "build.json")
    saved = read_json(tmp_path / "build.json", expect=Kind.FEATURE_BUILD)
    assert saved["version"] == 1 and saved["n_features"] == 12
    con = sqlite3.connect(db)  # what interplab wrote before interplab.runs named the kind
    con.execute("""UPDATE meta SET value = '"interplab.features"' WHERE key = 'kind'""")
    con.commit()
    con.close()
    assert FeatureReader(db).n_features() == 12
    FeatureWriter(db).set_label(1, "still ours")
    assert FeatureReader(db).feature(1)["label"]["explanation"] == "still ours"
