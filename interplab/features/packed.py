"""Schema version 4's context layout: a feature's contexts of one kind packed into one row of
``context_blocks`` (arrays as little-endian bytes), instead of one row per context.

A build writes ~45 contexts per feature; as rows, inserting them, indexing them and hashing each one's
``repr`` for the checksum was half the build. Packed, a feature is two rows whose bytes are made in bulk with
NumPy, and its checksum is a SHA-256 over those bytes (`block_digest`), recomputed from the same bytes when the
feature is read. Every value a version 3 context row held is kept (`ContextArrays` is the same columns), so a
version 3 database converts without loss (`upgrade_contexts`, the migration to version 4) and both layouts
read as the same records.

A context's id (what ``context_loss`` and the full-text index key it by) is `context_id` of its feature,
kind and rank, so it is stable across rebuilds of the feature.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, delete, insert, select

from interplab.features import dialect as D
from interplab.features import schema as S
from interplab.integrity import IntegrityError

RANK_BITS = 20
"""bits of a context id holding its rank (a kind holds at most 2**20 contexts per feature)"""
KIND_SHIFT = RANK_BITS
FEATURE_SHIFT = RANK_BITS + 1


def context_id(feature: Any, kind: Any, rank: Any) -> Any:
    """The id of a context (ints or integer arrays): feature, kind (0 or 1) and rank in one int64."""
    return (feature << FEATURE_SHIFT) | (kind << KIND_SHIFT) | rank


def split_context_id(cid: int) -> tuple[int, int, int]:
    """(feature, kind, rank) of a `context_id`."""
    return cid >> FEATURE_SHIFT, (cid >> KIND_SHIFT) & 1, cid & ((1 << RANK_BITS) - 1)


def feature_id_range(feature: int) -> tuple[int, int]:
    """The context ids of ``feature``: ``lo <= id < hi``."""
    return feature << FEATURE_SHIFT, (feature + 1) << FEATURE_SHIFT


@dataclass
class ContextArrays:
    """Contexts as arrays, one per column of a version 3 context row (``feature``, ``kind``, ``rank``,
    ``token_index``, ``act``, ``center_token``, the windows' ``tokens`` and ``acts`` [n, width], ``text``)."""

    feature: np.ndarray
    kind: np.ndarray
    rank: np.ndarray
    token_index: np.ndarray
    act: np.ndarray
    center_token: np.ndarray
    tokens: np.ndarray
    acts: np.ndarray
    text: list[str]

    def __len__(self) -> int:
        return len(self.feature)

    @classmethod
    def empty(cls, width: int = 0) -> ContextArrays:
        z = np.zeros(0, np.int64)
        return cls(
            z, z, z, z, np.zeros(0), z, np.zeros((0, width), np.int32), np.zeros((0, width), "<f4"), []
        )

    @classmethod
    def concat(cls, parts: Sequence[ContextArrays]) -> ContextArrays:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        cols = {
            name: np.concatenate([getattr(p, name) for p in parts])
            for name in ("feature", "kind", "rank", "token_index", "act", "center_token", "tokens", "acts")
        }
        return cls(**cols, text=[t for p in parts for t in p.text])

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[Any, Any]]) -> ContextArrays:
        """From context rows as dicts (the columns of `schema.CONTEXT_COLUMNS`): the stored types, as a
        version 3 row stored them (an activation's -0.0 as 0.0; NaN stays NaN, read back as None)."""
        rows = list(rows)
        if not rows:
            return cls.empty()
        widths = {len(bytes(r["tokens"])) // 4 for r in rows} | {len(bytes(r["acts"])) // 4 for r in rows}
        if len(widths) != 1:
            raise ValueError(f"the contexts' windows differ in width: {sorted(widths)} tokens")
        (w,) = widths
        act = np.array([np.nan if r["act"] is None else float(r["act"]) for r in rows], np.float64)
        return cls(
            feature=np.array([int(r["feature"]) for r in rows], np.int64),
            kind=np.array([int(r["kind"]) for r in rows], np.int64),
            rank=np.array([int(r["rank"]) for r in rows], np.int64),
            token_index=np.array([int(r["token_index"]) for r in rows], np.int64),
            act=act + 0.0,
            center_token=np.array([int(r["center_token"]) for r in rows], np.int64),
            tokens=np.frombuffer(b"".join(bytes(r["tokens"]) for r in rows), "<i4").reshape(len(rows), w),
            acts=np.frombuffer(b"".join(bytes(r["acts"]) for r in rows), "<f4").reshape(len(rows), w),
            text=[str(r["text"]) for r in rows],
        )


BLOCK_BLOBS = ("rank", "token_index", "act", "center_token", "tokens", "acts", "text_len", "text")
"""the byte columns of ``context_blocks``, in the order `block_digest` hashes them"""


def pack(ctx: ContextArrays) -> list[dict[str, Any]]:
    """``context_blocks`` rows of ``ctx``: one per (feature, kind), its contexts by rank."""
    n = len(ctx)
    if n == 0:
        return []
    if (
        int(ctx.rank.max()) >= 1 << RANK_BITS
        or int(ctx.rank.min()) < 0
        or not np.isin(ctx.kind, (0, 1)).all()
    ):
        raise ValueError(f"a context's rank must be in 0..{(1 << RANK_BITS) - 1} and its kind 0 or 1")
    order = np.lexsort((ctx.rank, ctx.kind, ctx.feature))
    feat, kind = ctx.feature[order], ctx.kind[order]
    starts = np.flatnonzero(np.r_[True, (feat[1:] != feat[:-1]) | (kind[1:] != kind[:-1])])
    ends = np.r_[starts[1:], n]
    w = ctx.tokens.shape[1]
    cols = {
        "rank": ctx.rank[order].astype("<i4").tobytes(),
        "token_index": ctx.token_index[order].astype("<i8").tobytes(),
        "act": (ctx.act[order].astype("<f8") + 0.0).tobytes(),
        "center_token": ctx.center_token[order].astype("<i4").tobytes(),
        "tokens": np.ascontiguousarray(ctx.tokens[order], "<i4").tobytes(),
        "acts": np.ascontiguousarray(ctx.acts[order], "<f4").tobytes(),
    }
    texts = [ctx.text[i] for i in order.tolist()]
    joined = "".join(texts)
    if joined.isascii():  # one encode; each text's bytes are its characters
        text, text_len = joined.encode(), np.fromiter(map(len, texts), np.int64, n)
    else:
        encoded = [t.encode() for t in texts]
        text, text_len = b"".join(encoded), np.fromiter(map(len, encoded), np.int64, n)
    text_end = np.cumsum(text_len)
    text_start = text_end - text_len
    cols["text_len"] = text_len.astype("<i4").tobytes()
    size = {"rank": 4, "token_index": 8, "act": 8, "center_token": 4, "tokens": 4 * w, "acts": 4 * w}
    out = []
    for a, b, f, k in zip(
        starts.tolist(), ends.tolist(), feat[starts].tolist(), kind[starts].tolist(), strict=True
    ):
        row: dict[str, Any] = {"feature": f, "kind": k, "n": b - a, "width": w}
        for name, s in size.items():
            row[name] = cols[name][a * s : b * s]
        row["text_len"] = cols["text_len"][4 * a : 4 * b]
        row["text"] = text[int(text_start[a]) : int(text_end[b - 1])]
        out.append(row)
    return out


def block_digest(feature_row: Mapping[Any, Any], blocks: Iterable[Mapping[Any, Any]]) -> str:
    """Schema version 4's checksum of one feature: SHA-256 of its row's normalised ``repr`` tuple (as version
    3) followed by each of its ``context_blocks`` rows by kind: kind, count and width, then every byte column
    with its length: ``<q`` kind, n, width and each column's length, then the columns' bytes in
    `BLOCK_BLOBS` order."""
    parts = [S.feature_repr(feature_row).encode()]
    for b in sorted(blocks, key=lambda b: int(b["kind"])):
        blobs = [bytes(b[name]) for name in BLOCK_BLOBS]
        parts.append(_HEADER.pack(int(b["kind"]), int(b["n"]), int(b["width"]), *map(len, blobs)))
        parts += blobs
    return hashlib.sha256(b"".join(parts)).hexdigest()


_HEADER = struct.Struct(f"<{3 + len(BLOCK_BLOBS)}q")


def unpack(block: Mapping[Any, Any]) -> list[dict[str, Any]]:
    """The contexts of one ``context_blocks`` row as version 3 rows held them (``kind``, ``rank``,
    ``token_index``, ``act`` (None: NaN), ``center_token``, ``tokens`` and ``acts`` as bytes, ``text``)."""
    n, w, kind = int(block["n"]), int(block["width"]), int(block["kind"])
    ranks = np.frombuffer(block["rank"], "<i4").tolist()
    index = np.frombuffer(block["token_index"], "<i8").tolist()
    acts_ = np.frombuffer(block["act"], "<f8").tolist()
    centers = np.frombuffer(block["center_token"], "<i4").tolist()
    toks, acts = bytes(block["tokens"]), bytes(block["acts"])
    lens = np.frombuffer(block["text_len"], "<i4")
    ends = np.cumsum(lens).tolist()
    text = bytes(block["text"])
    out = []
    start = 0
    for i in range(n):
        out.append(
            {
                "kind": kind,
                "rank": ranks[i],
                "token_index": index[i],
                "act": None if acts_[i] != acts_[i] else acts_[i],
                "center_token": centers[i],
                "tokens": toks[4 * w * i : 4 * w * (i + 1)],
                "acts": acts[4 * w * i : 4 * w * (i + 1)],
                "text": text[start : ends[i]].decode(),
            }
        )
        start = ends[i]
    return out


def top_token_rows(ctx: ContextArrays) -> list[tuple]:
    """``top_tokens`` rows (tuples in its column order): per (center token, feature) of the top contexts (kind 0), how many peak there and
    the strongest activation among them (what `FeatureReader.search_token` ranks by)."""
    top = ctx.kind == 0
    feat, tok, act = ctx.feature[top], ctx.center_token[top], ctx.act[top]
    ok = ~np.isnan(act)
    feat, tok, act = feat[ok], tok[ok], act[ok]
    if len(feat) == 0:
        return []
    order = np.lexsort((tok, feat))
    feat, tok, act = feat[order], tok[order], act[order]
    starts = np.flatnonzero(np.r_[True, (feat[1:] != feat[:-1]) | (tok[1:] != tok[:-1])])
    counts = np.diff(np.r_[starts, len(feat)])
    best = np.maximum.reduceat(act, starts)
    return list(zip(tok[starts].tolist(), feat[starts].tolist(), counts.tolist(), best.tolist(), strict=True))


def fts_entries(blocks: Sequence[Mapping[Any, Any]]) -> tuple[list[int], list[str]]:
    """(context ids, texts) of the top contexts with text in ``blocks`` (what the full-text index holds)."""
    ids, texts = [], []
    for b in blocks:
        if int(b["kind"]) != 0 or not b["text"]:
            continue
        lens = np.frombuffer(b["text_len"], "<i4")
        ranks = np.frombuffer(b["rank"], "<i4").tolist()
        ends = np.cumsum(lens).tolist()
        raw, start, f = bytes(b["text"]), 0, int(b["feature"])
        for r, e in zip(ranks, ends, strict=True):
            if e > start:
                ids.append(context_id(f, 0, r))
                texts.append(raw[start:e].decode())
            start = e
    return ids, texts


def delete_features(c: Connection, features: Sequence[int]) -> None:
    """Remove ``features``' rows, contexts, checksums, full-text entries and loss effects (version 4)."""
    ids = sorted({int(f) for f in features})
    present = [
        int(f)
        for lo in range(0, len(ids), 500)
        for f in c.execute(
            select(S.features.c.feature).where(S.features.c.feature.in_(ids[lo : lo + 500]))
        ).scalars()
    ]
    if not present:  # a feature's rows are written (and removed) together, in one transaction
        return
    ids = present
    for lo in range(0, len(ids), 500):
        part = ids[lo : lo + 500]
        old = c.execute(
            select(S.context_blocks.c.feature, S.context_blocks.c.kind, S.context_blocks.c.rank,
                   S.context_blocks.c.text_len, S.context_blocks.c.text)
            .where(S.context_blocks.c.feature.in_(part), S.context_blocks.c.kind == 0)
        ).mappings().all()  # fmt: skip
        if old:
            D.fts_unindex(c, *fts_entries(old))
        for table in (S.context_blocks, S.top_tokens, S.features, S.checksums):
            c.execute(delete(table).where(table.c.feature.in_(part)))
    if S.has_table(c, S.context_loss):
        col = S.context_loss.c.context_id
        for f in ids:
            lo, hi = feature_id_range(f)
            c.execute(delete(S.context_loss).where(col >= lo, col < hi))


def write_blocks(
    c: Connection,
    rows: Sequence[Mapping[Any, Any]],
    ctx: ContextArrays,
    *,
    digest: Iterable[int] | None = None,
) -> None:
    """Insert feature rows and their contexts, packed (the features must be absent: `delete_features`):
    ``context_blocks``, ``top_tokens``, the full-text index and the checksums (of ``digest``'s features;
    None: all)."""
    blocks = pack(ctx)
    _insert(c, S.features, rows)
    by_feature: dict[int, list[dict]] = {}
    for b in blocks:
        by_feature.setdefault(b["feature"], []).append(b)
    wanted = None if digest is None else set(digest)
    sums = [
        {"feature": int(r["feature"]), "sha256": block_digest(r, by_feature.get(int(r["feature"]), []))}
        for r in rows
        if wanted is None or int(r["feature"]) in wanted
    ]
    _insert(c, S.checksums, sums)
    if blocks:
        _insert(c, S.context_blocks, blocks)
        _insert(c, S.top_tokens, top_token_rows(ctx))
        with_text = np.flatnonzero((ctx.kind == 0) & np.fromiter(map(bool, ctx.text), bool, len(ctx)))
        ids = context_id(ctx.feature[with_text], 0, ctx.rank[with_text]).tolist()
        D.fts_index(c, ids, [ctx.text[i] for i in with_text.tolist()])


def _insert(c: Connection, table: Any, rows: Sequence[Mapping[Any, Any] | tuple]) -> None:
    """Insert rows given as dicts or as tuples in ``table``'s column order."""
    if not rows:
        return
    names = [col.name for col in table.columns]
    if D.is_sqlite(c):  # the driver's executemany straight from tuples
        sql = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        c.exec_driver_sql(
            sql, [r if isinstance(r, tuple) else tuple([r.get(n) for n in names]) for r in rows]
        )
    else:
        c.execute(
            insert(table), [dict(zip(names, r, strict=True)) if isinstance(r, tuple) else r for r in rows]
        )


# ---- version 3 -> 4 -----------------------------------------------------------------------------------
def upgrade_contexts(src: Connection, dst: Connection, *, chunk: int = 512) -> None:
    """Write the version 3 contexts in ``src`` as version 4 rows into ``dst`` (the same connection for a
    migration in place, whose features are replaced): blocks, top tokens, the full-text index, checksums
    (recomputed for the features that had one, after checking the old one: a corrupt feature is refused, not
    laundered into a valid checksum) and loss effects (re-keyed by `context_id`)."""
    legacy = S.legacy_contexts
    in_place = src is dst
    feats = [
        int(f) for f in src.execute(select(S.features.c.feature).order_by(S.features.c.feature)).scalars()
    ]
    has_sums = S.has_table(src, S.checksums)
    remap: dict[int, int] = {}
    for lo in range(0, len(feats), chunk):
        part = feats[lo : lo + chunk]
        rows = [
            dict(r) for r in src.execute(select(S.features).where(S.features.c.feature.in_(part))).mappings()
        ]
        ctx_rows = [
            dict(r)
            for r in src.execute(
                select(legacy)
                .where(legacy.c.feature.in_(part))
                .order_by(legacy.c.feature, legacy.c.kind, legacy.c.rank)
            ).mappings()
        ]
        by_f: dict[int, list[dict]] = {}
        for r in ctx_rows:
            by_f.setdefault(int(r["feature"]), []).append(r)
            remap[int(r["id"])] = int(context_id(int(r["feature"]), int(r["kind"]), int(r["rank"])))
        sums = (
            dict(
                src.execute(
                    select(S.checksums.c.feature, S.checksums.c.sha256).where(S.checksums.c.feature.in_(part))
                ).all()
            )
            if has_sums
            else {}
        )
        for r in rows:
            f = int(r["feature"])
            if f in sums and S.row_digest(r, by_f.get(f, [])) != sums[f]:
                raise IntegrityError(
                    f"feature {f} is corrupt (its stored values differ from its SHA-256): the database is left "
                    "at schema version 3; rebuild it (interplab features build --overwrite)"
                )
        if in_place:
            for table in (S.features, S.checksums):
                dst.execute(delete(table).where(table.c.feature.in_(part)))
        write_blocks(dst, rows, ContextArrays.from_rows(ctx_rows), digest=list(sums))
    if S.has_table(src, S.context_loss):
        losses = [
            (remap.get(int(i)), bytes(b))
            for i, b in src.execute(select(S.context_loss.c.context_id, S.context_loss.c.loss))
        ]
        D.ensure_tables(dst, S.context_loss)
        if in_place:
            dst.execute(delete(S.context_loss))
        kept = [
            {"context_id": i, "loss": b} for i, b in losses if i is not None
        ]  # a context's loss outlives it
        if kept:
            dst.execute(insert(S.context_loss), kept)
