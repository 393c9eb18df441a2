"""What differs between the feature database's backends, in one place: SQLite (a file) and PostgreSQL (a URL,
``postgresql://user@host/dbname``, through psycopg 3). Everything else is the same SQLAlchemy Core statements.

- **Values.** `SafeText`, `SafeString`, `SafeFloat` and `BigInt` are the column types: on SQLite they are plain
  TEXT / REAL / INTEGER (the same files as before); on PostgreSQL text is escaped reversibly so NUL (which
  PostgreSQL text cannot hold; a byte-level tokenizer's token 0 decodes to it) round-trips, and floats are
  stored as SQLite stores them (NaN as NULL, -0.0 as 0.0), so both backends read back the same values.
- **Upserts** (`upsert`): ``INSERT ... ON CONFLICT DO UPDATE`` on both (concurrent writers of one label never
  collide on its key). **Optional tables** and schema migrations are made under a lock held to the end of the
  transaction (`write_lock`: SQLite's write lock, PostgreSQL's advisory lock), so two writers creating the
  same table at once both succeed.
- **Order**: NULLs sort as on SQLite (first ascending, last descending) and text sorts by code point
  (`order_by`), whatever the server's collation.
- **Full-text search** of contexts: SQLite's FTS5 (``unicode61``, ``_`` a token character, ranked by bm25);
  PostgreSQL gets the same tokens (tokenized by SQLite's own ``unicode61``, `fts_tokens`) in a side table
  ``contexts_words`` with a trigram index (``pg_trgm``, where the server has it), matched as a phrase and
  ranked by the same bm25 formula, so a search returns the same contexts in the same order on both.

>>> fts_tokens(["Héllo wörld_x #12"])
[['hello', 'world_x', '12']]
"""

from __future__ import annotations

import math
import sqlite3
import threading
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    and_,
    delete,
    func,
    insert,
    literal_column,
    select,
    text,
)
from sqlalchemy.engine import Dialect

BigInt = BigInteger().with_variant(Integer(), "sqlite")
"""a 64-bit integer (INTEGER on SQLite, which is 64-bit already and keeps ``INTEGER PRIMARY KEY`` its rowid)"""

_ESC = "\uffff"  # a Unicode noncharacter: the escape of NUL on PostgreSQL (itself doubled)


def escape_nul(s: str) -> str:
    """Text as PostgreSQL stores it: NUL -> U+FFFF '0', U+FFFF -> U+FFFF U+FFFF (reversible)."""
    if "\x00" not in s and _ESC not in s:
        return s
    return s.replace(_ESC, _ESC + _ESC).replace("\x00", _ESC + "0")


def unescape_nul(s: str) -> str:
    if _ESC not in s:
        return s
    out, i = [], 0
    while i < len(s):
        ch = s[i]
        if ch == _ESC and i + 1 < len(s):
            out.append("\x00" if s[i + 1] == "0" else s[i + 1])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _nul_bind(value: Any) -> Any:
    return escape_nul(value) if isinstance(value, str) else value


def _nul_result(value: Any) -> Any:
    return unescape_nul(value) if isinstance(value, str) else value


class _NulSafe(TypeDecorator):
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Any:
        inner = self.impl_instance.bind_processor(dialect)
        if dialect.name == "sqlite":
            return inner
        if inner is None:
            return _nul_bind
        return lambda v: inner(_nul_bind(v))

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        inner = self.impl_instance.result_processor(dialect, coltype)
        if dialect.name == "sqlite":
            return inner
        if inner is None:
            return _nul_result
        return lambda v: _nul_result(inner(v))


class SafeText(_NulSafe):
    """TEXT; on PostgreSQL with NUL escaped (`escape_nul`)."""

    impl = Text
    cache_ok = True


class SafeString(_NulSafe):
    """VARCHAR(n); on PostgreSQL with NUL escaped (`escape_nul`)."""

    impl = String
    cache_ok = True


