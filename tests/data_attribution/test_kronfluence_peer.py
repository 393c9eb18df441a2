"""interplab's EK-FAC influence equals kronfluence 1.0.1's (its own venv, `tests.peers`) on the same MLP, data,
Fisher (empirical: the true labels) and absolute damping. Both fit per-layer (block-diagonal) Kronecker factors
``A = E[x x^T]`` (bias coordinate appended), ``S = E[g g^T]``, take their eigenbases and refit the eigenvalues
in them from per-example gradients, so the scores agree to float32 rounding (measured on this MLP: max difference
9e-8 of the largest score; K-FAC's uncorrected eigenvalues on the same bases are off by 0.35 of it). Skips with the reason unless the peer is there
(INTERPLAB_KRONFLUENCE_PYTHON or .peers/kronfluence, ``bash scripts/peers.sh kronfluence``)."""

from __future__ import annotations

import pytest
import torch

from interplab.data_attribution.factored import FactoredProjector, factored_grads, linear_sites
from interplab.data_attribution.kfac import EKFAC, ekfac_influence
from tests.kronfluence_peer import (
    interplab_ekfac,
    mlp,
    per_example_ce,
    run_kronfluence,
    to_interplab,
    trained_mlp,
    write_problem,
)
from tests.peers import peer_env, peer_python

DAMPING = 1e-3


def test_ekfac_influence_equals_kronfluence(tmp_path):
    python = peer_python("kronfluence")
    model, train, query = trained_mlp([6, 5, 4, 3], n_train=48, n_query=7, steps=100)
    write_problem(tmp_path, model, train, query, activation="tanh", damping=DAMPING, batch_size=16)
    raw, report = run_kronfluence(python, tmp_path, env=peer_env(), timeout=600)
    assert report["version"] == "1.0.1"
    theirs = to_interplab(raw, len(train[1]))
    ours = interplab_ekfac(model, train, query, damping=DAMPING)
    assert ours.shape == theirs.shape == (7, 48)
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale)
    assert float(torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1]) > 0.9999
    # the comparison sees the eigenvalue correction: K-FAC's eigenvalues (s_k a_j) on the same bases miss it
    proj = FactoredProjector(linear_sites(model), dim_in=10**9, dim_out=10**9)
    kfac = EKFAC.fit(model, per_example_ce, train, proj, corrected=False)
    feats = factored_grads(model, per_example_ce, train, proj)
    q = factored_grads(model, per_example_ce, query, proj)
    kfac_scores = ekfac_influence(kfac, feats, q, damping=DAMPING, relative_damping=False).double()
    assert float((kfac_scores - theirs).abs().max()) > 1e-2 * scale


def test_write_problem_refuses_unknown_settings(tmp_path):
    model, train, query = trained_mlp([6, 5, 4, 3], n_train=48, n_query=7, steps=100)
    with pytest.raises(ValueError, match="fisher must be 'empirical' or 'true', got 'exact'"):
        write_problem(tmp_path, model, train, query, activation="tanh", damping=DAMPING, fisher="exact")
    with pytest.raises(ValueError, match="activation must be one of"):
        mlp([3, 2], "gelu")
