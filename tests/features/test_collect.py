"""Feature statistics: planted ground truth, streaming = brute force, batching invariance, loss effects."""

from __future__ import annotations

import pytest
import torch

from interplab.features import FeatureBuildConfig, collect_features
from interplab.features.collect import (
    ablation_loss_effect,
    decoder_logit_effects,
    summed_ce_grad,
    top_logits,
)
from interplab.features.stream import StreamingFeatureStats
from tests.features.planted import HOOK, make_sae, planted_sae, tiny_model


def test_planted_feature_fires_exactly_on_its_token(model, tokens):
    sae = planted_sae(model, d_sae=12)
    cfg = FeatureBuildConfig(top_k=5, n_samples=6, window_left=3, window_right=2, batch_size=5)
    stats = collect_features(model, sae, tokens, cfg)
    counts = torch.bincount(tokens.flatten(), minlength=40)[:12]
    torch.testing.assert_close(stats.n_fires, counts)
    torch.testing.assert_close(stats.density, counts.double() / tokens.numel())
    for j in range(12):
        n = min(5, int(counts[j]))
        assert (stats.top_index[j, :n] >= 0).all() and (stats.top_index[j, n:] == -1).all()
        center = cfg.window_left
        # the token at the max position of every top context is j, and the max of the window is there
        assert (stats.top_tokens[j, :n, center] == j).all()
        torch.testing.assert_close(stats.top_acts[j, :n].max(-1).values, stats.top_acts[j, :n, center])
        flat = tokens.flatten()
        assert (flat[stats.top_index[j, :n]] == j).all()
        # the activation is the same on every occurrence: ties go to the earliest tokens
        torch.testing.assert_close(stats.top_index[j, :n], (flat == j).nonzero().flatten()[:n])
        m = min(6, int(counts[j]))
        assert (stats.sample_tokens[j, :m, center] == j).all()
        assert len(set(stats.sample_index[j, :m].tolist())) == m


def test_streaming_topk_equals_brute_force_sort(model, tokens):
    torch.manual_seed(3)
    sae = make_sae(32, 24)
    cfg = FeatureBuildConfig(
        top_k=7, n_samples=5, window_left=2, window_right=1, batch_size=3, loss_effect=False
    )
    stats = collect_features(model, sae, tokens, cfg)
    _, cache = model.run_with_cache(tokens, names=[HOOK])
    acts = sae.encode(cache[HOOK]).detach().reshape(-1, 24)
    n_tok = acts.shape[0]
    for f in range(24):
        col = acts[:, f]
        order = sorted(range(n_tok), key=lambda i: (-float(col[i]), i))
        order = [i for i in order if col[i] > 0][:7]
        assert stats.top_index[f, : len(order)].tolist() == order
        torch.testing.assert_close(stats.top_val[f, : len(order)], col[order])
        assert int(stats.n_fires[f]) == int((col > 0).sum())
        # histogram counts every firing once
        assert int(stats.hist[f].sum()) == int((col > 0).sum())
    fired = (acts > 0).float()
    torch.testing.assert_close(stats.cooc.long(), (fired.T @ fired).long())
    # windows hold the right tokens and activations
    seq, pos = stats.top_index[0, 0] // 16, stats.top_index[0, 0] % 16
    want = [int(tokens[seq, q]) if 0 <= q < 16 else -1 for q in range(int(pos) - 2, int(pos) + 2)]
    assert stats.top_tokens[0, 0].tolist() == want


def test_batching_does_not_change_anything(model, tokens):
    torch.manual_seed(3)
    sae = make_sae(32, 16)
    a = collect_features(model, sae, tokens, FeatureBuildConfig(batch_size=24, top_k=4, n_samples=4))
    b = collect_features(model, sae, tokens, FeatureBuildConfig(batch_size=5, top_k=4, n_samples=4))
    for name in ("n_fires", "hist", "top_index", "top_tokens", "sample_index", "sample_tokens", "cooc"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))
    torch.testing.assert_close(a.top_acts, b.top_acts)
    torch.testing.assert_close(a.loss_sum, b.loss_sum)
    # the co-occurrence of a feature with itself is its firing count
    torch.testing.assert_close(a.cooc.diagonal().long(), a.n_fires)


