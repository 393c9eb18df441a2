"""The feature database's tables (SQLAlchemy Core), their versions and migrations.

SQLite is the default (one file, WAL journal so the web app can read while a build writes); PostgreSQL by URL
(``postgresql://user@host/dbname``) holds the same tables and answers the same queries: what differs between
the two (value types, upserts, order, full-text search) lives in `interplab.features.dialect`.

Schema history: 1 = meta, vocab, features, contexts, build passes; 2 = + labels (explanations, scores);
3 = + checksums (a SHA-256 per feature of its row and contexts, verified when the feature is read, so a changed
byte is named instead of served; features written before version 3 have none); 4 = contexts packed, a row per
feature and kind (`context_blocks`, `interplab.features.packed`: the checksum over the packed bytes) instead of
a row per context (`legacy_contexts`, still read in a version 3 database), + ``top_tokens`` (token search), the
full-text index keyed by context id (`packed.context_id`, as ``context_loss`` is).
Optional, in no version: ``dt_rows`` (`dt_rows`), written only into databases of a decision transformer's
features (`interplab.rl.features`), whose "tokens" are the rows of a trajectory cache: where each row comes from
(episode, step, token kind, action, return-to-go). A database without it is a language model's; every reader
checks for it (`has_table`), so older databases open unchanged and an older interplab reads the new ones.
Likewise ``feature_lists`` + ``feature_list_items`` (user-made lists of features, written by the web app) and
``context_loss`` (per-token change of the next-token loss over a stored context's window when the feature is
removed: `interplab.features.loss_effects`).
Optional too (automatic interpretation): ``explanations`` (every explanation of a feature, with its explainer, LLM
backend and prompt version: `interplab.features.explain`), ``explanation_scores`` (`interplab.features.scorers`)
and ``llm_cache`` (LLM responses by a hash of their request, so a rerun costs nothing:
`interplab.features.llm.CachedBackend`), each created by the first write that needs it.
A file path is opened through a percent-encoded ``file:`` URI (`interplab.features.database.sqlite_engine`), so
a name with ``?`` or ``#`` is a name; a `FeatureReader` opens with ``mode=ro`` and never switches the journal.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    UniqueConstraint,
    event,
    inspect,
    select,
)

from interplab.features import dialect as D
from interplab.features.dialect import BigInt, SafeFloat, SafeString, SafeText
from interplab.runs import VERSIONS, Kind

SCHEMA_VERSION = VERSIONS[Kind.FEATURE_DB]
"""``meta.schema_version``: the version of these tables (`interplab.runs.VERSIONS`)"""
KIND = Kind.FEATURE_DB.value
"""``meta.kind``: marks a database as interplab's (databases without it and without a schema version are
foreign and are never written into)"""
LEGACY_KINDS = ("interplab.features",)
"""earlier ``meta.kind`` markers (before `interplab.runs`), still read as this kind"""

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", SafeString(64), primary_key=True),
    Column("value", SafeText, nullable=False),
)

vocab = Table(
    "vocab",
    metadata,
    Column("token", Integer, primary_key=True),
    Column("text", SafeText, nullable=False),
    Column("count", BigInt, nullable=False),
)

features = Table(
    "features",
    metadata,
    Column("feature", Integer, primary_key=True, autoincrement=False),
    Column("n_fires", BigInt, nullable=False),
    Column("density", SafeFloat, nullable=False),
    Column("max_act", SafeFloat, nullable=False),
    Column("mean_act", SafeFloat, nullable=False),
    Column("loss_effect", SafeFloat),
    Column("hist", SafeText, nullable=False),  # JSON list of counts per log-spaced bin (edges in meta)
    Column("logits", SafeText, nullable=False),  # JSON {"pos": [[token, value]...], "neg": [...]}
    Column("cooc", SafeText, nullable=False),  # JSON [[feature, jaccard, count]...]
    Column("top_token", Integer),  # token at the strongest firing
)
Index("ix_features_density", features.c.density)
Index("ix_features_top_token", features.c.top_token)

legacy_metadata = MetaData()
"""tables of older schema versions only (created by their migrations, read in databases still at them)"""

legacy_contexts = Table(  # schema versions 1-3: one row per context (version 4: `context_blocks`)
    "contexts",
    legacy_metadata,
    Column("id", BigInt, primary_key=True, autoincrement=True),
    Column("feature", Integer, nullable=False),
    Column("kind", Integer, nullable=False),  # 0: top activating, 1: uniform sample of firings
    Column("rank", Integer, nullable=False),
    Column("token_index", BigInt, nullable=False),  # global index of the activating token in the corpus
    Column("act", SafeFloat, nullable=False),
    Column("center_token", Integer, nullable=False),
    Column("tokens", LargeBinary, nullable=False),  # int32 little-endian ids of the window (-1: outside)
    Column("acts", LargeBinary, nullable=False),  # float32 little-endian activations over the window
    Column("text", SafeText, nullable=False),  # the window as text (top contexts only; full-text indexed)
)
Index("ix_contexts_feature", legacy_contexts.c.feature, legacy_contexts.c.kind, legacy_contexts.c.rank)
Index("ix_contexts_token", legacy_contexts.c.center_token, legacy_contexts.c.act)

context_blocks = Table(  # schema version 4: a feature's contexts of one kind in one row (`packed`)
    "context_blocks",
    metadata,
    Column("feature", Integer, primary_key=True, autoincrement=False),
    Column("kind", Integer, primary_key=True, autoincrement=False),  # 0: top activating, 1: sampled
    Column("n", Integer, nullable=False),  # contexts
    Column("width", Integer, nullable=False),  # tokens per window
    Column("rank", LargeBinary, nullable=False),  # int32 little-endian [n]
    Column("token_index", LargeBinary, nullable=False),  # int64 [n]: global index of the activating token
    Column("act", LargeBinary, nullable=False),  # float64 [n] (NaN: none)
    Column("center_token", LargeBinary, nullable=False),  # int32 [n]
    Column("tokens", LargeBinary, nullable=False),  # int32 [n, width] ids of the windows (-1: outside)
    Column("acts", LargeBinary, nullable=False),  # float32 [n, width] activations over the windows
    Column("text_len", LargeBinary, nullable=False),  # int32 [n]: UTF-8 bytes of each window's text
    Column("text", LargeBinary, nullable=False),  # the texts' UTF-8, concatenated (top contexts only)
)

top_tokens = Table(  # schema version 4: which features' top contexts peak on a token (`search_token`)
    "top_tokens",
    metadata,
    Column("token", Integer, primary_key=True, autoincrement=False),
    Column("feature", Integer, primary_key=True, autoincrement=False),
    Column("n", Integer, nullable=False),  # top contexts of the feature centred on the token
    Column("max_act", SafeFloat, nullable=False),  # the strongest of them
)
Index("ix_top_tokens_feature", top_tokens.c.feature)

passes = Table(
    "passes",
    metadata,
    Column("first", Integer, primary_key=True, autoincrement=False),
    Column("last", Integer, nullable=False),
)

labels = Table(
    "labels",
    metadata,
    Column("feature", Integer, primary_key=True, autoincrement=False),
    Column("explanation", SafeText, nullable=False),
    Column("source", SafeString(64), nullable=False),  # "human" or "auto:<explainer>"
    Column("score", SafeFloat),
)

checksums = Table(
    "checksums",
    metadata,
    Column("feature", Integer, primary_key=True, autoincrement=False),
    Column(
        "sha256", SafeString(64), nullable=False
    ),  # of the feature's row and contexts (v3: `row_digest`; v4: `packed.block_digest`)
)

dt_rows = Table(
    "dt_rows",
    metadata,
    Column("token_index", BigInt, primary_key=True, autoincrement=False),  # a context's token_index
    Column("episode", Integer, nullable=False),  # in the trajectory folder recorded in meta "dt"
    Column("step", Integer, nullable=False),  # within the episode
    Column("flat_step", Integer, nullable=False),  # in the trajectories' flat step axis
    Column("token_kind", SafeString(16), nullable=False),  # "rtg", "state" or "action"
    Column("action", Integer, nullable=False),  # the action taken at the step
    Column("rtg", SafeFloat, nullable=False),  # the return-to-go at the step
)
explanations = Table(
    "explanations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("feature", Integer, nullable=False),
    Column("text", SafeText, nullable=False),
    Column("explainer", SafeString(64), nullable=False),  # "llm", "baseline:token-enrichment", "oracle", ...
    Column("backend", SafeString(128), nullable=False),  # "openai:<model>@<host>", "local:<folder>", "none"
    Column("prompt_version", SafeString(32), nullable=False),
    Column("created", SafeFloat, nullable=False),  # unix time
    Column("meta", SafeText, nullable=False),  # JSON (the prompt's contexts, token counts, ...)
)
Index("ix_explanations_feature", explanations.c.feature)

llm_cache = Table(
    "llm_cache",
    metadata,
    Column(
        "key", SafeString(64), primary_key=True
    ),  # sha256 hex of the canonical request JSON (backend, params)
    Column("request", SafeText, nullable=False),
    Column("response", SafeText, nullable=False),  # JSON of the `Completion`
    Column("created", SafeFloat, nullable=False),
)

explanation_scores = Table(
    "explanation_scores",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("explanation_id", Integer, nullable=False),  # explanations.id
    Column(
        "scorer", SafeString(32), nullable=False
    ),  # detection, fuzzing, intruder, embedding, simulation, baseline
    Column("value", SafeFloat),  # NULL: NaN (SQLite stores NaN as NULL)
    Column("n", BigInt, nullable=False),  # items judged
    Column("details", SafeText, nullable=False),  # JSON
    Column("backend", SafeString(128), nullable=False),
    Column("prompt_version", SafeString(32), nullable=False),
    Column("seed", BigInt, nullable=False),
    Column("created", SafeFloat, nullable=False),
    UniqueConstraint(
        "explanation_id", "scorer", "backend", "prompt_version", "seed", name="uq_explanation_score"
    ),
)
Index("ix_explanation_scores_explanation", explanation_scores.c.explanation_id)

feature_lists = Table(  # user-made collections of features (the web app's lists; `FeatureWriter.create_list`)
    "feature_lists",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", SafeString(200), nullable=False, unique=True),
    Column("description", SafeText, nullable=False),
    Column("created", SafeFloat, nullable=False),  # unix time
)
feature_list_items = Table(
    "feature_list_items",
    metadata,
    Column("list_id", Integer, primary_key=True, autoincrement=False),
    Column("feature", Integer, primary_key=True, autoincrement=False),
    Column("note", SafeText, nullable=False),
    Column("position", Integer, nullable=False),  # 0, 1, ... in the list's order
)
context_loss = Table(  # `interplab.features.loss_effects`: per-token loss change of a context's window
    "context_loss",
    metadata,
    Column(
        "context_id", BigInt, primary_key=True, autoincrement=False
    ),  # v3: contexts.id; v4: packed.context_id
    Column("loss", LargeBinary, nullable=False),  # float32 little-endian over the window (NaN: not computed)
)
OPTIONAL_TABLES = (
    dt_rows,
    explanations,
    explanation_scores,
    llm_cache,
    feature_lists,
    feature_list_items,
    context_loss,
)
"""tables only some databases have (created by the build that needs them; absent from every migration)"""

_V1_TABLES = (meta, vocab, features, legacy_contexts, passes)
CONTEXT_DIGEST_COLUMNS = ("kind", "rank", "token_index", "act", "tokens", "acts", "text")  # `_context_repr`
READABLE_FROM = 2
"""the oldest schema a read-only open can serve (older ones need a migration, i.e. a write)"""


def feature_repr(feature_row: Mapping[Any, Any]) -> str:
    """The normalised ``repr`` tuple of a feature row (each value as its column stores it): what both
    versions' checksums start with."""
    return repr(tuple([conv(feature_row.get(name)) for name, conv in _FEATURE_DIGEST]))


