"""Correctness of the build's fast paths: the checksum digests equal their definitions (schema version 3's row by
row, version 4's over the packed bytes), and a whole database equals the one the implementations they replaced
build."""

from __future__ import annotations

import hashlib
import json
import math
import random
import sqlite3
import struct

import numpy as np
import pytest
import torch
from sqlalchemy import Float, Integer, LargeBinary

from interplab.features import FeatureBuildConfig
from interplab.features import build as B
from interplab.features import packed as P
from interplab.features import schema as S
from interplab.features.build import build_feature_db
from interplab.features.collect import encode_batch
from interplab.features.stream import _LOW32, _MAX_TOKENS, StreamingFeatureStats, sample_priority
from interplab.model import ModelConfig, Transformer
from tests.features.planted import make_sae, tiny_model


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
    cols = [S.legacy_contexts.c[n] for n in S.CONTEXT_DIGEST_COLUMNS]
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


# ---- the whole database: the fast paths against the implementations they replaced ---------------------------


def reference_cooccurrence(self, t_idx, f_idx, n_tok):
    """Co-occurrence as first written: every ordered pair of firings on a token expanded and counted."""
    if len(t_idx) == 0 or self._cooc_upper is None:
        return
    n = len(self.features)
    counts = torch.bincount(t_idx, minlength=n_tok)
    start = torch.cumsum(counts, 0) - counts
    rep = counts[t_idx]
    left = torch.repeat_interleave(torch.arange(len(t_idx)), rep)
    offset = torch.arange(len(left)) - torch.repeat_interleave(torch.cumsum(rep, 0) - rep, rep)
    right = start[t_idx[left]] + offset
    full = torch.zeros(n, n, dtype=self._cooc_upper.dtype)
    full.view(-1).index_add_(0, f_idx[left] * n + f_idx[right], torch.ones(len(left), dtype=full.dtype))
    self._cooc_upper += full.triu()


def reference_merge(self, which, f_idx, key, t_idx, dense, tokens, p):
    """The top-k / sample merge as first written: windows cut for every kept entry, old ones included."""
    table = getattr(self, f"{which}_key")
    k = table.shape[1]
    cand = key > table[f_idx, -1]
    f_c, key_c, t_c = f_idx[cand], key[cand], t_idx[cand]
    if len(key_c) == 0:
        return
    rows = torch.unique(f_c)
    n = len(rows)
    row_c = torch.searchsorted(rows, f_c)
    all_row = torch.cat([torch.arange(n).repeat_interleave(k), row_c])
    all_key = torch.cat([table[rows].flatten(), key_c])
    order = torch.argsort(all_key, descending=True, stable=True)
    order = order[torch.argsort(all_row[order], stable=True)]
    sorted_rows = all_row[order]
    rank = torch.arange(len(order)) - torch.searchsorted(sorted_rows, sorted_rows)
    keep = order[rank < k]
    src = keep - n * k
    is_new = src >= 0
    new_local, new_f = t_c[src.clamp(min=0)], f_c[src.clamp(min=0)]
    old_slot = rows.repeat_interleave(k) * k + keep.clamp(max=n * k - 1) % k
    w = self.cfg.window
    win_tok, win_act = self._windows(dense, new_f, new_local, tokens, p)
    toks, acts = getattr(self, f"{which}_tokens"), getattr(self, f"{which}_acts")
    toks[rows] = torch.where(is_new[:, None], win_tok, toks.view(-1, w)[old_slot]).view(n, k, w)
    acts[rows] = torch.where(is_new[:, None], win_act, acts.view(-1, w)[old_slot]).view(n, k, w)
    new_key = all_key[keep].view(n, k)
    table[rows] = new_key
    if which == "sample":
        val = torch.where(is_new, dense[new_local, new_f], self.sample_val.flatten()[old_slot])
        index = torch.where(is_new, self.n_tokens + new_local, self.sample_index.flatten()[old_slot])
        self.sample_val[rows] = val.view(n, k)
        self.sample_index[rows] = torch.where(new_key >= 0, index.view(n, k), -1)


