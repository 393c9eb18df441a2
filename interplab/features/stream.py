"""`StreamingFeatureStats`: per-feature statistics accumulated over batches of activations, all features at once.

Every statistic is exact and independent of how the corpus is cut into batches: counts and sums add up,
the histogram has fixed log-spaced edges, the top-k contexts are selected by an integer key (activation
bits, then the earlier token wins ties), and the sampled contexts by a deterministic hash of (token,
feature) ("bottom-k" sampling: a uniform sample without replacement of the feature's firings).

>>> stats = StreamingFeatureStats(d_sae=8, cfg=FeatureBuildConfig(top_k=3))
>>> tokens, acts = torch.randint(0, 100, (2, 16)), torch.rand(2, 16, 8)
>>> stats.update(tokens, acts)          # tokens [batch pos], acts [batch pos d_sae]
>>> result = stats.result()
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from torch import Tensor

from interplab.features.config import FeatureBuildConfig
from interplab.io import save_tensors

_LOW32 = (1 << 32) - 1
_MAX_TOKENS = 1 << 32


@dataclass(frozen=True)
class FeatureStats:
    """What one pass collected for a range of features (``features[i]`` is the SAE latent of row i)."""

    features: Int[Tensor, " feature"]
    n_tokens: int
    n_fires: Int[Tensor, " feature"]
    act_sum: Float[Tensor, " feature"]
    hist: Int[Tensor, "feature bins"]
    hist_edges: Float[Tensor, " edges"]
    top_val: Float[Tensor, "feature k"]
    top_index: Int[Tensor, "feature k"]
    top_tokens: Int[Tensor, "feature k window"]
    top_acts: Float[Tensor, "feature k window"]
    sample_val: Float[Tensor, "feature m"]
    sample_index: Int[Tensor, "feature m"]
    sample_tokens: Int[Tensor, "feature m window"]
    sample_acts: Float[Tensor, "feature m window"]
    loss_sum: Float[Tensor, " feature"] | None
    cooc: Int[Tensor, "feature feature"] | None

    @property
    def density(self) -> Float[Tensor, " feature"]:
        """Fraction of tokens on which each feature fires (activation > 0)."""
        return self.n_fires.double() / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> Float[Tensor, " feature"]:
        """Mean activation where the feature fires."""
        return self.act_sum / self.n_fires.clamp(min=1)

    @property
    def loss_effect(self) -> Float[Tensor, " feature"] | None:
        """Mean increase of the sequence's summed cross-entropy (nats) when one firing is ablated."""
        return None if self.loss_sum is None else self.loss_sum / self.n_fires.clamp(min=1)

    def plot(self):
        """Feature density histogram (log10), the usual first look at an SAE."""
        import plotly.graph_objects as go

        dens = self.density[self.n_fires > 0].log10().tolist()
        fig = go.Figure(go.Histogram(x=dens, nbinsx=50))
        fig.update_layout(
            title=f"feature density ({len(self.features)} features, {self.n_tokens} tokens)",
            xaxis_title="log10 density",
            yaxis_title="features",
        )
        return fig

    def save(self, path: str | Path) -> None:
        """Write every tensor to one safetensors file (exact inverse: `FeatureStats.load`)."""
        tensors = {
            f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)
        }
        save_tensors(path, tensors, metadata={"n_tokens": str(self.n_tokens)})

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with safe_open(str(path), "pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            n_tokens = int(f.metadata()["n_tokens"])
        names = [f.name for f in fields(cls)]
        tensors: dict[str, Any] = {n: data.get(n) for n in names if n != "n_tokens"}  # optional ones: None
        return cls(**tensors, n_tokens=n_tokens)


def sample_priority(index: Tensor, feature: Tensor, seed: int) -> Tensor:
    """A deterministic pseudo-random non-negative int63 per (token index, feature) pair (splitmix64 steps)."""
    x = index * 0x9E3779B1 + feature * 0x85EBCA77 + (seed + 1) * 0xC2B2AE3D
    for mult in (0x4CF5AD432745937F, 0x2545F4914F6CDD1D):
        x = x ^ (x >> 31)
        x = x * (mult - (1 << 64) if mult >= 1 << 63 else mult)
    return (x ^ (x >> 29)) & ((1 << 62) - 1)


def _at_firings(grad: Tensor, directions: Tensor, t_idx: np.ndarray, f_t: Tensor) -> Tensor:
    """``grad[t] . directions[f]`` for each firing (token ``t_idx``, feature ``f_t``; sorted by token, then
    feature): the [token feature] product sampled at the firings only (~1% of it), as a sparse CSR mask."""
    n_tok, n_feat = grad.shape[0], directions.shape[0]
    crow = np.zeros(n_tok + 1, dtype=np.int64)
    np.cumsum(np.bincount(t_idx, minlength=n_tok), out=crow[1:])
    with warnings.catch_warnings():  # torch says once per process that sparse CSR support is in beta
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        mask = torch.sparse_csr_tensor(
            torch.from_numpy(crow), f_t, torch.zeros(len(f_t)), size=(n_tok, n_feat), check_invariants=False
        )
        return torch.sparse.sampled_addmm(mask, grad, directions.float().cpu().T, beta=0.0).values()


class StreamingFeatureStats:
    """Accumulates `FeatureStats` for ``d_sae`` features (optionally a range of them) over batches."""

    def __init__(
        self,
        d_sae: int,
        cfg: FeatureBuildConfig,
        *,
        features: Tensor | None = None,
        cooccurrence: bool | None = None,
    ) -> None:
        self.cfg = cfg
        self.features = torch.arange(d_sae) if features is None else features.long()
        n, k, m, w = len(self.features), cfg.top_k, cfg.n_samples, cfg.window
        want_cooc = cfg.cooccurrence if cooccurrence is None else cooccurrence
        self.n_tokens = 0
        self.batches = 0
        self.n_fires = torch.zeros(n, dtype=torch.long)
        self.act_sum = torch.zeros(n, dtype=torch.float64)
        self.hist = torch.zeros(n, cfg.hist_bins, dtype=torch.long)
        self.hist_edges = torch.logspace(
            math.log10(cfg.hist_min), math.log10(cfg.hist_max), cfg.hist_bins + 1, dtype=torch.float64
        )
        self._log_edges = self.hist_edges[1:-1].log().float()
        self.top_key = torch.full((n, k), -1, dtype=torch.long)
        self.top_tokens = torch.full((n, k, w), -1, dtype=torch.long)
        self.top_acts = torch.zeros(n, k, w)
        self.sample_key = torch.full((n, m), -1, dtype=torch.long)
        self.sample_index = torch.full((n, m), -1, dtype=torch.long)
        self.sample_val = torch.zeros(n, m)
        self.sample_tokens = torch.full((n, m, w), -1, dtype=torch.long)
        self.sample_acts = torch.zeros(n, m, w)
        self.loss_sum = torch.zeros(n, dtype=torch.float64) if cfg.loss_effect else None
        # co-occurrence counts of pairs (row <= column): the matrix is symmetric, so half the pairs are counted
        self._cooc_upper = (
            torch.zeros(n, n, dtype=torch.int32) if want_cooc and n <= cfg.max_cooc_features else None
        )

    # ---- one batch ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self,
        tokens: Int[Tensor, "batch pos"],
        acts: Float[Tensor, "batch pos feature"],
        loss_grad: Float[Tensor, "batch pos d_in"] | None = None,
        directions: Float[Tensor, "feature d_in"] | None = None,
    ) -> None:
        """Add one batch. ``acts`` holds this object's features only (in order). With ``loss_grad`` (the
        gradient of the summed loss at the hooked activation) and ``directions`` (what one unit of each
        feature adds there), the first-order loss increase of ablating each firing is accumulated.

        The firings are gathered with NumPy (its fancy indexing costs a fraction of torch's on CPU); the
        arithmetic that decides a stored value (logs, float64 sums, the loss projection) stays in torch."""
        b, p, n = acts.shape
        if n != len(self.features):
            raise ValueError(f"acts has {n} features, this accumulator holds {len(self.features)}")
        if tuple(tokens.shape) != (b, p):
            raise ValueError(f"tokens {tuple(tokens.shape)} do not match acts {tuple(acts.shape)}")
        if self.n_tokens + b * p > _MAX_TOKENS:
            raise ValueError(f"the streaming key supports at most {_MAX_TOKENS} tokens")
        dense = acts.detach().float().reshape(b * p, n).cpu().contiguous().numpy()  # token feature
        tok = tokens.detach().reshape(-1).cpu().contiguous().numpy()
        # everything below works on the firings only (SAEs are sparse: ~1% of entries)
        flat = np.flatnonzero(dense > 0)  # sorted by token, then feature
        t_idx, f_idx = flat // n, flat % n
        values_np = dense.reshape(-1)[flat]
        values, f_t = torch.from_numpy(values_np), torch.from_numpy(f_idx)
        self.n_fires += torch.bincount(f_t, minlength=n)
        self.act_sum.index_add_(0, f_t, values.double())
        if self.loss_sum is not None and loss_grad is not None and directions is not None:
            proj = _at_firings(loss_grad.detach().float().reshape(b * p, -1).cpu(), directions, t_idx, f_t)
            self.loss_sum.index_add_(0, f_t, proj.mul_(values).neg_().double())
        bins = torch.bucketize(values.log(), self._log_edges)
        hb = self.cfg.hist_bins
        self.hist.view(-1).add_(torch.bincount(f_t * hb + bins, minlength=n * hb))
        if self._cooc_upper is not None and self.n_tokens < self.cfg.cooc_max_tokens:
            self._cooccurrence(t_idx, f_idx, b * p)
        gidx = self.n_tokens + t_idx
        # activations > 0 as int32 bits are ordered like the floats; the low word prefers earlier tokens
        top_key = (values_np.view(np.int32).astype(np.int64) << 32) | (_LOW32 - gidx)
        self._merge("top", f_idx, top_key, t_idx, dense, tok, p)
        if self.cfg.n_samples:
            prio = sample_priority(torch.from_numpy(gidx), self.features[f_t], self.cfg.seed).numpy()
            self._merge("sample", f_idx, prio, t_idx, dense, tok, p)
        self.n_tokens += b * p
        self.batches += 1

    @property
    def cooc(self) -> Tensor | None:
        """How often each pair of features fired on the same token (symmetric; the diagonal: firing counts)."""
        u = self._cooc_upper
        if u is None:
            return None
        full = u.T.contiguous()  # the lower triangle; contiguous first: adding a transposed view is 6x slower
        full.add_(u)
        full.diagonal().sub_(u.diagonal())  # counted twice above
        return full

    @cooc.setter
    def cooc(self, full: Tensor | None) -> None:
        self._cooc_upper = None if full is None else full.triu()

    def _cooccurrence(self, t_idx: np.ndarray, f_idx: np.ndarray, n_tok: int) -> None:
        """Count every pair of features firing on the same token (firings are grouped by token, features
        ascending within a token), each unordered pair once (row < column), all of a batch's pairs in one
        vectorised pass. The diagonal is each feature's firing count over the tokens counted
        (``cfg.cooc_max_tokens``)."""
        upper = self._cooc_upper
        if len(t_idx) == 0 or upper is None:
            return
        n = len(self.features)
        upper.diagonal().add_(torch.from_numpy(np.bincount(f_idx, minlength=n)).to(upper.dtype))
        # each firing pairs with the later firings of its token: the one at rank r of a token with c firings
        # has c - 1 - r partners, the next ones in order (pair keys a * n + b in int32 where n * n fits)
        counts = np.bincount(t_idx, minlength=n_tok)
        start = np.cumsum(counts) - counts
        partners = (start + counts)[t_idx] - 1 - np.arange(len(t_idx))
        total = int(partners.sum())
        if total == 0:
            return
        first = np.repeat(np.arange(len(t_idx)), partners)
        offset = np.arange(total) - np.repeat(np.cumsum(partners) - partners, partners) + 1
        key_type = np.int32 if n * n < 2**31 else np.int64
        ids = f_idx.astype(key_type)
        pairs = torch.from_numpy(ids[first] * key_type(n) + ids[first + offset])
        upper.view(-1).index_add_(0, pairs, torch.ones(total, dtype=upper.dtype))

    def _windows(
        self, dense: np.ndarray, feat: np.ndarray, local: np.ndarray, tokens: np.ndarray, p: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token windows [.., window] around batch-local token ``local`` and the feature's activations there
        (``dense`` [token feature], ``tokens`` the batch's ids, flat)."""
        offs = np.arange(-self.cfg.window_left, self.cfg.window_right + 1)
        seq, pos = local // p, local % p
        q = pos[:, None] + offs
        valid = (q >= 0) & (q < p)
        flat_tok = seq[:, None] * p + q.clip(0, p - 1)
        win_tok = np.where(valid, tokens[flat_tok], -1)
        n = dense.shape[1]
        win_act = np.where(valid, dense.reshape(-1)[flat_tok * n + feat[:, None]], np.float32(0.0))
        return win_tok, win_act

    def _merge(
        self,
        which: str,
        f_idx: np.ndarray,
        key: np.ndarray,
        t_idx: np.ndarray,
        dense: np.ndarray,
        tokens: np.ndarray,
        p: int,
    ) -> None:
        """Keep, per feature, the entries with the largest keys among the kept ones and this batch's (a
        tie: the kept entry, then the earlier token). Only the features that have a candidate beating their
        current k-th best are touched. The kept rows are sorted already, so only the candidates are sorted
        (by row, then key); each one's place in its row is its rank among the row's candidates plus the kept
        entries at least as large, and the kept entries fill the places left, in their order."""
        table = getattr(self, f"{which}_key").numpy()  # feature k (-1: empty); a view of the tensor
        n_feat, k = table.shape
        cand = key > table[:, -1][f_idx]
        f_c, key_c, t_c = f_idx[cand], key[cand], t_idx[cand]
        if len(key_c) == 0:
            return
        present = np.zeros(n_feat, dtype=bool)
        present[f_c] = True
        rows = np.flatnonzero(present)  # the features to update, sorted
        nr = len(rows)
        row_c = (np.cumsum(present) - 1)[f_c]
        order = torch.argsort(torch.from_numpy(key_c), descending=True, stable=True).numpy()
        order = order[np.argsort(row_c[order].astype(np.int16 if nr < 1 << 15 else np.int64), kind="stable")]
        f_c, key_c, t_c, row_c = f_c[order], key_c[order], t_c[order], row_c[order]
        group = np.bincount(row_c, minlength=nr)
        c_rank = np.arange(len(row_c)) - (np.cumsum(group) - group)[row_c]  # rank within the row
        old = table[rows]  # nr k, best first
        place = c_rank + (old[row_c] >= key_c[:, None]).sum(1)
        enters = place < k
        slot = np.full((nr, k), -1, dtype=np.int64)  # >= 0: the candidate at that place
        slot[row_c[enters], place[enters]] = np.flatnonzero(enters)
        is_new = slot >= 0
        old_rank = np.cumsum(~is_new, axis=1) - 1  # the kept entries, in order, fill the other places
        old_slot = (rows[:, None] * k + np.where(is_new, 0, old_rank)).reshape(-1)
        src = slot.reshape(-1)
        new_at = np.flatnonzero(src >= 0)
        new_c = src[new_at]
        w = self.cfg.window
        toks = getattr(self, f"{which}_tokens").numpy()
        acts = getattr(self, f"{which}_acts").numpy()
        # the kept entries move within their rows; windows are cut for the new entries only
        win_tok, win_act = self._windows(dense, f_c[new_c], t_c[new_c], tokens, p)
        kept_tok, kept_act = toks.reshape(-1, w)[old_slot], acts.reshape(-1, w)[old_slot]
        kept_tok[new_at], kept_act[new_at] = win_tok, win_act
        toks[rows], acts[rows] = kept_tok.reshape(nr, k, w), kept_act.reshape(nr, k, w)
        new_key = table.reshape(-1)[old_slot]
        new_key[new_at] = key_c[new_c]
        new_key = new_key.reshape(nr, k)
        table[rows] = new_key
        if which == "sample":
            val = self.sample_val.numpy().reshape(-1)[old_slot]
            val[new_at] = dense.reshape(-1)[t_c[new_c] * dense.shape[1] + f_c[new_c]]
            index = self.sample_index.numpy().reshape(-1)[old_slot]
            index[new_at] = self.n_tokens + t_c[new_c]
            self.sample_val.numpy()[rows] = val.reshape(nr, k)
            self.sample_index.numpy()[rows] = np.where(new_key >= 0, index.reshape(nr, k), -1)

    # ---- results and checkpoints -------------------------------------------------------------
    def result(self) -> FeatureStats:
        valid = self.top_key >= 0
        top_val = torch.where(valid, (self.top_key >> 32).int().view(torch.float32), 0.0)
        top_index = torch.where(valid, _LOW32 - (self.top_key & _LOW32), -1)
        svalid = self.sample_key >= 0
        return FeatureStats(
            features=self.features,
            n_tokens=self.n_tokens,
            n_fires=self.n_fires.clone(),
            act_sum=self.act_sum.clone(),
            hist=self.hist.clone(),
            hist_edges=self.hist_edges,
            top_val=top_val,
            top_index=top_index,
            top_tokens=self.top_tokens.clone(),
            top_acts=self.top_acts.clone(),
            sample_val=torch.where(svalid, self.sample_val, 0.0),
            sample_index=torch.where(svalid, self.sample_index, -1),
            sample_tokens=self.sample_tokens.clone(),
            sample_acts=self.sample_acts.clone(),
            loss_sum=None if self.loss_sum is None else self.loss_sum.clone(),
            cooc=self.cooc,
        )

    _STATE = (
        "features",
        "n_fires",
        "act_sum",
        "hist",
        "top_key",
        "top_tokens",
        "top_acts",
        "sample_key",
        "sample_index",
        "sample_val",
        "sample_tokens",
        "sample_acts",
        "loss_sum",
        "cooc",
    )

    def state_dict(self) -> dict[str, Tensor]:
        state = {k: v for k in self._STATE if (v := getattr(self, k)) is not None}
        state["counters"] = torch.tensor([self.n_tokens, self.batches])
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not torch.equal(state["features"], self.features):
            raise ValueError("checkpoint holds a different feature range")
        for k in self._STATE:
            if (k in state) != (getattr(self, k) is not None):
                raise ValueError(f"checkpoint and config disagree about {k!r}")
            if k in state:
                setattr(self, k, state[k].clone())
        self.n_tokens, self.batches = (int(v) for v in state["counters"])
