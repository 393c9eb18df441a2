"""Correctness of the build's fast paths: the checksum digest equals its row-by-row definition."""

from __future__ import annotations

import hashlib
import math
import random

from sqlalchemy import Float, Integer, LargeBinary

from interplab.features import schema as S


def reference_digest(feature_row: dict, context_rows: list[dict]) -> str:
    """The digest as schema version 3 defined it: each row's normalised ``repr`` tuple hashed in turn."""

    def stored(col, value):
        kind = getattr(col.type, "impl_instance", col.type)  # what a TypeDecorator stores
        if value is None:
            return None
        if isinstance(kind, Float):
            value = float(value) + 0.0
            return None if math.isnan(value) else value
        if isinstance(kind, Integer):
            return int(value)
        if isinstance(kind, LargeBinary):
            return bytes(value)
        return str(value)

    h = hashlib.sha256()
    h.update(repr(tuple(stored(c, feature_row.get(c.name)) for c in S.features.columns)).encode())
    cols = [S.contexts.c[n] for n in S.CONTEXT_DIGEST_COLUMNS]
    for r in sorted(context_rows, key=lambda r: (int(r["kind"]), int(r["rank"]))):
        h.update(repr(tuple(stored(c, r.get(c.name)) for c in cols)).encode())
    return h.hexdigest()


def test_row_digest_equals_row_by_row_definition():
    rng = random.Random(0)
    specials = [0.0, -0.0, float("nan"), None, 1e-300, 3.5]
    for trial in range(50):
        row = {
            "feature": trial,
            "n_fires": rng.randrange(100),
            "density": rng.choice(specials + [rng.random()]),
            "max_act": rng.random(),
            "mean_act": rng.choice(specials),
            "loss_effect": rng.choice(specials),
            "hist": "[1, 2]",
            "logits": '{"pos": []}',
            "cooc": "[]",
            "top_token": rng.choice([None, 7]),
        }
        ctx = [
            {
                "feature": trial,
                "kind": rng.randrange(2),
                "rank": rank,
                "token_index": rng.randrange(10**6),
                "act": rng.choice(specials[:3] + [rng.random()]),
                "center_token": 3,
                "tokens": bytearray(rng.randbytes(68)),
                "acts": rng.randbytes(68),
                "text": rng.choice(["", "héllo\n'\"", "x"]),
            }
            for rank in rng.sample(range(40), rng.randrange(0, 30))
        ]
        rng.shuffle(ctx)
        assert S.row_digest(row, ctx) == reference_digest(row, ctx)
