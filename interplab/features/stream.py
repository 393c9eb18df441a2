"""`StreamingFeatureStats`: per-feature statistics accumulated over batches of activations, all features at once.

Every statistic is exact and independent of how the corpus is cut into batches: counts and sums add up,
the histogram has fixed log-spaced edges, the top-k contexts are selected by an integer key (activation
bits, then the earlier token wins ties), and the sampled contexts by a deterministic hash of (token,
feature) ("bottom-k" sampling: a uniform sample without replacement of the feature's firings).

>>> stats = StreamingFeatureStats(d_sae=8, cfg=FeatureBuildConfig(top_k=3))
>>> stats.update(tokens, acts)          # tokens [batch pos], acts [batch pos d_sae]   # doctest: +SKIP
>>> result = stats.result()             # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.features.config import FeatureBuildConfig

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

    def save(self, path) -> None:
        """Write every tensor to one safetensors file (exact inverse: `FeatureStats.load`)."""
        from interplab.io import save_tensors

        tensors = {
            f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)
        }
        save_tensors(path, tensors, metadata={"n_tokens": str(self.n_tokens)})

    @classmethod
    def load(cls, path) -> FeatureStats:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            n_tokens = int(f.metadata()["n_tokens"])
        names = [f.name for f in fields(cls)]
        return cls(**{n: data.get(n) for n in names if n != "n_tokens"}, n_tokens=n_tokens)


def sample_priority(index: Tensor, feature: Tensor, seed: int) -> Tensor:
    """A deterministic pseudo-random non-negative int63 per (token index, feature) pair (splitmix64 steps)."""
    x = index * 0x9E3779B1 + feature * 0x85EBCA77 + (seed + 1) * 0xC2B2AE3D
    for mult in (0x4CF5AD432745937F, 0x2545F4914F6CDD1D):
        x = x ^ (x >> 31)
        x = x * (mult - (1 << 64) if mult >= 1 << 63 else mult)
    return (x ^ (x >> 29)) & ((1 << 62) - 1)


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
        self.cooc = torch.zeros(n, n, dtype=torch.long) if want_cooc and n <= cfg.max_cooc_features else None

    # ---- one batch ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self,
        tokens: Int[Tensor, "batch pos"],
        acts: Float[Tensor, "batch pos feature"],
        loss_effects: Float[Tensor, "batch pos feature"] | None = None,
    ) -> None:
        """Add one batch. ``acts`` holds this object's features only (in order); ``loss_effects`` is the
        estimated loss increase of ablating each firing (zero where a feature does not fire)."""
        b, p, n = acts.shape
        if n != len(self.features):
            raise ValueError(f"acts has {n} features, this accumulator holds {len(self.features)}")
        if tuple(tokens.shape) != (b, p):
            raise ValueError(f"tokens {tuple(tokens.shape)} do not match acts {tuple(acts.shape)}")
        if self.n_tokens + b * p > _MAX_TOKENS:
            raise ValueError(f"the streaming key supports at most {_MAX_TOKENS} tokens")
        acts_t = acts.detach().float().reshape(b * p, n).T.contiguous()  # feature token
        fires = acts_t > 0
        self.n_fires += fires.sum(1)
        self.act_sum += acts_t.sum(1, dtype=torch.float64)
        if self.loss_sum is not None and loss_effects is not None:
            self.loss_sum += loss_effects.detach().reshape(b * p, n).sum(0, dtype=torch.float64)
        f_idx, t_idx = fires.nonzero(as_tuple=True)
        values = acts_t[f_idx, t_idx]
        self._histogram(f_idx, values)
        if self.cooc is not None:
            self._cooccurrence(f_idx, t_idx, b * p)
        self._top(acts_t, fires, tokens, p)
        self._samples(acts_t, f_idx, t_idx, values, tokens, p)
        self.n_tokens += b * p
        self.batches += 1

    def _histogram(self, f_idx: Tensor, values: Tensor) -> None:
        bins = torch.bucketize(values.log(), self._log_edges)
        flat = f_idx * self.cfg.hist_bins + bins
        self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def _cooccurrence(self, f_idx: Tensor, t_idx: Tensor, n_tok: int) -> None:
        n = len(self.features)
        ind = torch.sparse_coo_tensor(
            torch.stack([t_idx, f_idx]), torch.ones(len(f_idx)), (n_tok, n), check_invariants=False
        ).coalesce()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            pairs = torch.sparse.mm(ind.t().coalesce(), ind).coalesce()
        i, j = pairs.indices()
        self.cooc.view(-1).index_add_(0, i * n + j, pairs.values().round().long())

    def _windows(
        self, acts_t: Tensor, feat: Tensor, index: Tensor, tokens: Tensor, p: int
    ) -> tuple[Tensor, Tensor]:
        """Token windows [.., window] around batch-local token ``index`` and the feature's activations there."""
        offs = torch.arange(-self.cfg.window_left, self.cfg.window_right + 1)
        seq, pos = index // p, index % p
        q = pos[..., None] + offs
        valid = (q >= 0) & (q < p)
        qc = q.clamp(0, p - 1)
        flat_tok = seq[..., None] * p + qc
        win_tok = torch.where(valid, tokens.reshape(-1)[flat_tok], -1)
        win_act = torch.where(valid, acts_t[feat[..., None].expand_as(flat_tok), flat_tok], 0.0)
        return win_tok, win_act

    def _top(self, acts_t: Tensor, fires: Tensor, tokens: Tensor, p: int) -> None:
        n, n_tok = acts_t.shape
        k = min(self.cfg.top_k, n_tok)
        # activations > 0 as int32 bits are ordered like the floats; the low word prefers earlier tokens
        order = _LOW32 - (self.n_tokens + torch.arange(n_tok))
        key = (acts_t.view(torch.int32).long() << 32) | order
        key = torch.where(fires, key, -1)
        cand_key, cand_local = key.topk(k, dim=1)
        feat = torch.arange(n)[:, None].expand_as(cand_local)
        win_tok, win_act = self._windows(acts_t, feat, cand_local, tokens, p)
        all_key = torch.cat([self.top_key, cand_key], 1)
        best, pick = all_key.topk(self.cfg.top_k, dim=1)
        self.top_key = best
        self.top_tokens = torch.cat([self.top_tokens, win_tok], 1).gather(
            1, pick[..., None].expand(-1, -1, self.cfg.window)
        )
        self.top_acts = torch.cat([self.top_acts, win_act], 1).gather(
            1, pick[..., None].expand(-1, -1, self.cfg.window)
        )

    def _samples(
        self, acts_t: Tensor, f_idx: Tensor, t_idx: Tensor, values: Tensor, tokens: Tensor, p: int
    ) -> None:
        m = self.cfg.n_samples
        if m == 0 or len(f_idx) == 0:
            return
        n, n_tok = acts_t.shape
        gidx = self.n_tokens + t_idx
        prio = sample_priority(gidx, self.features[f_idx], self.cfg.seed)
        dense = torch.full((n, n_tok), -1, dtype=torch.long)
        dense[f_idx, t_idx] = prio
        k = min(m, n_tok)
        cand_key, cand_local = dense.topk(k, dim=1)
        feat = torch.arange(n)[:, None].expand_as(cand_local)
        win_tok, win_act = self._windows(acts_t, feat, cand_local, tokens, p)
        cand_val = acts_t.gather(1, cand_local)
        cand_index = torch.where(cand_key >= 0, self.n_tokens + cand_local, -1)
        all_key = torch.cat([self.sample_key, cand_key], 1)
        best, pick = all_key.topk(m, dim=1)
        self.sample_key = best
        self.sample_index = torch.cat([self.sample_index, cand_index], 1).gather(1, pick)
        self.sample_val = torch.cat([self.sample_val, cand_val], 1).gather(1, pick)
        w = self.cfg.window
        self.sample_tokens = torch.cat([self.sample_tokens, win_tok], 1).gather(
            1, pick[..., None].expand(-1, -1, w)
        )
        self.sample_acts = torch.cat([self.sample_acts, win_act], 1).gather(
            1, pick[..., None].expand(-1, -1, w)
        )

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
            cooc=None if self.cooc is None else self.cooc.clone(),
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
        state = {k: getattr(self, k) for k in self._STATE if getattr(self, k) is not None}
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