def test_feature_ranges_match_one_pass(model, tokens):
    torch.manual_seed(3)
    sae = make_sae(32, 16)
    cfg = FeatureBuildConfig(batch_size=8, top_k=4, n_samples=4, cooccurrence=False)
    full = collect_features(model, sae, tokens, cfg)
    part = collect_features(model, sae, tokens, cfg, features=torch.arange(5, 11))
    torch.testing.assert_close(part.top_index, full.top_index[5:11])
    torch.testing.assert_close(part.sample_index, full.sample_index[5:11])
    torch.testing.assert_close(part.hist, full.hist[5:11])


def test_resume_from_state_matches(model, tokens):
    torch.manual_seed(3)
    sae = make_sae(32, 16)
    cfg = FeatureBuildConfig(batch_size=4, top_k=4, n_samples=4)
    full = collect_features(model, sae, tokens, cfg)
    saved = {}

    class Stop(Exception):
        pass

    def checkpoint(state):
        saved.update({k: v.clone() for k, v in state.state_dict().items()})
        if state.batches == 3:
            raise Stop

    with pytest.raises(Stop):
        collect_features(
            model,
            sae,
            tokens,
            FeatureBuildConfig(batch_size=4, top_k=4, n_samples=4, checkpoint_every=1),
            checkpoint=checkpoint,
        )
    state = StreamingFeatureStats(16, cfg)
    state.load_state_dict(saved)
    resumed = collect_features(model, sae, tokens, cfg, state=state)
    for name in ("n_fires", "hist", "top_index", "top_acts", "sample_index", "loss_sum", "cooc"):
        torch.testing.assert_close(getattr(resumed, name), getattr(full, name))


def test_logit_effect_of_unembedding_direction_ranks_its_token_first(model):
    sae = make_sae(32, 5)
    with torch.no_grad():
        for f, u in enumerate([3, 17, 0, 39, 22]):
            sae.W_dec[f] = model.W_U[:, u]
    pos_v, pos_i, neg_v, neg_i = top_logits(decoder_logit_effects(model, sae), 4)
    assert pos_i[:, 0].tolist() == [3, 17, 0, 39, 22]
    assert (pos_v[:, 0] > pos_v[:, 1]).all() and (neg_v <= pos_v[:, -1:]).all()


def test_attribution_loss_effect_matches_exact_ablation_for_small_features():
    model = tiny_model()
    torch.manual_seed(5)
    sae = make_sae(32, 6)
    with torch.no_grad():
        sae.W_dec.mul_(1e-3)  # small decoder norms: the first-order estimate is accurate
    toks = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(2))
    stats = collect_features(model, sae, toks, FeatureBuildConfig(batch_size=2, top_k=2, n_samples=2))
    exact = torch.tensor([ablation_loss_effect(model, sae, toks, f) for f in range(6)], dtype=torch.float64)
    fired = stats.n_fires > 0
    assert fired.sum() >= 3
    torch.testing.assert_close(stats.loss_effect[fired], exact[fired], rtol=2e-2, atol=1e-7)


def test_sae_width_mismatch_is_refused(model, tokens):
    sae = make_sae(48, 8)
    with pytest.raises(ValueError, match="d_in=48"):
        collect_features(model, sae, tokens)
    bad = make_sae(32, 8, hook_name="blocks.5.hook_resid_pre")
    with pytest.raises(ValueError, match="1 layers"):
        collect_features(model, bad, tokens)


def test_summed_ce_grad_is_the_gradient_of_the_summed_next_token_loss():
    """softmax - one-hot equals autograd's gradient of the summed cross-entropy (in float64, the ground
    truth), also with logits far apart (probabilities underflow) and in bfloat16 (returned in that dtype)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 30, (4, 9), generator=g)
    for scale, dtype in ((1.0, torch.float32), (300.0, torch.float32), (1.0, torch.bfloat16)):
        logits = (torch.randn(4, 9, 30, generator=g) * scale).to(dtype)
        exact = logits.double().requires_grad_(True)
        loss = -torch.log_softmax(exact[:, :-1], -1).gather(-1, tokens[:, 1:, None]).sum()
        (want,) = torch.autograd.grad(loss, exact)
        got = summed_ce_grad(logits, tokens)
        assert got.dtype == dtype and got.shape == logits.shape
        assert torch.equal(got[:, -1], torch.zeros_like(got[:, -1]))  # the last position has no target
        tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(got.double(), want, **tol)
