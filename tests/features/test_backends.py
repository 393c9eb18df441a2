"""SQLite and PostgreSQL hold and answer the same: the same build gives the same rows, a search the same hits in
the same order, text with NUL round-trips, concurrent writers lose nothing, bad URLs and foreign databases are
refused clearly (`interplab.features.dialect`)."""

from __future__ import annotations

import threading

import pytest
import torch

from interplab.features import FeatureBuildConfig
from interplab.features.build import build_feature_db
from interplab.features.dialect import fts_tokens
from interplab.features.reader import FeatureReader
from interplab.features.writer import FeatureWriter
from tests.features.planted import make_sae

CFG = FeatureBuildConfig(top_k=4, n_samples=4, window_left=3, window_right=1, batch_size=4)

# context texts hostile to a search that is not FTS5's: case, diacritics, '_' inside words, digits after '#',
# overlapping phrase instances, repeated words in longer and shorter rows (bm25 orders by both), CJK, NUL
TEXTS = [
    "Héllo wörld_x #12",
    "hello world x 12",
    "a a a",
    "a a",
    "a b a b a",
    "the a in a long row of many words a",
    "ÉCOLE naïve",
    "ecole naive cafe",
    "日本語テキスト",
    "#123 #12 #1",
    "!!!",
    "x\x00y zero\x00",
    "under_score under score",
    "a",
    "b a",
    "a a a a",
    "zz qq qq qq qq qq",
    "zz",
]
QUERIES = [
    "a a",
    "a",
    "hello",
    "HÉLLO",
    "world_x",
    "world",
    "x",
    "#12",
    "12",
    "a b a",
    "ecole",
    "naïve",
    "日本語テキスト",
    "!!!",
    "b",
    "zero",
    "under_score",
    "score",
    "long row",
    "a row",
    "zz",
    "qq qq",
    "\uffff",
]


def _hand_written(db) -> FeatureWriter:
    """A database with one feature per text of `TEXTS` (its only top context), labels on a few."""
    store = FeatureWriter(db, create=True)
    store.write_vocab(["\x00nul", "plain", "\uffffesc"], [1, 2, 3])
    rows, ctx = [], []
    for f, t in enumerate(TEXTS):
        rows.append(
            {
                "feature": f,
                "n_fires": f,
                "density": 0.1,
                "max_act": 1.0,
                "mean_act": 0.5,
                "loss_effect": None if f % 3 else -0.5 * f,
                "hist": "[]",
                "logits": "{}",
                "cooc": "[]",
                "top_token": f % 3,
            }
        )
        ctx.append(
            {
                "feature": f,
                "kind": 0,
                "rank": 0,
                "token_index": 2**40 + f,
                "act": 1.0,
                "center_token": f % 3,
                "tokens": b"\x01\x00\x00\x00",
                "acts": b"\x00\x00\x80\x3f",
                "text": t,
            }
        )
    store.write_features(rows, ctx)
    store.set_label(2, "a label with 100% and under_score")
    store.set_label(5, "Opening brackets")
    store.set_label(7, "nul\x00inside")
    return store


def test_both_backends_answer_every_query_alike(tmp_path, postgres_server):
    lite, pg = _hand_written(tmp_path / "f.db"), _hand_written(postgres_server.new_db())
    a, b = lite.reader(), pg.reader()
    assert a.dump() == b.dump()
    assert b.vocab() == {0: "\x00nul", 1: "plain", 2: "\uffffesc"}  # NUL and the escape round-trip
    assert (
        b.feature(11)["top"][0]["text"] == "x\x00y zero\x00"
        and b.labels()[7]["explanation"] == "nul\x00inside"
    )
    assert b.feature(3)["top"][0]["token_index"] == 2**40 + 3  # 64-bit
    for q in QUERIES + ["100%", "under_", "brackets", "%", "_"]:
        assert a.search_text(q) == b.search_text(q), q
    for order in (
        "feature",
        "loss_effect",
        "-loss_effect",
        "-density",
        "max_act",
    ):  # NULLs as SQLite sorts them
        assert a.list_features(order=order, limit=100) == b.list_features(order=order, limit=100), order
    # the ranking is FTS5's bm25: more instances first, then shorter rows (overlapping instances count)
    assert [h["feature"] for h in a.search_text("a a")] == [15, 2, 3]
    assert [h["feature"] for h in a.search_text("zz")] == [17, 16]


