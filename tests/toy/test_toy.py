import pytest
import torch
from torch.testing import assert_close

from interplab.sae.recovery import Layout, feature_recovery
from interplab.toy import ToyConfig, ToyModel, analyze, phase_diagram, toy_sae, train_toy


def test_config_broadcasting_and_errors():
    cfg = ToyConfig(n_features=3, n_hidden=2, n_instances=2, feature_probability=[1.0, 0.1], importance=0.5)
    assert_close(cfg.probability_tensor(), torch.tensor([[1.0, 1.0, 1.0], [0.1, 0.1, 0.1]]))
    assert_close(cfg.importance_tensor(), torch.tensor([[1.0, 0.5, 0.25]] * 2))
    with pytest.raises(ValueError, match=r"feature_probability must be in \(0, 1\]"):
        ToyConfig(n_features=3, n_hidden=2, feature_probability=0.0)
    with pytest.raises(ValueError, match=r"importance has shape \(4,\)"):
        ToyConfig(n_features=3, n_hidden=2, importance=[1.0, 1, 1, 1])


def test_batched_equals_looped():
    """Training instances together = training each alone on the same data."""
    cfg = ToyConfig(n_features=4, n_hidden=2, n_instances=3, feature_probability=[1.0, 0.2, 0.05])
    model = ToyModel(cfg, seed=1)
    g = torch.Generator().manual_seed(0)
    data = [model.generate_batch(64, g) for _ in range(30)]
    singles = []
    for i in range(3):
        one = ToyModel(
            ToyConfig(
                n_features=4, n_hidden=2, feature_probability=cfg.probability_tensor()[i : i + 1].tolist()
            )
        )
        with torch.no_grad():
            one.W.copy_(model.W[i : i + 1])
        train_toy(one, steps=30, lr=1e-2, data=lambda s, i=i: data[s][:, i : i + 1])
        singles.append(one)
    train_toy(model, steps=30, lr=1e-2, data=lambda s: data[s])
    for i, one in enumerate(singles):
        assert_close(model.W[i : i + 1], one.W, rtol=1e-5, atol=1e-6)
        assert_close(model.b_final[i : i + 1], one.b_final, rtol=1e-5, atol=1e-6)


def test_dense_features_get_orthogonal_dimensions_sparse_ones_superpose():
    """Elhage et al.'s first result: with dense features the model keeps the m most important ones,
    orthogonally; with sparse features it packs all n into m dimensions."""
    cfg = ToyConfig(n_features=5, n_hidden=2, n_instances=2, feature_probability=[1.0, 0.03], importance=0.9)
    model = ToyModel(cfg, seed=0)
    train_toy(model, steps=1500, lr=1e-2)
    a = analyze(model)
    dense, sparse = a.norms[0], a.norms[1]
    assert (dense[:2] > 0.9).all() and (dense[2:] < 0.1).all()
    assert abs(float(a.gram[0, 0, 1])) < 0.05  # the two kept features are orthogonal
    assert (sparse > 0.5).sum() >= 4
    assert_close(a.total_capacity, torch.full((2,), 2.0), atol=0.05, rtol=0)  # capacity fills m = 2 dims
    assert (a.superposition[1] > 0.1).sum() >= 4 and (a.superposition[0, :2] < 0.01).all()


def test_dimensionality_by_construction():
    model = ToyModel(ToyConfig(n_features=3, n_hidden=2))
    with torch.no_grad():
        model.W.copy_(torch.tensor([[[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]]]))  # antipodal pair + a dedicated dim
    a = analyze(model)
    assert_close(a.dimensionality[0], torch.tensor([0.5, 0.5, 1.0]))
    assert_close(a.superposition[0], torch.tensor([1.0, 1.0, 0.0]))


def test_phase_diagram_corners(tmp_path):
    p = phase_diagram(torch.tensor([0.0, 0.99]), torch.tensor([0.2, 5.0]), steps=800, restarts=2)
    # dense: the more important feature wins the dimension; very sparse: both share it
    assert p.phase.tolist() == [[0, 1], [2, 2]]
    p.save(tmp_path)
    assert (tmp_path / "phase_diagram.html").exists()


@pytest.mark.parametrize(
    ("n", "m", "p", "seed"),
    [(12, 6, 0.03, 0), (40, 10, 0.1, 1), pytest.param(100, 20, 0.05, 2, marks=pytest.mark.slow)],
)
def test_sae_on_toy_hidden_layer_recovers_true_features(n, m, p, seed, tmp_path):
    """toy_sae's defaults (TopK, k = expected active count) recover the true directions at several sizes
    (k = 2x that count got 0.66-0.82 on 100 features in 20 dims)."""
    model = ToyModel(ToyConfig(n_features=n, n_hidden=m, feature_probability=p), seed=seed)
    train_toy(model, steps=1500, lr=1e-2, seed=seed)
    result = toy_sae(model, seed=seed)
    assert result.represented.sum() >= 0.8 * n
    assert result.sae.cfg.k == max(1, round(p * int(result.represented.sum())))
    assert result.recovery.fraction_recovered >= 0.9, result.recovery
    assert result.recovery.mean_max_cosine >= 0.97, result.recovery
    if n == 12:
        analyze(model).save(tmp_path)


def test_feature_recovery_takes_either_layout():
    """A toy model stores features as columns of W [m, n]; an SAE's W_dec as rows [d_sae, m]."""
    model = ToyModel(ToyConfig(n_features=7, n_hidden=3), seed=4)
    W = model.W.detach()[0]  # [3, 7]
    rows = feature_recovery(W.T, model.feature_directions(0))
    assert rows.mean_max_cosine == pytest.approx(1.0)
    cols = feature_recovery(W.T, W, true_layout="columns")
    assert_close(cols.max_cosine, rows.max_cosine)
    enc = feature_recovery(W, W, learned_layout=Layout.COLUMNS, true_layout=Layout.COLUMNS)
    assert_close(enc.max_cosine, rows.max_cosine)
    with pytest.raises(ValueError, match="layout 'columns'"):
        feature_recovery(W.T, W)  # [7, 3] rows against a [3, 7] read as rows: widths 3 vs 7


def test_toy_model_is_seeded():
    cfg = ToyConfig(n_features=5, n_hidden=2)
    assert torch.equal(ToyModel(cfg).W, ToyModel(cfg).W)
    assert not torch.equal(ToyModel(cfg, seed=0).W, ToyModel(cfg, seed=1).W)