def _sqlite_float(value: Any) -> Any:
    if value is None:
        return None
    value = float(value) + 0.0  # -0.0 -> 0.0
    return None if math.isnan(value) else value


class SafeFloat(TypeDecorator):
    """A double; every backend stores what SQLite stores (NaN as NULL, -0.0 as 0.0)."""

    impl = Float
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Any:
        inner = self.impl_instance.bind_processor(dialect)
        if dialect.name == "sqlite":
            return inner
        if inner is None:
            return _sqlite_float
        return lambda v: inner(_sqlite_float(v))


def base_type(col: Column) -> Any:
    """The SQLAlchemy type a column stores (a `TypeDecorator`'s implementation)."""
    t = col.type
    return t.impl_instance if isinstance(t, TypeDecorator) else t


def is_sqlite(conn_or_engine: Any) -> bool:
    return conn_or_engine.dialect.name == "sqlite"


# ---- upserts, optional tables, order ---------------------------------------------------------------------
def upsert(c: Connection, table: Table, values: dict[str, Any], keys: Sequence[str]) -> None:
    """Insert ``values`` into ``table`` or, when a row with the same ``keys`` exists, replace its other
    columns: one statement, so concurrent writers of the same key never collide."""
    if c.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    elif c.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert  # type: ignore[assignment]
    else:  # another SQLAlchemy backend: delete + insert in the caller's transaction
        c.execute(delete(table).where(and_(*(table.c[k] == values[k] for k in keys))))
        c.execute(insert(table).values(**values))
        return
    stmt = dialect_insert(table).values(**values)
    rest = {k: stmt.excluded[k] for k in values if k not in keys}
    c.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=rest))


def write_lock(c: Connection) -> None:
    """Take the database's schema-change lock now, held until ``c``'s transaction ends, so that what ``c``
    then checks (is this table there? which schema version is this?) stays true until it commits: a
    concurrent writer waits here and then finds the tables made. SQLite: the write lock (``BEGIN IMMEDIATE``,
    waiting up to the busy timeout), unless ``c``'s transaction already writes and so holds it; PostgreSQL:
    a transaction-level advisory lock."""
    if c.dialect.name == "sqlite":
        raw = c.connection.dbapi_connection
        if raw is not None and not raw.in_transaction:
            c.exec_driver_sql("BEGIN IMMEDIATE")
    elif c.dialect.name == "postgresql":
        c.execute(select(func.pg_advisory_xact_lock(zlib.crc32(b"interplab.features.ddl"))))


def ensure_tables(c: Connection, *tables: Table) -> None:
    """Create optional tables (and their indexes) that are missing, under `write_lock`, so two writers
    creating the same table at once both succeed (a check made outside the lock could be stale by the time
    its ``CREATE`` runs)."""
    write_lock(c)
    for table in tables:
        table.create(c, checkfirst=True)
        for index in table.indexes:
            index.create(c, checkfirst=True)


def reset_sequence(c: Connection, table: Table) -> None:
    """After rows were inserted with their ids (a copy): PostgreSQL's id sequence continues after the
    largest (SQLite's rowid always does)."""
    if c.dialect.name != "postgresql" or table.autoincrement_column is None:
        return
    col = table.autoincrement_column
    c.execute(
        text(
            f"SELECT setval(pg_get_serial_sequence('{table.name}', '{col.name}'), "
            f"COALESCE((SELECT MAX({col.name}) FROM {table.name}), 0) + 1, false)"
        )
    )


def lock_row(query: Any, c: Connection) -> Any:
    """``query`` locking the rows it reads until the transaction ends (PostgreSQL ``FOR UPDATE``; SQLite
    writers are serialised by the database lock already)."""
    return query.with_for_update() if c.dialect.name == "postgresql" else query


def order_by(col: Any, *, desc: bool = False, dialect: str) -> Any:
    """An ORDER BY term that sorts as SQLite does on every backend: NULLs first ascending and last
    descending, text by code point."""
    if dialect == "postgresql" and isinstance(base_type(col), String):
        col = col.collate("C")
    term = col.desc() if desc else col.asc()
    if dialect == "postgresql":
        term = term.nulls_last() if desc else term.nulls_first()
    return term


