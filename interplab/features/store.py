"""`FeatureStore`: reads and writes the feature database (SQLite file or any SQLAlchemy URL).

>>> store = FeatureStore("features.db")          # doctest: +SKIP
>>> store.feature(12)["contexts"][0]["text"]      # doctest: +SKIP
>>> store.search_token(store.token_id("import"))  # which features fire on `import`?  # doctest: +SKIP
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, delete, func, insert, or_, select, text

from interplab.features import schema as S

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


def database_url(path_or_url: str | Path) -> str:
    s = str(path_or_url)
    return s if "://" in s else f"sqlite:///{Path(s).resolve()}"


class FeatureStore:
    """One feature database. ``create=True`` makes (or migrates) it; otherwise it must already exist."""

    def __init__(self, path_or_url: str | Path, *, create: bool = False) -> None:
        self.url = database_url(path_or_url)
        if self.url.startswith("sqlite:///") and not create:
            file = Path(self.url.removeprefix("sqlite:///"))
            if not file.is_file():
                raise FileNotFoundError(
                    f"no feature database at {file} (build one with `interplab features build`)"
                )
        self.engine = create_engine(self.url)
        S.install_pragmas(self.engine)
        if create:
            S.migrate(self.engine)
        else:
            found = S.schema_version(self.engine)
            if found == 0:
                raise ValueError(f"{path_or_url} is not a feature database (no schema version)")
            if found < S.SCHEMA_VERSION:
                S.migrate(self.engine)
        self.sqlite = self.engine.dialect.name == "sqlite"
        self._vocab: dict[int, str] | None = None

    def close(self) -> None:
        self.engine.dispose()

    # ---- meta and vocabulary -------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        with self.engine.connect() as c:
            return {k: json.loads(v) for k, v in c.execute(select(S.meta.c.key, S.meta.c.value))}

    def set_meta(self, **values: Any) -> None:
        with self.engine.begin() as c:
            for k, v in values.items():
                c.execute(delete(S.meta).where(S.meta.c.key == k))
                c.execute(insert(S.meta).values(key=k, value=json.dumps(v, sort_keys=True)))

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
        with self.engine.begin() as c:
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
            if rows:
                c.execute(insert(S.features), rows)
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
        with self.engine.begin() as c:
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
        with self.engine.begin() as c:
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