def row_digest(feature_row: Mapping[Any, Any], context_rows: Iterable[Mapping[Any, Any]]) -> str:
    """SHA-256 of one feature's stored values (its row, then its contexts by kind and rank), each normalised to
    the type its column stores, so the digest computed at write equals the one recomputed from a read.
    (Hashed as one string of the rows' ``repr`` tuples: the same digest as hashing them row by row.)"""
    parts = [feature_repr(feature_row)]
    for r in sorted(context_rows, key=lambda r: (int(r["kind"]), int(r["rank"]))):
        parts.append(_context_repr(r))
    return hashlib.sha256("".join(parts).encode()).hexdigest()


CONTEXT_COLUMNS = ("feature", "kind", "rank", "token_index", "act", "center_token", "tokens", "acts", "text")
"""version 3's `legacy_contexts` columns after ``id``, in its order (the fields of `packed.ContextArrays`)"""


def _context_repr(r: Mapping[Any, Any]) -> str:
    """The normalised ``repr`` tuple of one context row (`CONTEXT_DIGEST_COLUMNS`). A build's rows hold
    exactly the stored types, so those are used as they are (a float only loses -0.0 and NaN, as stored);
    anything else goes through the columns' converters."""
    kind, rank, act = r.get("kind"), r.get("rank"), r.get("act")
    index, toks, acts, text = r.get("token_index"), r.get("tokens"), r.get("acts"), r.get("text")
    if (
        type(kind) is int
        and type(rank) is int
        and type(index) is int
        and type(act) is float
        and type(toks) is bytes
        and type(acts) is bytes
        and type(text) is str
    ):
        return repr((kind, rank, index, None if act != act else act + 0.0, toks, acts, text))
    return repr(tuple([conv(r.get(name)) for name, conv in _CONTEXT_DIGEST]))