def like_pattern(query: str) -> str:
    """A LIKE pattern (escape character backslash) matching ``query`` literally anywhere."""
    return "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


# ---- full-text search -----------------------------------------------------------------------------------
FTS5_TOKENIZE = "unicode61 tokenchars '_'"
"""the tokenizer of SQLite's ``contexts_fts`` (and of `fts_tokens`, for PostgreSQL)"""

_local = threading.local()


def fts_tokens(texts: Iterable[str]) -> list[list[str]]:
    """Each text's tokens as SQLite's FTS5 ``unicode61`` tokenizer (``_`` a token character) makes them:
    letters and digits, case-folded, diacritics removed. Tokenized by SQLite itself (an in-memory FTS5
    table), so PostgreSQL's search finds exactly what SQLite's does."""
    texts = list(texts)
    con = getattr(_local, "fts", None)
    if con is None:
        con = sqlite3.connect(":memory:")
        con.execute(f'CREATE VIRTUAL TABLE t USING fts5(text, tokenize="{FTS5_TOKENIZE}")')
        con.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
        _local.fts = con
    out: list[list[str]] = [[] for _ in texts]
    with con:
        con.executemany("INSERT INTO t(rowid, text) VALUES (?, ?)", enumerate(texts))
        for doc, term in con.execute("SELECT doc, term FROM v ORDER BY doc, offset"):
            out[doc].append(term)
        con.execute("DELETE FROM t")
    return out


fts_metadata = MetaData()
contexts_words = Table(  # PostgreSQL's full-text index of contexts (SQLite has contexts_fts)
    "contexts_words",
    fts_metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),  # contexts.id
    Column("words", Text, nullable=False),  # " tok1 tok2 ... " (`fts_tokens` of the text)
    Column("n", Integer, nullable=False),  # number of tokens (bm25's document length)
)
BM25_K1, BM25_B = 1.2, 0.75
"""FTS5's bm25 constants"""


def _create_fts5(c: Connection, name: str, content: str) -> None:
    c.execute(
        text(
            f'CREATE VIRTUAL TABLE IF NOT EXISTS {name} USING fts5(text, {content}, tokenize="{FTS5_TOKENIZE}")'
        )
    )