def test_search_tokens_are_sqlites_own():
    assert fts_tokens(["Héllo wörld_x #12", "!!!", "a\u0301b"]) == [["hello", "world_x", "12"], [], ["ab"]]


def test_explanations_search_ranks_alike(tmp_path, postgres_server):
    out = []
    for db in (tmp_path / "f.db", postgres_server.new_db()):
        store = _hand_written(db)
        ids = [
            store.add_explanation(f, t, explainer="x", backend="none", prompt_version="1")
            for f, t in [
                (1, "fires on brackets"),
                (2, "brackets and commas"),
                (3, "Brackets, closing"),
                (4, "no match"),
            ]
        ]
        for i, v in zip(ids, [0.2, float("nan"), 0.9, 0.5], strict=True):
            store.add_score(i, "detection", v, n=3, details=None, backend="none", prompt_version="1", seed=0)
        found = store.reader().search_explanations("brackets")
        out.append([(r["feature"], r["scores"]["detection"]) for r in found])
    assert out[0][0] == (3, 0.9) and out[0][1] == (1, 0.2) and out[0][2][0] == 2  # best first, NaN last
    assert str(out[0]) == str(out[1])


def test_two_writers_adding_labels_at_once_lose_nothing(feature_db, model, tokens):
    db = feature_db("f.db")
    torch.manual_seed(7)
    build_feature_db(db, model, make_sae(32, 12), tokens, CFG)
    lid = FeatureWriter(db).create_list("shared")
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(w: int) -> None:
        try:
            store = FeatureWriter(db)
            start.wait()
            for f in range(12):
                if f % 2 == w:  # each writer its own features ...
                    store.set_label(f, f"label {f} by {w}")
                store.set_label(0, f"contested by {w}")  # ... and both the same one, over and over
                if f % 2 == w:
                    store.add_to_list(lid, f, note=f"by {w}")
                store.add_explanation(
                    f, f"explained by {w}", explainer=f"w{w}", backend="none", prompt_version="1"
                )
                store.cache_response(f"k{f}", "req", f"resp {w}")
            store.close()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = FeatureReader(db)
    labels = store.labels()
    assert {f: labels[f]["explanation"] for f in range(1, 12)} == {
        f: f"label {f} by {f % 2}" for f in range(1, 12)
    }
    assert labels[0]["explanation"] in ("contested by 0", "contested by 1")
    items = store.feature_list(lid)["items"]
    assert sorted(r["feature"] for r in items) == list(range(12))
    assert all(len(store.explanations(f)) == 2 for f in range(12))
    assert all(
        store.explained(explainer=f"w{w}", backend="none", prompt_version="1") == set(range(12))
        for w in (0, 1)
    )


def test_a_postgres_reader_cannot_write_and_errors_name_the_url(postgres_server):
    url = postgres_server.new_db()
    _hand_written(url).close()
    store = FeatureReader(url)
    from sqlalchemy.exc import DBAPIError

    with store.engine.connect() as c, pytest.raises(DBAPIError, match="read-only"):
        c.exec_driver_sql("DELETE FROM labels")
    assert not hasattr(store, "set_label")
    host = postgres_server.url.split("@", 1)[1].rsplit("/", 1)[0]
    with pytest.raises(
        ConnectionError, match=r"cannot open the feature database postgresql://postgres:\*\*\*@"
    ):
        FeatureReader(f"postgresql://postgres:secret@{host}/no_such_db")
    with pytest.raises(ValueError, match="not a feature database .*no schema version"):
        FeatureReader(postgres_server.new_db())