def _stored(col: Column, value: Any) -> Any:
    return _converter(col)(value)


def _stored_float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value) + 0.0  # SQLite stores -0.0 as 0 and NaN as NULL
    return None if math.isnan(value) else value


def _stored_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _stored_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _stored_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _converter(col: Column) -> Callable[[Any], Any]:
    """How a value is normalised to the type ``col`` stores (None stays None)."""
    kind = D.base_type(col)
    if isinstance(kind, Float):
        return _stored_float
    if isinstance(kind, Integer):
        return _stored_int
    if isinstance(kind, LargeBinary):
        return _stored_bytes
    return _stored_str


_FEATURE_DIGEST = [(col.name, _converter(col)) for col in features.columns]
_CONTEXT_DIGEST = [(name, _converter(legacy_contexts.c[name])) for name in CONTEXT_DIGEST_COLUMNS]


def has_table(engine: Engine | Connection, table: Table) -> bool:
    return inspect(engine).has_table(table.name)


SQLITE_PAGE_SIZE = 16384
"""the page size of a new database file (SQLite's default is 4096): a feature's packed contexts of one kind are
~4 KB, which at 4 KB pages each spill into an overflow page; 16 KB pages make the file ~20% smaller and its
writes cheaper. An existing file keeps the size it has (SQLite ignores the pragma then)."""


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # before the journal switch, which fixes it
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _sqlite_read_only_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()  # no journal-mode switch: that would write
    cur.execute("PRAGMA query_only=1")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def install_pragmas(engine: Engine, *, read_only: bool = False) -> None:
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_read_only_pragmas if read_only else _sqlite_pragmas)
    elif engine.dialect.name == "postgresql" and read_only:
        event.listen(engine, "connect", D.set_read_only)


