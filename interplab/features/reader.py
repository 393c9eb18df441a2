"""`FeatureReader`: reads a feature database (SQLite file or any SQLAlchemy URL), opened read-only.

The web app, export, steering and explanations read through it; it has no method that writes, and a SQLite
file is opened with ``mode=ro`` (SQLite itself refuses writes). `FeatureWriter` builds and labels.

>>> store = FeatureReader("features.db")
>>> rec = store.feature(12)     # statistics, histogram, top logits, contexts ("top", then "samples"), label
>>> rec["density"] > 0, len(rec["top"]) > 0
(True, True)
>>> hits = store.search_token(store.token_id("#7"))  # which features peak on token 7?
"""

from __future__ import annotations

import json
import random
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, or_, select

from interplab.features import dialect as D
from interplab.features import packed as P
from interplab.features import schema as S
from interplab.features.database import FeatureDatabase, ReadOnlyDatabase
from interplab.integrity import IntegrityError

MAX_QUERY = 1000
"""the longest text `FeatureReader.search_text` accepts (SQLite refuses LIKE patterns over 50,000 bytes)"""


class FeatureNotFound(KeyError):
    """The feature index is not in the database (out of range, or not built yet)."""


def check_features_exist(store: FeatureReader, features: Iterable[int]) -> list[int]:
    """``features`` as a list without repeats, refused with a `ValueError` naming those the database holds no
    row for (out of its range, or in a build pass not run yet) and what it holds: an explicit feature list is
    never silently cut (`explain_features`, `interplab.features.scorers.score_features`)."""
    wanted = list(dict.fromkeys(int(f) for f in features))
    with store.engine.connect() as c:
        have = {int(f) for (f,) in c.execute(select(S.features.c.feature))}
    missing = [f for f in wanted if f not in have]
    if missing:
        raise ValueError(
            f"feature{'s' * (len(missing) > 1)} {_ranges(sorted(missing))} not in the database, which holds "
            f"{len(have)} feature{'s' * (len(have) != 1)}" + (f" ({_ranges(sorted(have))})" if have else "")
        )
    return wanted


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``"0-2, 5, 7-8"``."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


@dataclass(frozen=True)
class TokenHit:
    """A feature whose top contexts peak on a given token."""

    feature: int
    count: int
    max_act: float


