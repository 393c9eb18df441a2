"""The loss-effect post-pass equals a direct computation (the feature zeroed in the SAE's reconstruction),
is stored per context, resumable, and never written by the build."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interplab.features import FeatureBuildConfig
from interplab.features import schema as S
from interplab.features.build import build_feature_db
from interplab.features.loss_effects import compute_loss_effects
from interplab.features.reader import FeatureReader
from tests.features.planted import planted_sae, tiny_model


@pytest.fixture
def built(tmp_path):
    model = tiny_model()
    sae = planted_sae(model, 12)
    tokens = torch.randint(0, 40, (16, 16), generator=torch.Generator().manual_seed(2))
    cfg = FeatureBuildConfig(top_k=4, n_samples=4, window_left=5, window_right=2, batch_size=8)
    build_feature_db(tmp_path / "f.db", model, sae, tokens, cfg)
    return tmp_path / "f.db", model, sae


def reference(model, sae, window: np.ndarray, feature: int) -> np.ndarray:
    """Per-token change of -log p(token_k | tokens_<k) when the feature is zeroed in the reconstruction."""
    valid = np.flatnonzero(window >= 0)
    lo, hi = valid[0], valid[-1] + 1
    toks = torch.tensor(window[lo:hi], dtype=torch.long)[None]

    def zero_feature(x, _site):
        acts = sae.encode(x)
        cut = acts.clone()
        cut[..., feature] = 0
        return x - (sae.decode(acts) - sae.decode(cut))

    with torch.no_grad():
        clean = F.cross_entropy(model(toks)[0, :-1], toks[0, 1:], reduction="none")
        hooked = model.run_with_hooks(toks, fwd_hooks=[(sae.cfg.hook_name, zero_feature)])
        removed = F.cross_entropy(hooked[0, :-1], toks[0, 1:], reduction="none")
    out = np.full(window.shape[0], np.nan, dtype=np.float32)
    out[lo + 1 : hi] = (removed - clean).numpy()
    return out


def test_loss_effects_equal_a_direct_computation(built):
    db, model, sae = built
    with FeatureReader(db) as r:
        assert not S.has_table(r.engine, S.context_loss)  # the build never writes them
        assert r.context_loss(0) == {}
    n = compute_loss_effects(db, model, sae, features=[0, 1, 2, 11])
    with FeatureReader(db) as r:
        assert n == sum(len(r.feature(f)["top"]) for f in (0, 1, 2, 11)) > 0
        checked = 0
        for f in (0, 1, 2, 11):
            losses = r.context_loss(f)
            for c in r.feature(f)["top"]:
                want = reference(model, sae, np.array(c["tokens"]), f)
                got = np.array([np.nan if v is None else v for v in losses[(0, c["rank"])]], dtype=np.float32)
                torch.testing.assert_close(
                    torch.from_numpy(got), torch.from_numpy(want), atol=1e-4, rtol=0, equal_nan=True
                )
                checked += 1
                assert np.isfinite(got).any()
        assert checked == n
        assert (
            max(
                np.nanmax(np.abs(reference(model, sae, np.array(c["tokens"]), 0)))
                for c in r.feature(0)["top"]
            )
            > 1e-3
        )
        assert r.context_loss(5) == {}  # not asked for
    assert compute_loss_effects(db, model, sae, features=[0, 1, 2, 11]) == 0  # resumable: nothing left
    assert compute_loss_effects(db, model, sae, features=[0], overwrite=True) > 0


def test_loss_effects_refuse_another_sae(built):
    db, model, _ = built
    with pytest.raises(ValueError, match="d_sae"):
        compute_loss_effects(db, model, planted_sae(model, 8))