@torch.no_grad()
def reference_update(self, tokens, acts, loss_grad=None, directions=None):
    """`StreamingFeatureStats.update` as first written: torch indexing throughout."""
    b, p, n = acts.shape
    if n != len(self.features):
        raise ValueError(f"acts has {n} features, this accumulator holds {len(self.features)}")
    if tuple(tokens.shape) != (b, p):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match acts {tuple(acts.shape)}")
    if self.n_tokens + b * p > _MAX_TOKENS:
        raise ValueError(f"the streaming key supports at most {_MAX_TOKENS} tokens")
    dense = acts.detach().float().reshape(b * p, n)  # token feature
    # everything below works on the firings only (SAEs are sparse: ~1% of entries)
    t_idx, f_idx = (dense > 0).nonzero(as_tuple=True)  # sorted by token, then feature
    values = dense[t_idx, f_idx]
    self.n_fires += torch.bincount(f_idx, minlength=n)
    self.act_sum.index_add_(0, f_idx, values.double())
    if self.loss_sum is not None and loss_grad is not None and directions is not None:
        proj = loss_grad.detach().float().reshape(b * p, -1) @ directions.float().T  # token feature
        effect = -values * proj[t_idx, f_idx]
        self.loss_sum.index_add_(0, f_idx, effect.double())
    bins = torch.bucketize(values.log(), self._log_edges)
    self.hist.view(-1).index_add_(0, f_idx * self.cfg.hist_bins + bins, torch.ones_like(bins))
    if self._cooc_upper is not None and self.n_tokens < self.cfg.cooc_max_tokens:
        self._cooccurrence(t_idx, f_idx, b * p)
    gidx = self.n_tokens + t_idx
    # activations > 0 as int32 bits are ordered like the floats; the low word prefers earlier tokens
    top_key = (values.view(torch.int32).long() << 32) | (_LOW32 - gidx)
    self._merge("top", f_idx, top_key, t_idx, dense, tokens, p)
    if self.cfg.n_samples:
        prio = sample_priority(gidx, self.features[f_idx], self.cfg.seed)
        self._merge("sample", f_idx, prio, t_idx, dense, tokens, p)
    self.n_tokens += b * p
    self.batches += 1


def reference_windows(self, dense, feat, local, tokens, p):
    """`StreamingFeatureStats._windows` as first written (torch tensors)."""
    offs = torch.arange(-self.cfg.window_left, self.cfg.window_right + 1)
    seq, pos = local // p, local % p
    q = pos[..., None] + offs
    valid = (q >= 0) & (q < p)
    flat_tok = seq[..., None] * p + q.clamp(0, p - 1)
    win_tok = torch.where(valid, tokens.reshape(-1)[flat_tok], -1)
    win_act = torch.where(valid, dense[flat_tok, feat[..., None].expand_as(flat_tok)], 0.0)
    return win_tok, win_act


def reference_feature_rows(stats, logit_effects, cfg, vocab, rows):
    """`build.feature_rows` as first written: a dict per context row (the feature rows, which the rewrite
    left as they were, from `build.feature_dicts`)."""
    center = cfg.window_left
    sl = slice(rows.start, rows.stop)
    out = B.feature_dicts(stats, logit_effects, cfg, rows)
    feats = stats.features[sl].tolist()
    names = np.array([vocab.get(t, f"#{t}") for t in range(max(vocab, default=-1) + 1)] + [""], dtype=object)
    ctx = []
    for kind, index, val, toks, acts in (
        (0, stats.top_index, stats.top_val, stats.top_tokens, stats.top_acts),
        (1, stats.sample_index, stats.sample_val, stats.sample_tokens, stats.sample_acts),
    ):
        index, val = index[sl], val[sl]
        if kind == 1:  # samples shown from the strongest down, grouped into activation quantiles
            order = torch.argsort(torch.where(index >= 0, -val, float("inf")), dim=1, stable=True)
            index, val = index.gather(1, order), val.gather(1, order)
            toks = toks[sl].gather(1, order[..., None].expand(-1, -1, toks.shape[-1]))
            acts = acts[sl].gather(1, order[..., None].expand(-1, -1, acts.shape[-1]))
        else:
            toks, acts = toks[sl], acts[sl]
        where = (index >= 0).nonzero()  # (feature row, rank), row-major
        if len(where) == 0:
            continue
        rr, kk = where.T
        valid = where.tolist()
        tok_rows, act_rows = toks[rr, kk], acts[rr, kk]  # context window
        tok_bytes = tok_rows.to(torch.int32).numpy().astype("<i4").tobytes()
        act_bytes = act_rows.float().numpy().astype("<f4").tobytes()
        w = tok_rows.shape[1]
        centers = tok_rows[:, center].tolist()
        gidx, vals = index[rr, kk].tolist(), B._rounded(val[rr, kk], 6)
        texts = B._texts(tok_rows.numpy(), names) if kind == 0 else [""] * len(valid)
        for e, (j, rank) in enumerate(valid):
            ctx.append(
                {
                    "feature": feats[j],
                    "kind": kind,
                    "rank": rank,
                    "token_index": gidx[e],
                    "act": vals[e],
                    "center_token": centers[e],
                    "tokens": tok_bytes[4 * w * e : 4 * w * (e + 1)],
                    "acts": act_bytes[4 * w * e : 4 * w * (e + 1)],
                    "text": texts[e],
                }
            )
    return out, ctx


