import pytest
import torch

from interplab.analysis.ablation import mean_ablation, resample_ablation, zero_ablation
from interplab.analysis.probes import ProbeConfig, collect_activations, train_probe
from interplab.analysis.steering import mean_difference, steering_hook
from tests.analysis.conftest import make_model


def _cache(model, tokens, *names):
    return model.run_with_cache(tokens, list(names))[1]


def test_zero_ablation_of_heads_and_positions(model):
    tokens = torch.randint(0, 50, (2, 6))
    site = "blocks.0.attn.hook_z"
    cache = _cache(model, tokens, site)
    with model.hooks([zero_ablation(site, heads=[1, 3], positions=[2])]):
        z = _cache(model, tokens, site)[site]
    assert torch.all(z[:, 2, [1, 3]] == 0)
    torch.testing.assert_close(z[:, :, [0, 2]], cache[site][:, :, [0, 2]])
    torch.testing.assert_close(z[:, [0, 1, 3, 4, 5]], cache[site][:, [0, 1, 3, 4, 5]])
    # zeroing a head's z equals removing its W_O contribution
    logits = model.run_with_hooks(tokens, [zero_ablation(site, heads=[1])])
    with torch.no_grad():
        saved = model.blocks[0].attn.W_O[1].clone()
        model.blocks[0].attn.W_O[1].zero_()
        expected = model(tokens)
        model.blocks[0].attn.W_O[1].copy_(saved)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_mean_and_resample_ablation_compose(model):
    tokens, reference = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (5, 6))
    post, resid = "blocks.1.mlp.hook_post", "blocks.0.hook_resid_post"
    ref = _cache(model, reference, post, resid)
    hooks = [
        mean_ablation(post, ref[post], neurons=[0, 7]),
        resample_ablation(resid, ref[resid], positions=[4], seed=3),
        zero_ablation(post, neurons=[7]),
    ]  # later hooks at a site see the earlier ones' output
    cache = model.run_with_cache(tokens, [post, resid], fwd_hooks=hooks)[1]
    torch.testing.assert_close(cache[post][..., 0], ref[post][..., 0].mean().expand(2, 6))
    assert torch.all(cache[post][..., 7] == 0)
    rows = [any(torch.equal(cache[resid][b, 4], ref[resid][r, 4]) for r in range(5)) for b in range(2)]
    assert all(rows)
    per_pos = mean_ablation(post, ref[post], per_position=True, mask=torch.tensor([True, False] * 3)[:, None])
    out = model.run_with_cache(tokens, [post], fwd_hooks=[per_pos])[1][post]
    torch.testing.assert_close(out[:, 0], ref[post][:, 0].mean(0).expand(2, -1))


def test_ablation_errors(model):
    tokens = torch.randint(0, 50, (2, 6))
    with pytest.raises(ValueError, match="unknown head index 4"):
        model.run_with_hooks(tokens, [zero_ablation("blocks.0.attn.hook_z", heads=[4])])
    with pytest.raises(ValueError, match="no head dimension"):
        model.run_with_hooks(tokens, [zero_ablation("blocks.0.hook_resid_pre", heads=[0])])
    with pytest.raises(ValueError, match="does not broadcast"):
        model.run_with_hooks(tokens, [zero_ablation("blocks.0.hook_resid_pre", mask=torch.ones(3, 3))])


def test_steering_add_subtract_and_project_out(model):
    tokens_a, tokens_b = torch.randint(0, 25, (6, 5)), torch.randint(25, 50, (6, 5))
    site = "blocks.1.hook_resid_pre"
    vec = mean_difference(model, tokens_a, tokens_b, site)
    assert vec.projections_a.mean() > vec.projections_b.mean()
    out = _cache(model, tokens_b, site)[site]
    with model.hooks([vec.hook(coefficient=1.0)]):
        steered = _cache(model, tokens_b, site)[site]
    torch.testing.assert_close(steered, out + vec.vector)
    with model.hooks([steering_hook(site, vec.vector, coefficient=-2.0, positions=[-1])]):
        steered = _cache(model, tokens_b, site)[site]
    torch.testing.assert_close(steered[:, -1], out[:, -1] - 2 * vec.vector)
    torch.testing.assert_close(steered[:, :-1], out[:, :-1])
    with model.hooks([vec.hook(mode="project_out")]):
        projected = _cache(model, tokens_b, site)[site]
    torch.testing.assert_close(projected @ (vec.vector / vec.norm), torch.zeros(6, 5), atol=1e-5, rtol=0)


def test_probes_recover_planted_signal(tmp_path):
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(400, 16, generator=g)
    w = torch.randn(16, generator=g)
    labels = (acts @ w > 0).long()
    probe = train_probe(acts, labels, ProbeConfig(kind="logistic"))
    assert probe.test_score > 0.9 and probe.n_test == 80
    assert torch.nn.functional.cosine_similarity(probe.direction(), w, dim=0) > 0.9
    target = acts @ w + 0.01 * torch.randn(400, generator=g)
    linear = train_probe(acts, target, ProbeConfig(kind="linear"))
    assert linear.test_score > 0.99
    shuffled = train_probe(acts, target[torch.randperm(400, generator=g)], ProbeConfig(kind="linear"))
    assert shuffled.test_score < 0.2
    probe.save(tmp_path / "probe.html")
    with pytest.raises(ValueError, match="test_fraction"):
        ProbeConfig(test_fraction=1.5)
    with pytest.raises(ValueError, match="400 activation rows but 3 labels"):
        train_probe(acts, labels[:3])


def test_probe_on_model_activations_reads_the_current_token():
    model = make_model()
    tokens = torch.randint(0, 50, (60, 8))
    acts = collect_activations(model, tokens, "blocks.0.hook_resid_pre")
    assert acts.shape == (480, 32)
    side = (
        model.W_E.detach() @ torch.randn(32, generator=torch.Generator().manual_seed(2))
    ) > 0  # a planted split
    labels = side[tokens.reshape(-1)].long()
    assert train_probe(acts, labels).test_score > 0.8
    last = collect_activations(model, tokens, ("resid_post", 1), positions=-1)
    assert last.shape == (60, 32)
