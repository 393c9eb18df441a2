"""Opening a feature database (a SQLite file or any SQLAlchemy URL): what `FeatureReader` and `FeatureWriter`
share. Read with a `FeatureReader` (opened read-only), build and label with a `FeatureWriter`.

A path is always a path: a file is opened through a percent-encoded ``file:`` URI (`sqlite_uri`), so a name
with ``?``, ``#`` or ``%`` is a name; only ``scheme://...`` strings are URLs. An existing file is first checked
read-only, so a foreign database is refused before anything writes to it (not even a journal-mode switch).

>>> from interplab.features.reader import FeatureReader
>>> reader = FeatureReader("features.db")
"""

from __future__ import annotations

import json
import re
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.pool import QueuePool

from interplab.features import dialect as D
from interplab.features import schema as S

_D = TypeVar("_D", bound="FeatureDatabase")


class ReadOnlyDatabase(PermissionError):
    """A feature database that cannot be written (or needs a write first, e.g. a migration)."""


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path_or_url: str | Path) -> bool:
    """True for a SQLAlchemy URL (``scheme://...``); a `Path`, or any other string, is a file path."""
    return not isinstance(path_or_url, Path) and bool(_URL.match(str(path_or_url)))


def database_file(path_or_url: str | Path) -> Path | None:
    """The resolved file of a path (None for a URL)."""
    return None if is_url(path_or_url) else Path(path_or_url).expanduser().resolve()


def database_url(path_or_url: str | Path) -> str:
    """A display URL (the engine of a file is built from its path, never by parsing this)."""
    return str(path_or_url) if is_url(path_or_url) else f"sqlite:///{Path(path_or_url).resolve()}"


def database_link(path_or_url: str | Path) -> str:
    """How a run records a feature database it links to (an attribution graph's ``feature_db``): a file's
    absolute path, or the URL with its password left out (the link is written into the run folder and shown on
    pages; the web app opens a database by its own ``--db``, never by a link)."""
    return D.display_url(str(path_or_url)) if is_url(path_or_url) else str(Path(path_or_url).absolute())


def database_key(path_or_url: str | Path) -> Path | str:
    """What tells two names of one database apart from two databases, to match a link with a served
    database: a file's resolved path (a ``sqlite:///FILE`` URL names its file), else the URL without its
    password (`database_link`).

    >>> database_key("sqlite:////tmp/f.db") == database_key("/tmp/f.db")
    True
    """
    if not is_url(path_or_url):
        return Path(path_or_url).expanduser().resolve()
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(str(path_or_url))
    except ArgumentError:
        return str(path_or_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).expanduser().resolve()
    return database_link(path_or_url)


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


class FeatureDatabase:
    """One open feature database: where it is, its engine, and the reads both sides need (meta, vocabulary,
    finished passes, feature count). Abstract: open a `FeatureReader` or a `FeatureWriter`.

    ``create=True`` (writers only) makes an empty database; otherwise it must already exist. Returns with
    ``self.engine`` open and ``self.found`` the schema version the database had (0: new)."""

    read_only: ClassVar[bool]

    def __init__(self, path_or_url: str | Path, *, create: bool = False) -> None:
        self.source = path_or_url
        """the path or URL as given (to open the same database again)"""
        self.url = database_url(path_or_url)
        self.file = database_file(path_or_url)
        self.where = str(self.file or path_or_url)
        """how error messages name the database"""
        if self.file is not None:
            if self.file.exists() and not self.file.is_file():
                raise ValueError(f"{self.file} is not a file: give the path of a feature database file")
            if not create and not self.file.is_file():
                raise FileNotFoundError(
                    f"no feature database at {self.file} (build one with `interplab features build`)"
                )
            if self.file.is_file():
                self.found = self._probe(self.file, create)
            else:  # create=True: a new file, in a folder made for it if need be
                self.file.parent.mkdir(parents=True, exist_ok=True)
                self.found, self.engine = 0, sqlite_engine(self.file)
        else:
            self.where = D.display_url(str(path_or_url))
            self.engine = create_engine(D.engine_url(self.url), pool_pre_ping=True)
            S.install_pragmas(self.engine, read_only=self.read_only)
            try:
                self.found = self._schema(self.engine, create)
            except OperationalError as err:
                self.engine.dispose()
                raise ConnectionError(
                    f"cannot open the feature database {self.where}: {str(err.orig).strip()}"
                ) from None
        self.sqlite = self.engine.dialect.name == "sqlite"
        self._vocab: dict[int, str] | None = None

    def _probe(self, file: Path, create: bool) -> int:
        """Check an existing file read-only (a foreign database is refused before anything writes to it, even
        a journal-mode switch), then open ``self.engine`` on it; returns its schema version."""
        probe = sqlite_engine(file, read_only=True)
        immutable = False
        try:
            found = self._schema(probe, create)
        except OperationalError as err:
            if "unable to open" not in str(err):
                raise
            # a WAL database on a read-only filesystem: readable only as immutable (nobody can write it), which
            # ignores the WAL: refuse if the WAL holds changes not yet in the file
            wal = Path(f"{file}-wal")
            changes = wal.is_file() and wal.stat().st_size > 0
            if not self.read_only or changes:
                raise ReadOnlyDatabase(
                    f"{file} cannot be opened {'read-only' if self.read_only else 'for writing'}: the "
                    f"folder cannot be written{' and its write-ahead log holds changes not yet in the file' if self.read_only else ''}"
                    "; open it where it can be written"
                ) from None
            probe.dispose()
            probe = sqlite_engine(file, read_only=True, immutable=True)
            immutable = True
            found = self._schema(probe, create)
        finally:
            probe.dispose()
        self.engine = sqlite_engine(file, read_only=self.read_only, immutable=immutable)
        return found

    def _schema(self, engine: Engine, create: bool) -> int:
        """The schema version, refusing what is not an interplab feature database (0: empty, to create)."""
        try:
            found, tables, kind = S.inspect_database(engine)
        except DatabaseError as err:
            if isinstance(err, OperationalError):
                raise
            raise ValueError(
                f"{self.where} is not a feature database: not an SQLite database ({err.orig})"
            ) from None
        if not S.is_our_kind(kind) or (found == 0 and tables):
            what = f"kind {kind!r}" if not S.is_our_kind(kind) else f"tables {', '.join(sorted(tables)[:5])}"
            raise ValueError(
                f"{self.where} is not a feature database (no interplab schema; it has {what}): choose another "
                "path" + (", or overwrite it (--overwrite) to replace it" if create else "")
            )
        if found == 0 and not create:
            raise ValueError(f"{self.where} is not a feature database (no schema version)")
        return found

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self: _D) -> _D:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where!r})"

    # ---- what readers and writers both read ------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        with self.engine.connect() as c:
            return {k: json.loads(v) for k, v in c.execute(select(S.meta.c.key, S.meta.c.value))}

    def vocab(self) -> dict[int, str]:
        """Token id -> text (read once, then kept)."""
        if self._vocab is None:
            with self.engine.connect() as c:
                self._vocab = dict(c.execute(select(S.vocab.c.token, S.vocab.c.text)).all())
        return self._vocab

    def n_features(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(S.features)).scalar_one())

    def passes_done(self) -> set[tuple[int, int]]:
        """The feature ranges ``(first, last)`` whose build pass finished."""
        with self.engine.connect() as c:
            return {(a, b) for a, b in c.execute(select(S.passes.c.first, S.passes.c.last))}