def reference_pack(ctx):
    """`packed.pack` context by context: each (feature, kind)'s contexts by rank, their values appended."""
    groups: dict = {}
    for i in range(len(ctx)):
        groups.setdefault((int(ctx.feature[i]), int(ctx.kind[i])), []).append(i)
    out = []
    for (f, k), members in sorted(groups.items()):
        members.sort(key=lambda i: int(ctx.rank[i]))
        w = ctx.tokens.shape[1]
        texts = [ctx.text[i].encode() for i in members]
        out.append(
            {
                "feature": f, "kind": k, "n": len(members), "width": w,
                "rank": b"".join(struct.pack("<i", int(ctx.rank[i])) for i in members),
                "token_index": b"".join(struct.pack("<q", int(ctx.token_index[i])) for i in members),
                "act": b"".join(struct.pack("<d", float(ctx.act[i]) + 0.0) for i in members),
                "center_token": b"".join(struct.pack("<i", int(ctx.center_token[i])) for i in members),
                "tokens": b"".join(struct.pack(f"<{w}i", *map(int, ctx.tokens[i])) for i in members),
                "acts": b"".join(struct.pack(f"<{w}f", *map(float, ctx.acts[i])) for i in members),
                "text_len": b"".join(struct.pack("<i", len(t)) for t in texts),
                "text": b"".join(texts),
            }
        )  # fmt: skip
    return out


def reference_block_digest(feature_row, blocks):
    """`packed.block_digest` by its definition, piece by piece."""
    h = hashlib.sha256(S.feature_repr(feature_row).encode())
    for b in sorted(blocks, key=lambda b: b["kind"]):
        for v in (b["kind"], b["n"], b["width"], *(len(b[name]) for name in P.BLOCK_BLOBS)):
            h.update(struct.pack("<q", v))
        for name in P.BLOCK_BLOBS:
            h.update(b[name])
    return h.hexdigest()


def dump(db) -> dict[str, list[tuple]]:
    """Every row of every table (the full-text index's own tables too), in a fixed order."""
    with sqlite3.connect(db) as con:
        names = [n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {n: sorted(con.execute(f"SELECT * FROM {n}").fetchall(), key=repr) for n in names}


def test_database_equals_the_one_built_by_the_replaced_implementations(tmp_path, monkeypatch):
    torch.manual_seed(5)
    model = tiny_model()
    sae = make_sae(32, 48)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 40, (40, 16), generator=g)
    # small batches and k: the merges replace, move and keep entries over many batches
    cfg = FeatureBuildConfig(batch_size=3, top_k=5, n_samples=4, window_left=3, window_right=2)
    fast = build_feature_db(tmp_path / "fast.db", model, sae, tokens, cfg)
    monkeypatch.setattr(StreamingFeatureStats, "_cooccurrence", reference_cooccurrence)
    monkeypatch.setattr(StreamingFeatureStats, "_merge", reference_merge)
    monkeypatch.setattr(StreamingFeatureStats, "update", reference_update)
    monkeypatch.setattr(StreamingFeatureStats, "_windows", reference_windows)
    monkeypatch.setattr(P, "pack", reference_pack)
    monkeypatch.setattr(P, "block_digest", reference_block_digest)
    monkeypatch.setattr(B, "feature_rows", reference_feature_rows)
    slow = build_feature_db(tmp_path / "slow.db", model, sae, tokens, cfg)
    assert fast.n_features == slow.n_features == 48
    a, b = dump(tmp_path / "fast.db"), dump(tmp_path / "slow.db")
    assert a.keys() == b.keys() and len(a["context_blocks"]) == 2 * 48
    assert sum(len(r[4]) for r in a["context_blocks"]) // 4 > 48 * 5  # ranks: contexts
    assert any(json.loads(r[8]) for r in a["features"])  # co-occurrence lists are not all empty
    for table in a:
        assert a[table] == b[table], table