class FeatureReader(FeatureDatabase):
    """One feature database, read-only: statistics, contexts, search, labels. Schemas older than
    `schema.READABLE_FROM` need a migration, i.e. a write: open them once with a `FeatureWriter`."""

    read_only = True

    def __init__(self, path_or_url: str | Path) -> None:
        super().__init__(path_or_url)
        if self.found < S.READABLE_FROM:
            raise ReadOnlyDatabase(
                f"{self.where} has schema version {self.found} and needs a migration to {S.SCHEMA_VERSION}: "
                "open it once where it can be written (e.g. `interplab serve` on a writable copy)"
            )
        # what a newer schema adds (checksums) is simply absent from an older one
        self._checksums = "checksums" in S.inspect_database(self.engine)[1]
        self._packed = self.found >= 4  # contexts in `schema.context_blocks` (before: one row each)

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

    # ---- reading -------------------------------------------------------------------------------
    def feature(self, index: int) -> dict[str, Any]:
        """Everything about one feature: statistics, charts' data, contexts (top, then samples), label."""
        with self.engine.connect() as c:
            row = c.execute(select(S.features).where(S.features.c.feature == index)).mappings().first()
            if row is None:
                raise FeatureNotFound(index)
            ctx: Sequence[Mapping[Any, Any]]
            blocks: Sequence[Mapping[Any, Any]] = []
            if self._packed:
                blocks = (
                    c.execute(select(S.context_blocks).where(S.context_blocks.c.feature == index))
                    .mappings()
                    .all()
                )
                ctx = [r for b in sorted(blocks, key=lambda b: b["kind"]) for r in P.unpack(b)]
            else:
                legacy = S.legacy_contexts
                columns = [legacy.c[name] for name in S.CONTEXT_DIGEST_COLUMNS]  # what the digest covers
                ctx = (
                    c.execute(
                        select(*columns)
                        .where(legacy.c.feature == index)
                        .order_by(legacy.c.kind, legacy.c.rank)
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
        if (
            digest is not None
            and (P.block_digest(row, blocks) if self._packed else S.row_digest(row, ctx)) != digest
        ):
            raise IntegrityError(
                f"{self.file or self.url}: feature {index} is corrupt (its stored values differ from the SHA-256 "
                "recorded when it was written); rebuild the database (interplab features build --overwrite)"
            )
        out = dict(row)
        for key in ("hist", "logits", "cooc"):
            out[key] = json.loads(out[key])
        contexts = [
            {
                **{name: r[name] for name in S.CONTEXT_DIGEST_COLUMNS},
                "tokens": np.frombuffer(r["tokens"], "<i4").tolist(),
                "acts": np.round(np.frombuffer(r["acts"], "<f4").astype(np.float64), 4).tolist(),
            }
            for r in ctx
        ]
        out["top"] = [r for r in contexts if r["kind"] == 0]
        out["samples"] = [r for r in contexts if r["kind"] == 1]
        out["label"] = dict(label) if label is not None else None
        return out

    def contexts(
        self, features: Iterable[int] | None = None, kinds: Iterable[int] = (0, 1)
    ) -> Generator[dict, None, None]:
        """Every stored context of ``features`` (None: all) and ``kinds``, by feature, kind and rank, as
        version 3 stored them: ``id`` (`packed.context_id` from version 4 on), ``feature``, ``kind``, ``rank``,
        ``token_index``, ``act``, ``center_token``, ``tokens`` and ``acts`` (bytes), ``text``. Not verified
        against the checksums (`feature` does that)."""
        wanted = None if features is None else sorted({int(f) for f in features})
        parts = [None] if wanted is None else [wanted[lo : lo + 500] for lo in range(0, len(wanted), 500)]
        kinds = [int(k) for k in kinds]
        with self.engine.connect() as c:
            for part in parts:
                if self._packed:
                    t = S.context_blocks
                    q = select(t).where(t.c.kind.in_(kinds)).order_by(t.c.feature, t.c.kind)
                    if part is not None:
                        q = q.where(t.c.feature.in_(part))
                    for b in c.execute(q).mappings():
                        f = int(b["feature"])
                        for r in P.unpack(b):
                            yield {"id": int(P.context_id(f, r["kind"], r["rank"])), "feature": f, **r}
                else:
                    t = S.legacy_contexts
                    q = select(t).where(t.c.kind.in_(kinds)).order_by(t.c.feature, t.c.kind, t.c.rank)
                    if part is not None:
                        q = q.where(t.c.feature.in_(part))
                    yield from (dict(r) for r in c.execute(q).mappings())

    def dt_rows(self, token_indices: Iterable[int]) -> dict[int, dict[str, Any]]:
        """A decision transformer's database (`schema.dt_rows`): where each of ``token_indices`` (contexts'
        ``token_index``) comes from: ``episode``, ``step``, ``flat_step``, ``token_kind``, ``action``,
        ``rtg``. Empty for a language model's database (it has no such table)."""
        wanted = sorted({int(i) for i in token_indices})
        if not wanted or not S.has_table(self.engine, S.dt_rows):
            return {}
        out: dict[int, dict[str, Any]] = {}
        with self.engine.connect() as c:
            for lo in range(0, len(wanted), 500):
                q = select(S.dt_rows).where(S.dt_rows.c.token_index.in_(wanted[lo : lo + 500]))
                out.update({int(r["token_index"]): dict(r) for r in c.execute(q).mappings()})
        return out

    def context_loss(self, index: int) -> dict[tuple[int, int], list[float | None]]:
        """Feature ``index``'s per-token loss effects (`schema.context_loss`, written by
        `interplab.features.loss_effects`) by (kind, rank) of its contexts; None where not computed. Empty
        when the database has none."""
        if not S.has_table(self.engine, S.context_loss):
            return {}
        if self._packed:
            lo, hi = P.feature_id_range(index)
            loss = S.context_loss.c
            with self.engine.connect() as c:
                found = [
                    (*P.split_context_id(int(i))[1:], b)
                    for i, b in c.execute(
                        select(loss.context_id, loss.loss).where(loss.context_id >= lo, loss.context_id < hi)
                    )
                ]
        else:
            legacy = S.legacy_contexts
            q = (
                select(legacy.c.kind, legacy.c.rank, S.context_loss.c.loss)
                .join(S.context_loss, S.context_loss.c.context_id == legacy.c.id)
                .where(legacy.c.feature == index)
            )
            with self.engine.connect() as c:
                found = list(c.execute(q))
        return {
            (int(k), int(r)): [None if v != v else round(float(v), 5) for v in np.frombuffer(b, "<f4")]
            for k, r, b in found
        }

    def feature_lists(self) -> list[dict[str, Any]]:
        """The user-made lists (`schema.feature_lists`): id, name, description, created, n (items), by name."""
        if not S.has_table(self.engine, S.feature_lists):
            return []
        n = (
            select(func.count())
            .where(S.feature_list_items.c.list_id == S.feature_lists.c.id)
            .scalar_subquery()
            .label("n")
        )
        with self.engine.connect() as c:
            by_name = D.order_by(S.feature_lists.c.name, dialect=self.engine.dialect.name)
            rows = c.execute(select(S.feature_lists, n).order_by(by_name, S.feature_lists.c.id)).mappings()
            return [dict(r) for r in rows]

    def feature_list(self, list_id: int) -> dict[str, Any] | None:
        """One list with its ``items`` (feature, note, position, explanation) in order; None if absent."""
        if not S.has_table(self.engine, S.feature_lists):
            return None
        items = S.feature_list_items
        with self.engine.connect() as c:
            head = (
                c.execute(select(S.feature_lists).where(S.feature_lists.c.id == list_id)).mappings().first()
            )
            if head is None:
                return None
            q = (
                select(items.c.feature, items.c.note, items.c.position, S.labels.c.explanation)
                .outerjoin(S.labels, S.labels.c.feature == items.c.feature)
                .where(items.c.list_id == list_id)
                .order_by(items.c.position, items.c.feature)
            )
            return {**dict(head), "items": [dict(r) for r in c.execute(q).mappings()]}

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
        key = D.order_by(cols[name], desc=order.startswith("-"), dialect=self.engine.dialect.name)
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
        if self._packed:
            t = S.top_tokens.c
            q = (
                select(t.feature, t.n, t.max_act)
                .where(t.token == token)
                .order_by(t.n.desc(), t.max_act.desc(), t.feature)
                .limit(limit)
            )
        else:
            legacy = S.legacy_contexts.c
            q = (
                select(legacy.feature, func.count().label("n"), func.max(legacy.act).label("m"))
                .where(legacy.center_token == token, legacy.kind == 0)
                .group_by(legacy.feature)
                .order_by(func.count().desc(), func.max(legacy.act).desc(), legacy.feature)
                .limit(limit)
            )
        with self.engine.connect() as c:
            return [TokenHit(int(f), int(n), float(m)) for f, n, m in c.execute(q)]

    def search_text(self, query: str, limit: int = 50) -> list[dict]:
        """Features whose label contains ``query`` (case-insensitively, by feature), then those whose top
        contexts hold its words as a phrase (full-text: best ranked first; `dialect.fts_search`).

        ``query`` is matched literally (``%``, ``_`` and quotes are plain characters; NUL is dropped); at
        most `MAX_QUERY` characters."""
        if len(query) > MAX_QUERY:
            raise ValueError(f"the search text has {len(query)} characters; at most {MAX_QUERY}")
        query = query.replace("\x00", "")
        if not query.strip():
            return []
        like = D.like_pattern(query)
        hits: dict[int, dict] = {}
        with self.engine.connect() as c:
            for f, expl in c.execute(
                select(S.labels.c.feature, S.labels.c.explanation)
                .where(S.labels.c.explanation.ilike(like, escape="\\"))
                .order_by(S.labels.c.feature)
                .limit(limit)
            ):
                hits[f] = {"feature": f, "where": "explanation", "text": expl}
            for f, t in self._text_hits(c, query, limit * 4):
                hits.setdefault(f, {"feature": f, "where": "context", "text": t})
        return list(hits.values())[:limit]

    def _text_hits(self, c: Any, query: str, limit: int) -> list[tuple[int, str]]:
        """(feature, text) of the top contexts matching ``query`` in full text, best first."""
        if not self._packed:
            return D.fts_search(c, S.legacy_contexts, query, limit)
        ids = D.fts_ids(c, query, limit)
        where = [P.split_context_id(i) for i in ids]
        t = S.context_blocks
        texts: dict[tuple[int, int], str] = {}
        features = sorted({f for f, _, _ in where})
        for lo in range(0, len(features), 500):
            q = select(t.c.feature, t.c.kind, t.c.rank, t.c.text_len, t.c.text).where(
                t.c.feature.in_(features[lo : lo + 500]), t.c.kind == 0
            )
            for b in c.execute(q).mappings():
                for i, text in zip(*P.fts_entries([b]), strict=True):
                    texts[P.split_context_id(i)[::2]] = text
        return [(f, texts[f, r]) for f, _, r in where if (f, r) in texts]

    def labels(self, *, source: str | None = None) -> dict[int, dict]:
        q = select(S.labels).order_by(S.labels.c.feature)
        if source is not None:
            q = q.where(or_(S.labels.c.source == source, S.labels.c.source.like(f"{source}:%")))
        with self.engine.connect() as c:
            return {r["feature"]: dict(r) for r in c.execute(q).mappings()}

    # ---- explanations (optional table: empty when absent) ------------------------------------------------
    def explanations(self, feature: int) -> list[dict]:
        """Every stored explanation of ``feature``, oldest first: ``id``, ``text``, ``explainer``,
        ``backend``, ``prompt_version``, ``created``, ``meta`` and ``scores`` ({scorer: value}, from
        ``explanation_scores`` where that table exists)."""
        if not S.has_table(self.engine, S.explanations):
            return []
        q = (
            select(S.explanations)
            .where(S.explanations.c.feature == int(feature))
            .order_by(S.explanations.c.id)
        )
        with self.engine.connect() as c:
            rows = [dict(r) for r in c.execute(q).mappings()]
        return self._with_scores(rows)

    def explained(self, *, explainer: str, backend: str, prompt_version: str) -> set[int]:
        """The features that already have an explanation of this explainer, backend and prompt version."""
        if not S.has_table(self.engine, S.explanations):
            return set()
        e = S.explanations.c
        q = select(e.feature).where(
            e.explainer == explainer, e.backend == backend, e.prompt_version == prompt_version
        )
        with self.engine.connect() as c:
            return {int(f) for f in c.execute(q).scalars()}

    def search_explanations(self, query: str, limit: int = 50) -> list[dict]:
        """Explanations whose text contains ``query`` (matched literally, case-insensitively; every word when
        it has several), best scored first; each as in `explanations` plus ``feature``."""
        if len(query) > MAX_QUERY:
            raise ValueError(f"the search text has {len(query)} characters; at most {MAX_QUERY}")
        words = query.replace("\x00", "").split()
        if not words or not S.has_table(self.engine, S.explanations):
            return []
        e = S.explanations.c
        q = select(S.explanations)
        order: list[Any] = []
        if S.has_table(self.engine, S.explanation_scores):  # best scored first, over every match (in SQL)
            sc = S.explanation_scores.c
            best = (
                select(sc.explanation_id, func.max(sc.value).label("best"))  # MAX skips NULL (a NaN score)
                .group_by(sc.explanation_id)
                .subquery()
            )
            q = q.outerjoin(best, best.c.explanation_id == e.id)
            order = [best.c.best.is_(None), best.c.best.desc()]
        for w in words:
            q = q.where(e.text.ilike(D.like_pattern(w), escape="\\"))
        with self.engine.connect() as c:
            found = c.execute(q.order_by(*order, e.feature, e.id).limit(limit)).mappings()
            rows = [{k: r[k] for k in S.explanations.c.keys()} for r in found]
        return self._with_scores(rows)

    def _with_scores(self, rows: list[dict]) -> list[dict]:
        for r in rows:
            r["meta"] = json.loads(r["meta"]) if r.get("meta") else {}
            r["scores"] = {}
        if not rows or not S.has_table(self.engine, S.explanation_scores):
            return rows
        by_id = {r["id"]: r for r in rows}
        t = S.explanation_scores  # the newest score per scorer (`FeatureWriter.add_score`)
        with self.engine.connect() as c:
            found = c.execute(
                select(t.c.explanation_id, t.c.scorer, t.c.value)
                .where(t.c.explanation_id.in_(list(by_id)))
                .order_by(t.c.created, t.c.id)
            ).all()
        for eid, scorer, value in found:
            by_id[eid]["scores"][scorer] = float("nan") if value is None else float(value)
        return rows

    def scores(self, explanation_id: int) -> list[dict]:
        """The scores of one explanation (`schema.explanation_scores`), oldest first: id, scorer, value (NaN for
        a score that is not a number), n, details, backend, prompt_version, seed, created."""
        if not S.has_table(self.engine, S.explanation_scores):
            return []
        t = S.explanation_scores
        with self.engine.connect() as c:
            rows = [
                dict(r)
                for r in c.execute(
                    select(t).where(t.c.explanation_id == explanation_id).order_by(t.c.created, t.c.id)
                ).mappings()
            ]
        for r in rows:
            r["details"] = json.loads(r["details"])
            r["value"] = float("nan") if r["value"] is None else float(r["value"])
        return rows

    def dump(self) -> dict[str, list[tuple]]:
        """Every row of every table, sorted (to compare two databases' contents)."""
        out = {}
        with self.engine.connect() as c:
            for table in [*S.metadata.sorted_tables, *S.legacy_metadata.sorted_tables]:
                if not S.has_table(self.engine, table):
                    continue
                out[table.name] = sorted(tuple(r) for r in c.execute(select(table)))
        return out

    def contents(self) -> dict[str, list[tuple]]:
        """What the database holds, whatever its layout (to compare databases of different schema versions:
        `dump` compares rows): every table's rows as `dump` gives them, but ``meta`` without the schema
        version, ``contexts`` as version 3 rows without their ``id`` (`contexts`), ``context_loss`` keyed
        by (feature, kind, rank), and of ``checksums`` (whose definition changed with the layout) only which
        features have one."""
        out = self.dump()
        for name in ("contexts", "context_blocks", "top_tokens"):
            out.pop(name, None)
        out["meta"] = [r for r in out["meta"] if r[0] != "schema_version"]
        names = [n for n in S.CONTEXT_COLUMNS]
        where = {}
        rows = []
        for r in self.contexts():
            where[r["id"]] = (r["feature"], r["kind"], r["rank"])
            rows.append(tuple(bytes(r[n]) if isinstance(r[n], (bytes, memoryview)) else r[n] for n in names))
        out["contexts"] = sorted(rows)
        if "checksums" in out:
            out["checksums"] = sorted((f,) for f, _ in out["checksums"])
        if "context_loss" in out:
            out["context_loss"] = sorted((where.get(i), bytes(b)) for i, b in out["context_loss"])
        return out