def is_our_kind(kind: str | None) -> bool:
    """Whether a ``meta.kind`` marker is interplab's feature database (None: no marker, as before it had one)."""
    return kind is None or kind == KIND or kind in LEGACY_KINDS


def schema_version(engine: Engine) -> int:
    """0 for an empty database."""
    return inspect_database(engine)[0]


def inspect_database(engine: Engine) -> tuple[int, set[str], str | None]:
    """(schema version (0: none), table names, the ``kind`` marker in ``meta`` if any)."""
    tables = set(inspect(engine).get_table_names())
    if "meta" not in tables:
        return 0, tables, None
    with engine.connect() as conn:
        rows = dict(
            conn.execute(
                select(meta.c.key, meta.c.value).where(meta.c.key.in_(["schema_version", "kind"]))
            ).all()
        )
    version = rows.get("schema_version")
    kind = rows.get("kind")
    return (int(version) if version is not None else 0), tables, json.loads(kind) if kind else None


def _version_in(conn: Connection) -> int:
    """The schema version as ``conn`` sees it (inside its transaction; 0: none)."""
    if not inspect(conn).has_table(meta.name):
        return 0
    value = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
    return int(value) if value is not None else 0


def _create_v1(conn) -> None:
    for table in _V1_TABLES:
        table.create(conn, checkfirst=True)
        for index in table.indexes:
            index.create(conn, checkfirst=True)
    D.fts_create(conn)


def _v1_to_v2(conn) -> None:
    labels.create(conn, checkfirst=True)


def _v2_to_v3(conn) -> None:
    checksums.create(conn, checkfirst=True)


def _v3_to_v4(conn) -> None:
    """Contexts packed (`packed.upgrade_contexts`), in the migration's one transaction: on any error the
    database stays at version 3 as it was."""
    from interplab.features import packed

    for table in (context_blocks, top_tokens):
        table.create(conn, checkfirst=True)
        for index in table.indexes:
            index.create(conn, checkfirst=True)
    D.fts_create_v4(conn)
    packed.upgrade_contexts(conn, conn)
    D.fts_drop_v3(conn)
    legacy_contexts.drop(conn)


MIGRATIONS = {1: _create_v1, 2: _v1_to_v2, 3: _v2_to_v3, 4: _v3_to_v4}


def migrate(engine: Engine, target: int = SCHEMA_VERSION) -> int:
    """Bring the database to schema ``target`` (creating it if empty); returns the version it had."""
    found = schema_version(engine)
    if found > SCHEMA_VERSION:
        raise ValueError(
            f"the feature database has schema version {found}; this interplab reads up to "
            f"{SCHEMA_VERSION}: upgrade interplab"
        )
    for version in range(found + 1, target + 1):
        with engine.begin() as conn:
            D.write_lock(conn)  # a concurrent writer migrating the same database waits, then finds it done
            if _version_in(conn) >= version:
                continue
            MIGRATIONS[version](conn)
            conn.execute(meta.delete().where(meta.c.key.in_(["schema_version", "kind"])))
            conn.execute(meta.insert().values(key="schema_version", value=str(version)))
            conn.execute(meta.insert().values(key="kind", value=json.dumps(KIND)))
    return found