def test_a_foreign_postgres_database_is_never_written_into(postgres_server, model, tokens):
    url = postgres_server.new_db()
    from sqlalchemy import create_engine, text

    from interplab.features.dialect import engine_url

    engine = create_engine(engine_url(url))
    with engine.begin() as c:
        c.execute(text("CREATE TABLE users (name TEXT)"))
        c.execute(text("INSERT INTO users VALUES ('ada')"))
    torch.manual_seed(7)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not a feature database .*tables users"):
            build_feature_db(url, model, make_sae(32, 12), tokens, CFG, overwrite=overwrite)
    with engine.connect() as c:
        assert c.execute(text("SELECT name FROM users")).all() == [("ada",)]
        assert sorted(
            r[0] for r in c.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
        ) == ["users"]
    engine.dispose()


def test_a_read_only_role_is_served_read_only(postgres_server):
    from fastapi.testclient import TestClient
    from sqlalchemy import create_engine, text

    from interplab.features.database import ReadOnlyDatabase
    from interplab.features.dialect import engine_url
    from interplab.features.writer import label_writer
    from interplab.web.app import create_app

    url = postgres_server.new_db()
    _hand_written(url).close()
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ProgrammingError

    role = f"student_{url.rsplit('_', 1)[-1]}"
    engine = create_engine(engine_url(url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as c:
            c.execute(text(f"CREATE ROLE {role} LOGIN"))
            c.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"))
    except ProgrammingError as err:  # a server of the user's, whose role may not create roles
        pytest.skip(f"cannot create a read-only role on this server: {err.orig}")
    as_student = make_url(url).set(username=role, password=None).render_as_string(hide_password=False)
    with pytest.raises(ReadOnlyDatabase, match=f"the role '{role}' may only read it"):
        FeatureWriter(as_student)
    assert label_writer(as_student) is None and FeatureReader(as_student).labels()[5]["explanation"]
    client = TestClient(create_app([as_student]), base_url="http://127.0.0.1")
    (name,) = client.app.state.resources.stores
    r = client.post(f"/api/db/{name}/feature/5/label", json={"explanation": "x"})
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    assert FeatureReader(url).labels()[5]["explanation"] == "Opening brackets"
    client.app.state.resources.stores[name].close()
    with engine.connect() as c:
        c.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}"))
        c.execute(text(f"DROP ROLE {role}"))
    engine.dispose()


def test_a_table_made_by_another_writer_while_one_waits_is_found_not_made_twice(tmp_path, model, tokens):
    # the race CI once lost: a writer checked that `explanations` was missing, another made it, and the first's
    # CREATE then failed; the check must be made under the lock the CREATE needs (`dialect.write_lock`)
    import time

    from interplab.features import dialect as D
    from interplab.features import schema as S

    db = tmp_path / "f.db"
    torch.manual_seed(7)
    build_feature_db(db, model, make_sae(32, 6), tokens, CFG)
    holder, waiter = FeatureWriter(db), FeatureWriter(db)
    done: list[object] = []
    with holder.engine.begin() as c:
        D.write_lock(c)  # the other writer is mid-way through making the table
        t = threading.Thread(
            target=lambda: done.append(
                _or_error(waiter.add_explanation, 1, "x", explainer="e", backend="none", prompt_version="1")
            )
        )
        t.start()
        time.sleep(0.3)  # the waiter is now blocked on the lock (before the fix: its check already made)
        assert t.is_alive()
        S.explanations.create(c)
    t.join()
    assert isinstance(done[0], int), done[0]
    assert [e["text"] for e in waiter.reader().explanations(1)] == ["x"]


def test_two_writers_creating_one_database_at_once_migrate_it_once(tmp_path, monkeypatch):
    import time

    from interplab.features import schema as S

    calls: list[int] = []
    create_v1 = S.MIGRATIONS[1]

    def slow_create(conn) -> None:
        calls.append(1)
        time.sleep(0.2)  # both writers have looked at the schema version by now
        create_v1(conn)

    monkeypatch.setitem(S.MIGRATIONS, 1, slow_create)
    start = threading.Barrier(2)
    out: list[object] = []

    def open_it() -> None:
        start.wait()
        out.append(_or_error(lambda: FeatureWriter(tmp_path / "new.db", create=True).close()))

    threads = [threading.Thread(target=open_it) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [None, None]
    assert calls == [1]
    assert S.schema_version(FeatureReader(tmp_path / "new.db").engine) == S.SCHEMA_VERSION


def _or_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the test reports it
        return err
