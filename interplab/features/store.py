"""`FeatureStore`: reads and writes the feature database (SQLite file or any SQLAlchemy URL).

>>> store = FeatureStore("features.db")
>>> rec = store.feature(12)     # statistics, histogram, top logits, contexts ("top", then "samples"), label
>>> rec["density"] > 0, len(rec["top"]) > 0
(True, True)
>>> hits = store.search_token(store.token_id("#7"))  # which features peak on token 7?
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, create_engine, delete, func, insert, or_, select, text
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.pool import QueuePool

from interplab.features import schema as S
from interplab.integrity import IntegrityError

MAX_QUERY = 1000
"""the longest text `FeatureStore.search_text` accepts (SQLite refuses LIKE patterns over 50,000 bytes)"""


class FeatureNotFound(KeyError):
    """The feature index is not in the database (out of range, or not built yet)."""


@dataclass(frozen=True)
class TokenHit:
    """A feature whose top contexts peak on a given token."""

    feature: int
    count: int
    max_act: float


class ReadOnlyDatabase(PermissionError):
    """A write to a feature database that was opened read-only."""


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path_or_url: str | Path) -> bool:
    """True for a SQLAlchemy URL (``scheme://...``); a `Path`, or any other string, is a file path."""
    return not isinstance(path_or_url, Path) and bool(_URL.match(str(path_or_url)))


def database_url(path_or_url: str | Path) -> str:
    """A display URL (the engine of a file is built from its path, never by parsing this)."""
    return str(path_or_url) if is_url(path_or_url) else f"sqlite:///{Path(path_or_url).resolve()}"


def sqlite_uri(file: str | Path, *, read_only: bool = False, immutable: bool = False) -> str:
    """A ``file:`` URI for sqlite3 with the path percent-encoded, so ``?``, ``#`` and ``%`` in a file name are
    part of the name. ``read_only``: mode=ro (nothing is written, not even a journal-mode switch);
    ``immutable``: also promise that nobody writes it (needed for a WAL database on a read-only filesystem)."""
    uri = "file:" + urllib.parse.quote(str(Path(file).resolve())) + ("?mode=ro" if read_only else "?mode=rwc")
    return uri + ("&immutable=1" if immutable else "")


def sqlite_engine(file: str | Path, *, read_only: bool = False, immutable: bool = False) -> Engine:
    """A SQLAlchemy engine over the SQLite file at ``file`` (a path, never parsed as a URL)."""
    uri = sqlite_uri(file, read_only=read_only, immutable=immutable)
    engine = create_engine(
        "sqlite+pysqlite://",
        creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
        poolclass=QueuePool,
    )
    S.install_pragmas(engine, read_only=read_only)
    return engine


def open_store(path_or_url: str | Path, *, read_only: bool | None = None) -> FeatureStore:
    """Open an existing feature database to serve it: read-write where it can be written, else read-only
    (``read_only=None``); or as asked."""
    if read_only is None and not is_url(path_or_url):
        file = Path(path_or_url)
        writable = os.access(file, os.W_OK) and os.access(file.resolve().parent, os.W_OK)
        if not writable:
            return FeatureStore(path_or_url, read_only=True)
        try:
            return FeatureStore(path_or_url)
        except OperationalError as err:  # e.g. a read-only filesystem that os.access does not know about
            if "readonly" not in str(err) and "unable to open" not in str(err):
                raise
            return FeatureStore(path_or_url, read_only=True)
    return FeatureStore(path_or_url, read_only=bool(read_only))


class FeatureStore:
    """One feature database. ``create=True`` makes (or migrates) it; otherwise it must already exist.
    ``read_only=True`` opens it without writing anything (mode=ro; labels cannot be set)."""

    def __init__(self, path_or_url: str | Path, *, create: bool = False, read_only: bool = False) -> None:
        if create and read_only:
            raise ValueError("a feature database cannot be created read-only")
        self.url = database_url(path_or_url)
        self.read_only = read_only
        self.file = None if is_url(path_or_url) else Path(path_or_url).expanduser().resolve()
        where = str(self.file or path_or_url)
        if self.file is not None:
            if self.file.exists() and not self.file.is_file():
                raise ValueError(f"{self.file} is not a file: give the path of a feature database file")
            if not create and not self.file.is_file():
                raise FileNotFoundError(
                    f"no feature database at {self.file} (build one with `interplab features build`)"
                )
            if self.file.is_file():
                found = self._probe(where, create, read_only)
            else:
                found, self.engine = 0, sqlite_engine(self.file)
        else:
            self.engine = create_engine(self.url)
            S.install_pragmas(self.engine, read_only=read_only)
            found = self._schema(self.engine, where, create)
        if create:
            S.migrate(self.engine)
        elif found < S.SCHEMA_VERSION:
            if read_only and found >= S.READABLE_FROM:
                pass  # served as it is; what a newer schema adds (checksums) is simply absent
            elif read_only:
                raise ReadOnlyDatabase(
                    f"{where} has schema version {found} and needs a migration to {S.SCHEMA_VERSION}: open it "
                    "once where it can be written (e.g. `interplab serve` on a writable copy)"
                )
            S.migrate(self.engine)
        self.sqlite = self.engine.dialect.name == "sqlite"
        self._checksums = "checksums" in S.inspect_database(self.engine)[1]  # absent before schema 3
        self._vocab: dict[int, str] | None = None

    def _probe(self, where: str, create: bool, read_only: bool) -> int:
        """Check an existing file read-only (a foreign database is refused before anything writes to it, even
        a journal-mode switch), then open ``self.engine`` on it; returns its schema version."""
        probe = sqlite_engine(self.file, read_only=True)
        immutable = False
        try:
            found = self._schema(probe, where, create)
        except OperationalError as err:
            if "unable to open" not in str(err):
                raise
            # a WAL database on a read-only filesystem: readable only as immutable (nobody can write it), which
            # ignores the WAL: refuse if the WAL holds changes not yet in the file
            wal = Path(f"{self.file}-wal")
            if not read_only or (wal.is_file() and wal.stat().st_size > 0):
                raise ReadOnlyDatabase(
                    f"{self.file} cannot be opened {'read-only' if read_only else 'for writing'}: the folder "
                    f"cannot be written{' and its write-ahead log holds changes not yet in the file' if read_only else ''}"
                    "; open it where it can be written"
                ) from None
            probe.dispose()
            probe = sqlite_engine(self.file, read_only=True, immutable=True)
            immutable = True
            found = self._schema(probe, where, create)
        finally:
            probe.dispose()
        self.engine = sqlite_engine(self.file, read_only=read_only, immutable=immutable)
        return found

    def _schema(self, engine: Engine, where: str, create: bool) -> int:
        """The schema version, refusing what is not an interplab feature database (0: empty, to create)."""
        try:
            found, tables, kind = S.inspect_database(engine)
        except DatabaseError as err:
            if isinstance(err, OperationalError):
                raise
            raise ValueError(
                f"{where} is not a feature database: not an SQLite database ({err.orig})"
            ) from None
        if kind not in (None, S.KIND) or (found == 0 and tables):
            what = (
                f"kind {kind!r}" if kind not in (None, S.KIND) else f"tables {', '.join(sorted(tables)[:5])}"
            )
            raise ValueError(
                f"{where} is not a feature database (no interplab schema; it has {what}): choose another path"
                + (", or overwrite it (--overwrite) to replace it" if create else "")
            )
        if found == 0 and not create:
            raise ValueError(f"{where} is not a feature database (no schema version)")
        return found

    def close(self) -> None:
        self.engine.dispose()

    def _write(self):
        """A write transaction (refused, naming the database, when it was opened read-only)."""
        if self.read_only:
            raise ReadOnlyDatabase(f"{self.file or self.url} is open read-only: it cannot be changed")
        return self.engine.begin()

    # ---- meta and vocabulary -------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        with self.engine.connect() as c:
            return {k: json.loads(v) for k, v in c.execute(select(S.meta.c.key, S.meta.c.value))}

    def set_meta(self, **values: Any) -> None:
        with self._write() as c:
            for k, v in values.items():
                c.execute(delete(S.meta).where(S.meta.c.key == k))
                c.execute(insert(S.meta).values(key=k, value=json.dumps(v, sort_keys=True)))

    def write_vocab(self, strings: list[str], counts: list[int]) -> None:
        with self._write() as c:
            c.execute(delete(S.vocab))
            rows = [
                {"token": i, "text": s, "count": int(n)}
                for i, (s, n) in enumerate(zip(strings, counts, strict=True))
            ]
            for start in range(0, len(rows), 5000):
                c.execute(insert(S.vocab), rows[start : start + 5000])
        self._vocab = None

    def vocab(self) -> dict[int, str]:
        if self._vocab is None:
            with self.engine.connect() as c:
                self._vocab = dict(c.execute(select(S.vocab.c.token, S.vocab.c.text)).all())
        return self._vocab

    def token_counts(self) -> dict[int, int]:
        with self.engine.connect() as c:
            return dict(c.execute(select(S.vocab.c.token, S.vocab.c.count)).all())

    def token_id(self, token: str) -> int | None:
        """The id of a token given as text (exact, then ignoring surrounding spaces) or as ``#123``."""
        vocab = self.vocab()
        if token.startswith("#") and token[1:].isdigit():
            return int(token[1:]) if int(token[1:]) in vocab else None
        for want in (token, token.strip()):
            for i, s in vocab.items():
                if s == want:
                    return i
        stripped = {i: s.strip() for i, s in vocab.items()}
        return next((i for i, s in stripped.items() if s == token.strip()), None)

    # ---- writing features ----------------------------------------------------------------------
    def write_features(self, rows: list[dict], context_rows: list[dict]) -> None:
        """Insert features and their contexts in one transaction (readers see all of it or none)."""
        with self._write() as c:
            ids = [r["feature"] for r in rows]
            if self.sqlite:  # external-content full-text index: remove the old rows' entries first
                c.execute(
                    text(
                        "INSERT INTO contexts_fts(contexts_fts, rowid, text) SELECT 'delete', id, text "
                        "FROM contexts WHERE text != '' AND feature IN (SELECT value FROM json_each(:ids))"
                    ),
                    {"ids": json.dumps(ids)},
                )
            c.execute(delete(S.contexts).where(S.contexts.c.feature.in_(ids)))
            c.execute(delete(S.features).where(S.features.c.feature.in_(ids)))
            c.execute(delete(S.checksums).where(S.checksums.c.feature.in_(ids)))
            if rows:
                c.execute(insert(S.features), rows)
                by_feature: dict[int, list[dict]] = {}
                for r in context_rows:
                    by_feature.setdefault(r["feature"], []).append(r)
                digests = [
                    {"feature": r["feature"], "sha256": S.row_digest(r, by_feature.get(r["feature"], []))}
                    for r in rows
                ]
                c.execute(insert(S.checksums), digests)
            if context_rows:
                first = c.execute(select(func.coalesce(func.max(S.contexts.c.id), 0))).scalar() + 1
                for i, r in enumerate(context_rows):
                    r["id"] = first + i
                if self.sqlite:  # the driver's executemany directly: this runs for every context
                    cols = [col.name for col in S.contexts.columns]
                    sql = f"INSERT INTO contexts ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
                    c.exec_driver_sql(sql, [tuple(r[k] for k in cols) for r in context_rows])
                    c.exec_driver_sql(
                        "INSERT INTO contexts_fts(rowid, text) VALUES (?, ?)",
                        [(r["id"], r["text"]) for r in context_rows if r["text"]],
                    )
                else:
                    c.execute(insert(S.contexts), context_rows)

    def mark_pass_done(self, first: int, last: int) -> None:
        with self._write() as c:
            c.execute(delete(S.passes).where(S.passes.c.first == first))
            c.execute(insert(S.passes).values(first=first, last=last))

    def passes_done(self) -> set[tuple[int, int]]:
        with self.engine.connect() as c:
            return {(a, b) for a, b in c.execute(select(S.passes.c.first, S.passes.c.last))}

    # ---- reading -------------------------------------------------------------------------------
    def n_features(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(S.features)).scalar())

    def feature(self, index: int) -> dict[str, Any]:
        """Everything about one feature: statistics, charts' data, contexts (top, then samples), label."""
        with self.engine.connect() as c:
            row = c.execute(select(S.features).where(S.features.c.feature == index)).mappings().first()
            if row is None:
                raise FeatureNotFound(index)
            ctx = (
                c.execute(
                    select(
                        S.contexts.c.kind,
                        S.contexts.c.rank,
                        S.contexts.c.token_index,
                        S.contexts.c.act,
                        S.contexts.c.tokens,
                        S.contexts.c.acts,
                        S.contexts.c.text,
                    )
                    .where(S.contexts.c.feature == index)
                    .order_by(S.contexts.c.kind, S.contexts.c.rank)
                )
                .mappings()
                .all()
            )
            label = c.execute(select(S.labels).where(S.labels.c.feature == index)).mappings().first()
            digest = (
                c.execute(select(S.checksums.c.sha256).where(S.checksums.c.feature == index)).scalar()
                if self._checksums
                else None
            )
        if digest is not None and S.row_digest(row, ctx) != digest:
            raise IntegrityError(
                f"{self.file or self.url}: feature {index} is corrupt (its stored values differ from the SHA-256 "
                "recorded when it was written); rebuild the database (interplab features build --overwrite)"
            )
        out = dict(row)
        for key in ("hist", "logits", "cooc"):
            out[key] = json.loads(out[key])
        contexts = [
            {
                **dict(r),
                "tokens": np.frombuffer(r["tokens"], "<i4").tolist(),
                "acts": np.round(np.frombuffer(r["acts"], "<f4").astype(np.float64), 4).tolist(),
            }
            for r in ctx
        ]
        out["top"] = [r for r in contexts if r["kind"] == 0]
        out["samples"] = [r for r in contexts if r["kind"] == 1]
        out["label"] = dict(label) if label is not None else None
        return out

    def neighbours(self, index: int) -> tuple[int | None, int | None]:
        """The previous and next feature in the database."""
        with self.engine.connect() as c:
            prev = c.execute(
                select(func.max(S.features.c.feature)).where(S.features.c.feature < index)
            ).scalar()
            nxt = c.execute(
                select(func.min(S.features.c.feature)).where(S.features.c.feature > index)
            ).scalar()
        return prev, nxt

    def random_feature(self, *, alive: bool = True, rng: random.Random | None = None) -> int | None:
        q = select(S.features.c.feature)
        if alive:
            q = q.where(S.features.c.n_fires > 0)
        with self.engine.connect() as c:
            n = c.execute(select(func.count()).select_from(q.subquery())).scalar()
            if not n:
                return None
            offset = (rng or random).randrange(n)
            return c.execute(q.order_by(S.features.c.feature).offset(offset).limit(1)).scalar()

    def list_features(self, *, order: str = "feature", limit: int = 50, offset: int = 0) -> list[dict]:
        """Summary rows; ``order`` in feature, density, -density, loss_effect, -loss_effect, max_act."""
        cols = {
            "feature": S.features.c.feature,
            "density": S.features.c.density,
            "loss_effect": S.features.c.loss_effect,
            "max_act": S.features.c.max_act,
        }
        name = order.lstrip("-")
        if name not in cols:
            raise ValueError(f"unknown order {order!r}; valid: {sorted(cols)} (prefix - for descending)")
        key = cols[name].desc() if order.startswith("-") else cols[name]
        with self.engine.connect() as c:
            q = (
                select(
                    S.features.c.feature,
                    S.features.c.density,
                    S.features.c.max_act,
                    S.features.c.loss_effect,
                    S.features.c.top_token,
                    S.labels.c.explanation,
                )
                .outerjoin(S.labels, S.labels.c.feature == S.features.c.feature)
                .order_by(key, S.features.c.feature)
                .limit(limit)
                .offset(offset)
            )
            return [dict(r) for r in c.execute(q).mappings()]

    def search_token(self, token: int, limit: int = 50) -> list[TokenHit]:
        """Features whose top contexts peak on ``token``, most often (then most strongly) first."""
        with self.engine.connect() as c:
            q = (
                select(S.contexts.c.feature, func.count().label("n"), func.max(S.contexts.c.act).label("m"))
                .where(S.contexts.c.center_token == token, S.contexts.c.kind == 0)
                .group_by(S.contexts.c.feature)
                .order_by(func.count().desc(), func.max(S.contexts.c.act).desc(), S.contexts.c.feature)
                .limit(limit)
            )
            return [TokenHit(int(f), int(n), float(m)) for f, n, m in c.execute(q)]

    def search_text(self, query: str, limit: int = 50) -> list[dict]:
        """Features whose explanation or top-context text matches ``query`` (full-text on SQLite).

        ``query`` is matched literally (``%``, ``_`` and quotes are plain characters; NUL is dropped); at
        most `MAX_QUERY` characters."""
        if len(query) > MAX_QUERY:
            raise ValueError(f"the search text has {len(query)} characters; at most {MAX_QUERY}")
        query = query.replace("\x00", "")
        if not query.strip():
            return []
        like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        hits: dict[int, dict] = {}
        with self.engine.connect() as c:
            for f, expl in c.execute(
                select(S.labels.c.feature, S.labels.c.explanation)
                .where(S.labels.c.explanation.ilike(like, escape="\\"))
                .limit(limit)
            ):
                hits[f] = {"feature": f, "where": "explanation", "text": expl}
            if self.sqlite:
                phrase = '"' + query.replace('"', '""') + '"'
                rows = c.execute(
                    text(
                        "SELECT c.feature, c.text FROM contexts_fts JOIN contexts c ON c.id = contexts_fts.rowid "
                        "WHERE contexts_fts MATCH :q ORDER BY contexts_fts.rank LIMIT :n"
                    ),
                    {"q": phrase, "n": limit * 4},
                )
            else:
                rows = c.execute(
                    select(S.contexts.c.feature, S.contexts.c.text)
                    .where(S.contexts.c.text.ilike(like, escape="\\"))
                    .limit(limit * 4)
                )
            for f, t in rows:
                hits.setdefault(f, {"feature": f, "where": "context", "text": t})
        return list(hits.values())[:limit]

    # ---- labels --------------------------------------------------------------------------------
    def set_label(
        self, feature: int, explanation: str, *, source: str = "human", score: float | None = None
    ) -> None:
        with self._write() as c:
            if c.execute(select(S.features.c.feature).where(S.features.c.feature == feature)).first() is None:
                raise FeatureNotFound(feature)
            c.execute(delete(S.labels).where(S.labels.c.feature == feature))
            if explanation.strip():
                c.execute(
                    insert(S.labels).values(
                        feature=feature, explanation=explanation.strip(), source=source, score=score
                    )
                )

    def labels(self, *, source: str | None = None) -> dict[int, dict]:
        q = select(S.labels)
        if source is not None:
            q = q.where(or_(S.labels.c.source == source, S.labels.c.source.like(f"{source}:%")))
        with self.engine.connect() as c:
            return {r["feature"]: dict(r) for r in c.execute(q).mappings()}

    def dump(self) -> dict[str, list[tuple]]:
        """Every row of every table, sorted (to compare two databases' contents)."""
        out = {}
        with self.engine.connect() as c:
            for table in S.metadata.sorted_tables:
                out[table.name] = sorted(tuple(r) for r in c.execute(select(table)))
        return out
