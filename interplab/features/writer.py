"""`FeatureWriter`: the one thing that writes a feature database: a build (created, resumed or replaced:
`FeatureWriter.for_build`) and labels.

Every write is one transaction, so a reader (the web app, during a build) sees all of a chunk of features or
none of it. Opening an existing database for writing migrates an older schema (`schema.migrate`).

>>> with FeatureWriter("features.db") as db:
...     db.set_label(12, "opening brackets of calls")
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, delete, func, insert, inspect, select
from sqlalchemy.exc import IntegrityError, OperationalError

from interplab.features import dialect as D
from interplab.features import schema as S
from interplab.features.database import FeatureDatabase, ReadOnlyDatabase, database_file, is_url
from interplab.features.packed import (
    ContextArrays,
    delete_features,
    fts_entries,
    upgrade_contexts,
    write_blocks,
)
from interplab.features.reader import FeatureNotFound, FeatureReader

STATE_SUFFIX = ".build"
"""the folder next to a database file where an unfinished build keeps its streaming state (``<db>.build/``)"""
URL_STATE_DIR = ".interplab-feature-build"
"""the same folder for a database given as a URL (in the working directory)"""
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
"""the files SQLite keeps next to a database (a stale WAL must not meet a new file of the same name)"""


def state_dir(path_or_url: str | Path) -> Path:
    """Where an unfinished build of the database at ``path_or_url`` keeps its streaming state: beside a file;
    for a URL, a folder of its own (named by the URL, its password left out) under `URL_STATE_DIR` in the
    working directory, so builds of two databases never share one."""
    if not is_url(path_or_url):
        return Path(f"{path_or_url}{STATE_SUFFIX}")
    shown = D.display_url(str(path_or_url))
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", shown.split("://", 1)[-1].split("?", 1)[0]).strip("_")[:80]
    return Path(URL_STATE_DIR) / f"{slug}-{hashlib.sha256(shown.encode()).hexdigest()[:8]}"


class FeatureWriter(FeatureDatabase):
    """One feature database, opened for writing: ``create=True`` makes it (or opens it to resume a build),
    otherwise it must exist. A foreign database is refused (`FeatureDatabase`)."""

    read_only = False

    def __init__(self, path_or_url: str | Path, *, create: bool = False) -> None:
        file = database_file(path_or_url)
        if file is not None and file.is_file() and not _writable(file):
            raise ReadOnlyDatabase(
                f"{file} cannot be written (the file or its folder is read-only): read it with a FeatureReader "
                "(`interplab serve` does), or copy it where it can be written"
            )
        super().__init__(path_or_url, create=create)
        if self.found and not self.sqlite:
            with self.engine.connect() as c:
                if not D.may_write(c, S.labels.name if self.found >= 2 else S.meta.name):
                    user = c.execute(select(func.current_user())).scalar()
                    self.close()
                    raise ReadOnlyDatabase(
                        f"{self.where} cannot be written: the role {user!r} may only read it (read it with a "
                        "FeatureReader, as `interplab serve` does, or connect as a role that may write)"
                    )
        if create or self.found < S.SCHEMA_VERSION:
            S.migrate(self.engine)

    @classmethod
    def for_build(cls, path_or_url: str | Path, *, overwrite: bool = False) -> FeatureWriter:
        """The database a build writes into: created, or opened as it is to resume; with ``overwrite``,
        what was there is replaced (a file with its SQLite side files, and the unfinished build's state)."""
        if overwrite:
            if not is_url(path_or_url):
                for suffix in ("", *SQLITE_SIDE_FILES):
                    Path(f"{path_or_url}{suffix}").unlink(missing_ok=True)
            else:
                cls(path_or_url, create=True).drop_tables()
            shutil.rmtree(state_dir(path_or_url), ignore_errors=True)
        return cls(path_or_url, create=True)

    def drop_tables(self) -> None:
        """Drop this feature database's tables (a URL's database itself, and any other table in it, stay)."""
        with self.engine.begin() as c:
            present = set(inspect(c).get_table_names())
            D.fts_drop(c)
            for table in [*reversed(S.metadata.sorted_tables), *S.legacy_metadata.sorted_tables]:
                if table.name in present:
                    table.drop(c)
        self.close()

    def reader(self) -> FeatureReader:
        """A reader of the same database (opened read-only, as every reader is)."""
        return FeatureReader(self.source)

    @property
    def state_dir(self) -> Path:
        """Where this build keeps its streaming state until it finishes (`finish_build` removes it)."""
        return state_dir(self.source)

    # ---- the build -------------------------------------------------------------------------------
    def set_meta(self, **values: Any) -> None:
        with self.engine.begin() as c:
            for k, v in values.items():
                D.upsert(c, S.meta, {"key": k, "value": json.dumps(v, sort_keys=True)}, ["key"])

    def write_vocab(self, strings: list[str], counts: list[int]) -> None:
        with self.engine.begin() as c:
            c.execute(delete(S.vocab))
            rows = [
                {"token": i, "text": s, "count": int(n)}
                for i, (s, n) in enumerate(zip(strings, counts, strict=True))
            ]
            for start in range(0, len(rows), 5000):
                c.execute(insert(S.vocab), rows[start : start + 5000])
        self._vocab = None

    def write_features(self, rows: list[dict], context_rows: list[dict] | ContextArrays) -> None:
        """Insert (or replace) features and their contexts (dicts of `schema.CONTEXT_COLUMNS`, or
        `packed.ContextArrays` as a build makes them) in one transaction (readers see all of it or none)."""
        ctx = (
            context_rows if isinstance(context_rows, ContextArrays) else ContextArrays.from_rows(context_rows)
        )
        with self.engine.begin() as c:
            delete_features(c, [int(r["feature"]) for r in rows])
            write_blocks(c, rows, ctx)

    def write_dt_rows(self, rows: list[dict]) -> None:
        """Record where each row of a decision transformer's trajectory cache comes from (`schema.dt_rows`:
        the table is created here, so only such databases have it); replaces what was there."""
        with self.engine.begin() as c:
            D.ensure_tables(c, S.dt_rows)
            c.execute(delete(S.dt_rows))
            for start in range(0, len(rows), 5000):
                c.execute(insert(S.dt_rows), rows[start : start + 5000])

    def write_context_loss(self, losses: dict[int, np.ndarray]) -> None:
        """Store per-token loss effects by context id (`schema.context_loss`, created here); replaces those
        ids' rows."""
        with self.engine.begin() as c:
            D.ensure_tables(c, S.context_loss)
            ids = [int(i) for i in losses]
            for lo in range(0, len(ids), 500):
                c.execute(delete(S.context_loss).where(S.context_loss.c.context_id.in_(ids[lo : lo + 500])))
            rows = [{"context_id": int(i), "loss": np.asarray(v, "<f4").tobytes()} for i, v in losses.items()]
            if rows:
                c.execute(insert(S.context_loss), rows)

    def mark_pass_done(self, first: int, last: int) -> None:
        with self.engine.begin() as c:
            D.upsert(c, S.passes, {"first": first, "last": last}, ["first"])

    def finish_build(self) -> None:
        """Mark the build complete and remove its streaming state."""
        self.set_meta(status="complete")
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # ---- labels --------------------------------------------------------------------------------
    def set_label(
        self, feature: int, explanation: str, *, source: str = "human", score: float | None = None
    ) -> None:
        """Set (or, with an empty ``explanation``, remove) the label of ``feature``."""
        with self.engine.begin() as c:
            if c.execute(select(S.features.c.feature).where(S.features.c.feature == feature)).first() is None:
                raise FeatureNotFound(feature)
            if explanation.strip():
                row = {
                    "feature": feature,
                    "explanation": explanation.strip(),
                    "source": source,
                    "score": score,
                }
                D.upsert(c, S.labels, row, ["feature"])
            else:
                c.execute(delete(S.labels).where(S.labels.c.feature == feature))

    # ---- explanations and the LLM cache (optional tables: created by the first write) -----------------------
    def add_explanation(
        self,
        feature: int,
        text: str,
        *,
        explainer: str,
        backend: str,
        prompt_version: str,
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Store one explanation of ``feature`` (each is kept: a feature may have several, by explainer,
        backend and prompt version) and return its id; committed at once, so an interrupted run keeps it."""
        if not text.strip():
            raise ValueError(f"the explanation of feature {feature} is empty")
        with self.engine.begin() as c:
            if c.execute(select(S.features.c.feature).where(S.features.c.feature == feature)).first() is None:
                raise FeatureNotFound(feature)
            D.ensure_tables(c, S.explanations)
            row = {
                "feature": int(feature),
                "text": text.strip(),
                "explainer": explainer,
                "backend": backend,
                "prompt_version": prompt_version,
                "created": time.time(),
                "meta": json.dumps(meta or {}, sort_keys=True),
            }
            key = c.execute(insert(S.explanations).values(**row)).inserted_primary_key
            assert key is not None  # an insert always has one
            return int(key[0])

    def cached_response(self, key: str) -> str | None:
        """The response stored in ``llm_cache`` under ``key`` (None: not cached)."""
        if not S.has_table(self.engine, S.llm_cache):
            return None
        with self.engine.connect() as c:
            return c.execute(select(S.llm_cache.c.response).where(S.llm_cache.c.key == key)).scalar()

    def cache_response(self, key: str, request: str, response: str) -> None:
        """Store an LLM response under ``key`` (replacing one already there)."""
        with self.engine.begin() as c:
            D.ensure_tables(c, S.llm_cache)
            row = {"key": key, "request": request, "response": response, "created": time.time()}
            D.upsert(c, S.llm_cache, row, ["key"])

    def add_score(
        self,
        explanation_id: int,
        scorer: str,
        value: float,
        *,
        n: int,
        details: dict | None,
        backend: str,
        prompt_version: str,
        seed: int,
    ) -> int:
        """Store (or replace) the score of one explanation by one scorer, backend, prompt version and seed
        (`schema.explanation_scores`, created here); returns its id. NaN is stored as NULL."""
        row = dict(
            explanation_id=explanation_id, scorer=scorer, value=value, n=n, details=details, backend=backend,
            prompt_version=prompt_version, seed=seed,
        )  # fmt: skip
        return self.add_scores([row])[0]

    def add_scores(self, rows: Sequence[dict]) -> list[int]:
        """`add_score` for many scores (dicts of its arguments) in one transaction; their ids, in order."""
        if not rows:
            return []
        ids = []
        with self.engine.begin() as c:
            D.ensure_tables(c, S.explanation_scores)
            col = S.explanation_scores.c
            if S.has_table(self.engine, S.explanations):
                wanted = sorted({int(r["explanation_id"]) for r in rows})
                known = {
                    int(i)
                    for lo in range(0, len(wanted), 500)
                    for (i,) in c.execute(
                        select(S.explanations.c.id).where(S.explanations.c.id.in_(wanted[lo : lo + 500]))
                    )
                }
                missing = [i for i in wanted if i not in known]
                if missing:
                    raise KeyError(f"no explanation with id {missing[0]} in {self.where}")
            for r in rows:
                value = float(r["value"])
                key = (
                    col.explanation_id == r["explanation_id"],
                    col.scorer == r["scorer"],
                    col.backend == r["backend"],
                    col.prompt_version == r["prompt_version"],
                    col.seed == r["seed"],
                )
                c.execute(delete(S.explanation_scores).where(*key))
                res = c.execute(
                    insert(S.explanation_scores).values(
                        explanation_id=r["explanation_id"],
                        scorer=r["scorer"],
                        value=None if math.isnan(value) else value,
                        n=int(r["n"]),
                        details=json.dumps(r.get("details") or {}, sort_keys=True),
                        backend=r["backend"],
                        prompt_version=r["prompt_version"],
                        seed=int(r["seed"]),
                        created=time.time(),
                    )
                )
                new = res.inserted_primary_key
                assert new is not None  # an insert always has one
                ids.append(int(new[0]))
        return ids

    # ---- feature lists (`schema.feature_lists`: created by the first list) ----------------------------
    def create_list(self, name: str, description: str = "") -> int:
        """A new, empty list; its id. Names are unique (1..200 characters)."""
        name = name.strip()
        if not 0 < len(name) <= 200:
            raise ValueError(f"a list name has 1..200 characters, not {len(name)}")
        try:
            with self.engine.begin() as c:
                D.ensure_tables(c, S.feature_lists, S.feature_list_items)
                if c.execute(select(S.feature_lists.c.id).where(S.feature_lists.c.name == name)).first():
                    raise ValueError(f"a list named {name!r} exists already")
                row = {"name": name, "description": description.strip(), "created": time.time()}
                key = c.execute(insert(S.feature_lists).values(**row)).inserted_primary_key
        except IntegrityError:  # another writer made one of that name since the check
            raise ValueError(f"a list named {name!r} exists already") from None
        if key is None:  # every dialect SQLAlchemy supports reports it for an autoincrement key
            raise RuntimeError(f"the database did not report the new list's id ({self.where})")
        return int(key[0])

    def _list_items(self, c: Connection, list_id: int) -> list[int]:
        if not S.has_table(self.engine, S.feature_lists) or (  # locked until the transaction ends
            c.execute(
                D.lock_row(select(S.feature_lists.c.id).where(S.feature_lists.c.id == list_id), c)
            ).first()
            is None
        ):
            raise KeyError(f"no feature list with id {list_id}")
        items = S.feature_list_items
        q = (
            select(items.c.feature)
            .where(items.c.list_id == list_id)
            .order_by(items.c.position, items.c.feature)
        )
        return [int(f) for f in c.execute(q).scalars()]

    def delete_list(self, list_id: int) -> None:
        with self.engine.begin() as c:
            self._list_items(c, list_id)
            c.execute(delete(S.feature_list_items).where(S.feature_list_items.c.list_id == list_id))
            c.execute(delete(S.feature_lists).where(S.feature_lists.c.id == list_id))

    def add_to_list(self, list_id: int, feature: int, note: str = "") -> None:
        """Append ``feature`` to the list (or, when it is there, replace its note; it keeps its place)."""
        with self.engine.begin() as c:
            present = self._list_items(c, list_id)
            if c.execute(select(S.features.c.feature).where(S.features.c.feature == feature)).first() is None:
                raise FeatureNotFound(feature)
            items = S.feature_list_items
            where = (items.c.list_id == list_id) & (items.c.feature == feature)
            if feature in present:
                c.execute(items.update().where(where).values(note=note.strip()))
            else:
                row = {"list_id": list_id, "feature": feature, "note": note.strip(), "position": len(present)}
                c.execute(insert(items).values(**row))

    def remove_from_list(self, list_id: int, feature: int) -> None:
        with self.engine.begin() as c:
            present = self._list_items(c, list_id)
            if feature not in present:
                raise KeyError(f"feature {feature} is not in list {list_id}")
            items = S.feature_list_items
            c.execute(delete(items).where((items.c.list_id == list_id) & (items.c.feature == feature)))
            self._renumber(c, list_id, [f for f in present if f != feature])

    def reorder_list(self, list_id: int, order: list[int]) -> None:
        """Put the list's items in ``order``, which must hold each of them exactly once."""
        with self.engine.begin() as c:
            present = self._list_items(c, list_id)
            if sorted(order) != sorted(present):
                raise ValueError(
                    f"the new order {order} must hold each of the list's features {present} once"
                )
            self._renumber(c, list_id, order)

    def _renumber(self, c: Connection, list_id: int, order: list[int]) -> None:
        items = S.feature_list_items
        for pos, f in enumerate(order):
            c.execute(
                items.update()
                .where((items.c.list_id == list_id) & (items.c.feature == f))
                .values(position=pos)
            )


def copy_database(
    source: str | Path, target: str | Path, *, overwrite: bool = False, chunk: int = 5000
) -> dict[str, int]:
    """Copy the feature database at ``source`` into ``target`` (any backend into any: e.g. a SQLite file into
    the lab's PostgreSQL database), every table row for row, its full-text index rebuilt; ``target`` must be
    new or empty (``overwrite``: replaced). Returns the rows copied per table. One transaction: on an error
    the target keeps nothing of it."""
    counts: dict[str, int] = {}
    with FeatureReader(source) as src, FeatureWriter.for_build(target, overwrite=overwrite) as dst:
        if dst.n_features() or "fingerprint" in dst.meta():
            raise ValueError(
                f"{dst.where} already holds a feature database: pass overwrite=True (--overwrite)"
            )
        packed = src.found >= 4  # else its contexts are converted (`packed.upgrade_contexts`), with these:
        converted = (S.features, S.checksums, S.context_loss)
        with src.engine.connect() as rc, dst.engine.begin() as wc:
            for table in S.metadata.sorted_tables:
                if not S.has_table(src.engine, table) or (not packed and table in converted):
                    continue
                D.ensure_tables(wc, table)
                q = select(table).order_by(*table.primary_key.columns)
                counts[table.name] = 0
                for part in rc.execution_options(yield_per=chunk).execute(q).mappings().partitions():
                    rows = [dict(r) for r in part]
                    if table is S.meta:  # the target's own schema version and kind stay
                        for r in rows:
                            if r["key"] not in ("schema_version", "kind"):
                                D.upsert(wc, S.meta, r, ["key"])
                    else:
                        wc.execute(insert(table), rows)
                    if table is S.context_blocks:
                        D.fts_index(wc, *fts_entries(rows))
                    counts[table.name] += len(rows)
                D.reset_sequence(wc, table)
            if not packed:
                upgrade_contexts(rc, wc)
                counts[S.features.name] = int(
                    wc.execute(select(func.count()).select_from(S.features)).scalar_one()
                )
    return counts


def _writable(file: Path) -> bool:
    return os.access(file, os.W_OK) and os.access(file.parent, os.W_OK)  # the folder: for the WAL and journal


def label_writer(path_or_url: str | Path, *, read_only: bool | None = None) -> FeatureWriter | None:
    """A writer for label edits on an existing database: where it can be written (``read_only=None``), or
    as asked (``False``: always, ``True``: never); None when there is none. Opening one migrates an older
    schema, so open it before a `FeatureReader` of the same database."""
    if read_only:
        return None
    try:
        return FeatureWriter(path_or_url)
    except ReadOnlyDatabase:
        if read_only is None:
            return None
        raise
    except OperationalError as err:  # e.g. a read-only filesystem that os.access does not know about
        if read_only is not None or ("readonly" not in str(err) and "unable to open" not in str(err)):
            raise
        return None