def _hard_batches(n_feat: int, seed: int):
    """Batches with every case the merges meet: a feature firing on every token, one never firing, a batch
    without firings, repeated activation values (ties broken by the token), few and many candidates."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(9):
        b, p = 3, 11
        acts = torch.rand(b, p, n_feat, generator=g)
        acts = torch.where(acts > 0.8, acts, 0.0)
        acts[..., 0] = torch.rand(b, p, generator=g) + 0.1  # dense
        acts[..., 1] = 0.0  # dead
        acts[..., 2] = torch.where(acts[..., 2] > 0, 0.5, 0.0)  # one value repeated: ties
        if i == 4:
            acts.zero_()
        tokens = torch.randint(0, 50, (b, p), generator=g)
        grad = torch.randn(b, p, 6, generator=g)
        out.append((tokens, acts, grad))
    return out


def test_streaming_state_equals_the_replaced_update_exactly(monkeypatch):
    """Every statistic bit for bit, except the loss sums: the replaced update projected every token on every
    feature (a dense product) and the new one only the firings (a sampled sparse product), so each dot
    product rounds in another order (float32), to ~1e-7 relative."""
    n_feat = 13
    directions = torch.randn(n_feat, 6, generator=torch.Generator().manual_seed(9))
    for k, m, wl, wr in ((4, 3, 2, 1), (1, 1, 0, 0), (30, 40, 5, 5)):
        cfg = FeatureBuildConfig(top_k=k, n_samples=m, window_left=wl, window_right=wr, seed=3)
        states = []
        for reference in (False, True):
            if reference:
                monkeypatch.setattr(StreamingFeatureStats, "_cooccurrence", reference_cooccurrence)
                monkeypatch.setattr(StreamingFeatureStats, "_merge", reference_merge)
                monkeypatch.setattr(StreamingFeatureStats, "update", reference_update)
                monkeypatch.setattr(StreamingFeatureStats, "_windows", reference_windows)
            s = StreamingFeatureStats(n_feat, cfg)
            for tokens, acts, grad in _hard_batches(n_feat, seed=k):
                s.update(tokens, acts, grad, directions)
            states.append(s.state_dict())
            monkeypatch.undo()
        new, ref = states
        assert new.keys() == ref.keys()
        assert int(new["top_key"].ge(0).sum()) > 0 and int(new["cooc"].sum()) > 0
        for name in ref:
            if name == "loss_sum":  # the projection at the firings sums each dot product in another order
                torch.testing.assert_close(new[name], ref[name], rtol=1e-5, atol=1e-5, msg=(name, k, m))
            else:
                assert torch.equal(new[name], ref[name]), (name, k, m)


def reference_encode_batch(model, sae, tokens, hook, features, with_grad):
    """`collect.encode_batch` as first written: the whole forward recorded by autograd."""
    holder = {}

    def grab(x, _site):
        if with_grad:
            x = x.detach().requires_grad_(True)
        holder["x"] = x
        return x

    grad = None
    with torch.set_grad_enabled(with_grad), model.hooks([(hook, grab)]):
        logits = model(tokens)
        if with_grad:
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            loss = -logp.gather(-1, tokens[:, 1:, None]).sum()
            (grad,) = torch.autograd.grad(loss, holder["x"])
    with torch.no_grad():
        acts = sae.encode(holder["x"].detach().to(sae.W_enc.dtype))
        if features is not None:
            acts = acts[..., features]
    return acts, grad


@pytest.mark.parametrize(
    "hook", ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.1.hook_resid_post"]
)
def test_encode_batch_records_only_after_the_hook_and_equals_the_full_recording(hook):
    torch.manual_seed(3)
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, d_vocab=40, n_ctx=16, name="two"))
    sae = make_sae(32, 24, hook_name=hook)
    tokens = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(1))
    for features, with_grad in ((None, True), (torch.tensor([5, 1, 7]), True), (None, False)):
        for grad_mode in (True, False):  # the caller's mode is restored
            with torch.set_grad_enabled(grad_mode):
                out = encode_batch(model, sae, tokens, hook, features, with_grad)
                assert torch.is_grad_enabled() is grad_mode
            acts, grad = reference_encode_batch(model, sae, tokens, hook, features, with_grad)
            assert torch.equal(out.acts, acts)
            assert (out.grad is None) is (grad is None)
            if (
                grad is not None
            ):  # softmax - one-hot directly, not through log_softmax: float32 rounding apart
                torch.testing.assert_close(out.grad, grad, rtol=1e-5, atol=1e-6)
            assert not out.acts.requires_grad
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into the weights