def fts_create(c: Connection) -> None:
    """The full-text index of ``contexts`` (in the first migration)."""
    if c.dialect.name == "sqlite":
        _create_fts5(c, "contexts_fts", "content='contexts', content_rowid='id'")
    elif c.dialect.name == "postgresql":
        contexts_words.create(c, checkfirst=True)
        try:  # an index for LIKE '%...%' where the server has pg_trgm (a trusted extension since 13)
            with c.begin_nested():
                c.execute(text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
                c.execute(
                    text(
                        "CREATE INDEX IF NOT EXISTS ix_contexts_words_trgm ON contexts_words "
                        "USING gin (words gin_trgm_ops)"
                    )
                )
        except Exception:  # noqa: BLE001 - no pg_trgm here: search still works, scanning the table
            pass


def fts_tables(c: Connection) -> list[str]:
    """The dialect's full-text tables that exist (dropped with the rest on an overwrite)."""
    if c.dialect.name == "postgresql":
        return [contexts_words.name] if contexts_words.name in _table_names(c) else []
    return []


def _table_names(c: Connection) -> set[str]:
    from sqlalchemy import inspect

    return set(inspect(c).get_table_names())


def fts_insert(c: Connection, first_id: int, rows: Sequence[dict]) -> None:
    """Index the contexts just written (ids from ``first_id``; those with text)."""
    if c.dialect.name == "sqlite":  # filled by SQLite itself from the table
        c.exec_driver_sql(
            "INSERT INTO contexts_fts(rowid, text) SELECT id, text FROM contexts WHERE id >= ? AND text != ''",
            (first_id,),
        )
    elif c.dialect.name == "postgresql":
        with_text = [r for r in rows if r["text"] != ""]
        if with_text:
            toks = fts_tokens(r["text"] for r in with_text)
            entries = [
                {"id": r["id"], "words": " " + " ".join(t) + " " if t else " ", "n": len(t)}
                for r, t in zip(with_text, toks, strict=True)
            ]
            c.execute(insert(contexts_words), entries)


def fts_search(c: Connection, contexts: Table, query: str, limit: int) -> list[tuple[int, str]]:
    """(feature, text) of the rows of ``contexts`` whose text holds ``query``'s tokens as a phrase, best
    first (FTS5's bm25, then by id)."""
    if c.dialect.name == "sqlite":
        phrase = '"' + query.replace('"', '""') + '"'
        rows = c.execute(
            text(
                "SELECT c.feature, c.text FROM contexts_fts JOIN contexts c ON c.id = contexts_fts.rowid "
                "WHERE contexts_fts MATCH :q ORDER BY contexts_fts.rank, c.id LIMIT :n"
            ),
            {"q": phrase, "n": limit},
        )
        return [(int(f), t) for f, t in rows]
    if c.dialect.name != "postgresql":  # another backend: a plain case-insensitive substring match
        q = (
            select(contexts.c.feature, contexts.c.text)
            .where(contexts.c.text.ilike(like_pattern(query), escape="\\"))
            .order_by(contexts.c.id)
            .limit(limit)
        )
        return [(int(f), t) for f, t in c.execute(q)]
    (tokens,) = fts_tokens([query])
    if not tokens:
        return []
    phrase = " " + " ".join(tokens) + " "
    like = like_pattern(phrase)
    w = contexts_words.c
    score = _bm25(c, phrase)
    q = (
        select(contexts.c.feature, contexts.c.text)
        .join(contexts_words, w.id == contexts.c.id)
        .where(w.words.like(like, escape="\\"))
        .order_by(score.desc(), contexts.c.id)
        .limit(limit)
    )
    return [(int(feat), t) for feat, t in c.execute(q)]


# schema version 4: the index keyed by context id (`packed.context_id`), holding only the top contexts' text
def fts_create_v4(c: Connection) -> None:
    """Schema version 4's full-text index: SQLite's contentless FTS5 ``context_fts`` (rowid: the context id;
    the texts live in ``context_blocks``); PostgreSQL keeps ``contexts_words`` (emptied: its ids change)."""
    if c.dialect.name == "sqlite":
        _create_fts5(c, "context_fts", "content=''")
    elif c.dialect.name == "postgresql":
        fts_create(c)
        c.execute(delete(contexts_words))


def fts_drop_v3(c: Connection) -> None:
    """Drop schema version 3's SQLite index (an external-content table over the ``contexts`` rows)."""
    if c.dialect.name == "sqlite":
        c.execute(text("DROP TABLE IF EXISTS contexts_fts"))


def fts_drop(c: Connection) -> None:
    """Drop the full-text index of either version (the database's tables are being dropped)."""
    fts_drop_v3(c)
    if c.dialect.name == "sqlite":
        c.execute(text("DROP TABLE IF EXISTS context_fts"))
    elif contexts_words.name in fts_tables(c):
        contexts_words.drop(c)


def fts_index(c: Connection, ids: Sequence[int], texts: Sequence[str]) -> None:
    """Index ``texts`` under their context ids (schema version 4)."""
    if not ids:
        return
    if c.dialect.name == "sqlite":
        c.exec_driver_sql(
            "INSERT INTO context_fts(rowid, text) VALUES (?, ?)", list(zip(ids, texts, strict=True))
        )
    elif c.dialect.name == "postgresql":
        fts_insert(c, 0, [{"id": i, "text": t} for i, t in zip(ids, texts, strict=True)])


def fts_unindex(c: Connection, ids: Sequence[int], texts: Sequence[str]) -> None:
    """Remove the entries `fts_index` made for ``ids`` (a contentless FTS5 table is told the old text)."""
    if not ids:
        return
    if c.dialect.name == "sqlite":
        c.exec_driver_sql(
            "INSERT INTO context_fts(context_fts, rowid, text) VALUES ('delete', ?, ?)",
            list(zip(ids, texts, strict=True)),
        )
    elif c.dialect.name == "postgresql":
        for lo in range(0, len(ids), 500):
            c.execute(delete(contexts_words).where(contexts_words.c.id.in_(list(ids[lo : lo + 500]))))


def fts_ids(c: Connection, query: str, limit: int) -> list[int]:
    """Context ids whose text holds ``query``'s tokens as a phrase, best first (bm25, then by id): schema
    version 4's `fts_search` (the same ranking over the same texts)."""
    if c.dialect.name == "sqlite":
        phrase = '"' + query.replace('"', '""') + '"'
        rows = c.execute(
            text("SELECT rowid FROM context_fts WHERE context_fts MATCH :q ORDER BY rank, rowid LIMIT :n"),
            {"q": phrase, "n": limit},
        )
        return [int(i) for (i,) in rows]
    if c.dialect.name != "postgresql":
        raise NotImplementedError(f"full-text search on {c.dialect.name}")
    (tokens,) = fts_tokens([query])
    if not tokens:
        return []
    phrase = " " + " ".join(tokens) + " "
    w = contexts_words.c
    score = _bm25(c, phrase)
    q = (
        select(w.id)
        .where(w.words.like(like_pattern(phrase), escape="\\"))
        .order_by(score.desc(), w.id)
        .limit(limit)
    )
    return [int(i) for (i,) in c.execute(q)]


def _bm25(c: Connection, phrase: str) -> Any:
    """FTS5's bm25 of ``phrase`` (space-padded tokens) in ``contexts_words``, as a SQL expression."""
    # every instance of the phrase, overlapping ones too (as FTS5 counts them): a zero-width lookahead
    pattern = "(?=" + "".join(ch if ch.isalnum() or ch in " _" else "\\" + ch for ch in phrase) + ")"
    w = contexts_words.c
    n_rows, n_tokens = c.execute(select(func.count(), func.coalesce(func.sum(w.n), 0))).one()
    avgdl = float(n_tokens) / n_rows if n_rows and n_tokens else 1.0
    f = func.regexp_count(w.words, pattern)
    k1: Any = literal_column(repr(BM25_K1))
    b: Any = literal_column(repr(BM25_B))
    return f * (k1 + 1.0) / (f + k1 * (1.0 - b + b * w.n / literal_column(repr(avgdl))))


# ---- engines ----------------------------------------------------------------------------------------------
POSTGRES_EXTRA = "pip install 'interplab[postgres]'"


def engine_url(url: str) -> str:
    """The SQLAlchemy URL to connect with: ``postgresql://`` and ``postgres://`` use psycopg 3 (the
    ``postgres`` extra); a URL naming its driver (``postgresql+pg8000://``) is kept."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ImportError(
                f"a PostgreSQL feature database needs the psycopg driver: {POSTGRES_EXTRA}"
            ) from None
        return f"postgresql+psycopg{sep}{rest}"
    return url


def display_url(url: str) -> str:
    """``url`` with its password hidden (for messages)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def may_write(c: Connection, table: str) -> bool:
    """Whether this connection's role may write ``table`` (PostgreSQL privileges; always on SQLite, whose
    file permissions are checked before it opens)."""
    if c.dialect.name != "postgresql":
        return True
    return bool(
        c.execute(
            select(func.has_table_privilege(func.current_user(), table, "INSERT, UPDATE, DELETE"))
        ).scalar()
    )


def set_read_only(dbapi_conn: Any, _record: Any) -> None:
    """A PostgreSQL connection of a reader: every transaction read-only (the server refuses writes)."""
    cur = dbapi_conn.cursor()
    cur.execute("SET default_transaction_read_only = on")
    cur.close()
    dbapi_conn.commit()
