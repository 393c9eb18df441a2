"""Schema version 4 (contexts packed per feature and kind, `interplab.features.packed`) against version 3 (a
row per context): a version 3 database reads as the same records, migrates without loss (or, when a feature is
corrupt, not at all), copies into a new database, and answers searches alike."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, insert, select

from interplab.features import FeatureBuildConfig
from interplab.features import dialect as D
from interplab.features import packed as P
from interplab.features import schema as S
from interplab.features.build import build_feature_db
from interplab.features.database import sqlite_engine
from interplab.features.reader import FeatureReader
from interplab.features.writer import FeatureWriter, copy_database
from interplab.integrity import IntegrityError
from tests.features.planted import make_sae

CFG = FeatureBuildConfig(top_k=5, n_samples=4, window_left=3, window_right=2, batch_size=4)


def write_version_3(v4: FeatureReader, path) -> None:
    """A version 3 database holding what the version 4 database ``v4`` holds, written as version 3 wrote it:
    a row per context (ids in the build's order: per chunk, top contexts then samples), the digest of
    `schema.row_digest`, the external-content FTS5 index, loss effects keyed by row id."""
    engine = (
        sqlite_engine(path) if not str(path).startswith("postgresql") else create_engine(D.engine_url(path))
    )
    S.migrate(engine, target=3)
    dump = v4.dump()
    ctx = sorted(v4.contexts(), key=lambda r: (r["feature"] // 4, r["kind"], r["feature"], r["rank"]))
    with engine.begin() as c:
        c.execute(S.meta.delete().where(S.meta.c.key != "schema_version"))
        for table in (S.meta, S.vocab, S.features, S.passes, S.labels):
            rows = [dict(zip(table.columns.keys(), r, strict=True)) for r in dump[table.name]]
            if table is S.meta:
                rows = [r for r in rows if r["key"] != "schema_version"]
            if rows:
                c.execute(insert(table), rows)
        new_id = {}
        rows = []
        for i, r in enumerate(ctx, 1):
            new_id[r["id"]] = i
            rows.append({**{k: r[k] for k in S.CONTEXT_COLUMNS}, "id": i})
        c.execute(insert(S.legacy_contexts), rows)
        D.fts_insert(c, 1, rows)  # SQLite: from the table; PostgreSQL: contexts_words
        by_f: dict[int, list] = {}
        for r in rows:
            by_f.setdefault(r["feature"], []).append(r)
        feats = c.execute(select(S.features)).mappings().all()
        c.execute(
            insert(S.checksums),
            [{"feature": f["feature"], "sha256": S.row_digest(f, by_f.get(f["feature"], []))} for f in feats],
        )
        if "context_loss" in dump:
            S.context_loss.create(c)
            c.execute(
                insert(S.context_loss),
                [{"context_id": new_id[i], "loss": b} for i, b in dump["context_loss"]],
            )
    engine.dispose()


@pytest.fixture
def built(tmp_path, model, tokens):
    torch.manual_seed(3)
    db = tmp_path / "v4.db"
    build_feature_db(db, model, make_sae(32, 12), tokens, CFG)
    with FeatureWriter(db) as w:
        w.set_label(2, "a label")
        w.write_context_loss({int(P.context_id(3, 0, 1)): np.array([0.5, np.nan, -1.0, 0, 0, 0], np.float32)})
    return db


def _records(r: FeatureReader) -> dict:
    words = ["def", "self", "return", "x", "import"] + [t.strip() for t in r.vocab().values()][:30]
    return {
        "features": [r.feature(i) for i in range(r.n_features())],
        "tokens": [r.search_token(t) for t in range(40)],
        "text": [r.search_text(w) for w in words if w],
        "loss": [r.context_loss(i) for i in range(r.n_features())],
        "contents": r.contents(),
    }


def test_a_version_3_database_reads_migrates_and_copies_as_the_same_records(built, tmp_path):
    with FeatureReader(built) as r:
        want = _records(r)
        write_version_3(r, tmp_path / "v3.db")
    assert want["loss"][3] == {(0, 1): [0.5, None, -1.0, 0.0, 0.0, 0.0]}
    assert any(want["text"]) and any(want["tokens"])
    with FeatureReader(tmp_path / "v3.db") as old:  # read as it is (a reader never migrates)
        assert old.found == 3 and S.has_table(old.engine, S.legacy_contexts)
        assert _records(old) == want
    copy_database(tmp_path / "v3.db", tmp_path / "copy.db")  # into a new (version 4) database
    with FeatureWriter(tmp_path / "v3.db") as w:  # opening it for writing migrates it
        assert S.schema_version(w.engine) == 4
    for db in (tmp_path / "v3.db", tmp_path / "copy.db"):
        with FeatureReader(db) as new:
            assert new.found == 4 and not S.has_table(new.engine, S.legacy_contexts)
            assert _records(new) == want
    con = sqlite3.connect(tmp_path / "v3.db")  # the version 3 index is gone with its table
    assert not con.execute("SELECT name FROM sqlite_master WHERE name LIKE 'contexts%'").fetchall()


def test_a_corrupt_version_3_feature_stops_the_migration_and_nothing_changes(built, tmp_path):
    with FeatureReader(built) as r:
        write_version_3(r, tmp_path / "v3.db")
    con = sqlite3.connect(tmp_path / "v3.db")
    con.execute("UPDATE contexts SET act = act + 1e-6 WHERE feature = 5 AND kind = 1 AND rank = 0")
    con.commit()
    con.close()
    with FeatureReader(tmp_path / "v3.db") as old:
        before = old.dump()
    with pytest.raises(IntegrityError, match="feature 5 is corrupt.*left at schema version 3"):
        FeatureWriter(tmp_path / "v3.db")
    with FeatureReader(tmp_path / "v3.db") as old:
        assert old.found == 3 and old.dump() == before
        assert old.feature(4)["top"]


def test_block_digest_names_every_changed_byte(built):
    with FeatureReader(built) as r, r.engine.connect() as c:
        row = c.execute(select(S.features).where(S.features.c.feature == 4)).mappings().one()
        blocks = [
            dict(b)
            for b in c.execute(select(S.context_blocks).where(S.context_blocks.c.feature == 4)).mappings()
        ]
        digest = c.execute(select(S.checksums.c.sha256).where(S.checksums.c.feature == 4)).scalar()
    assert P.block_digest(row, blocks) == digest and len(blocks) == 2
    for b in range(2):
        for name in P.BLOCK_BLOBS:
            if not blocks[b][name]:
                continue
            changed = [dict(x) for x in blocks]
            blob = bytearray(changed[b][name])
            blob[len(blob) // 2] ^= 1
            changed[b][name] = bytes(blob)
            assert P.block_digest(row, changed) != digest, (b, name)
    moved = [dict(x) for x in blocks]  # bytes moved from one column to the next: the lengths are hashed
    moved[0]["rank"], moved[0]["token_index"] = (
        moved[0]["rank"][:-4],
        moved[0]["rank"][-4:] + moved[0]["token_index"],
    )
    assert P.block_digest(row, moved) != digest


def test_pack_and_unpack_are_inverse_on_hand_made_rows():
    rows = [
        {"feature": f, "kind": k, "rank": r, "token_index": 2**40 + f * 7 + r, "act": a, "center_token": f,
         "tokens": np.arange(3, dtype="<i4").tobytes(), "acts": np.float32([r, -0.0, 1]).tobytes(), "text": t}
        for f, k, r, a, t in [(2, 0, 1, 0.5, "zé\x00"), (2, 0, 0, 1.5, ""), (0, 1, 3, None, ""), (2, 1, 0, -0.0, "b")]
    ]  # fmt: skip
    blocks = P.pack(P.ContextArrays.from_rows(rows))
    assert [(b["feature"], b["kind"], b["n"]) for b in blocks] == [(0, 1, 1), (2, 0, 2), (2, 1, 1)]
    back = [{"feature": b["feature"], **r} for b in blocks for r in P.unpack(b)]
    want = sorted(
        ({**r, "act": None if r["act"] is None else r["act"] + 0.0} for r in rows),
        key=lambda r: (r["feature"], r["kind"], r["rank"]),
    )
    assert back == want
    with pytest.raises(ValueError, match="rank must be"):
        P.pack(P.ContextArrays.from_rows([{**rows[0], "rank": 1 << 20}]))


def test_a_version_3_postgresql_database_migrates_as_the_same_records(built, postgres_server):
    url = postgres_server.new_db()
    with FeatureReader(built) as r:
        want = _records(r)
        write_version_3(r, url)
    with FeatureReader(url) as old:
        assert old.found == 3 and _records(old) == want
    FeatureWriter(url).close()
    with FeatureReader(url) as new:
        assert new.found == 4 and _records(new) == want
