"""bergson 2.5.1's projected per-example gradients equal interplab's `factored_grads` with bergson's own
projection matrices (handed back by its runner), and its dense per-layer preconditioned influence equals
interplab's `methods.influence` on the same features, block by block. Skips with the reason unless the peer is
there (INTERPLAB_BERGSON_PYTHON or .peers/bergson, built by ``bash scripts/peers.sh bergson``; not in CI's peer set,
so it skips there too)."""

from __future__ import annotations

import torch

from interplab.data_attribution.factored import factored_grads
from tests.bergson_peer import bergson_projector, blockwise_influence, run_bergson
from tests.kronfluence_peer import per_example_ce, trained_mlp, write_problem
from tests.peers import peer_env, peer_python


def test_features_and_influence_equal_bergson(tmp_path):
    python = peer_python("bergson")
    model, (x, y), (xq, yq) = trained_mlp([8, 6, 5, 3], n_train=40, n_query=5, steps=50)
    write_problem(tmp_path, model, (x, y), (xq, yq), activation="tanh", damping=1e-3, batch_size=16)
    got, report = run_bergson(
        python, tmp_path, ["features", "influence"], projection_dim=4, env=peer_env(), timeout=600
    )
    assert report["version"] == "2.5.1"
    proj = bergson_projector(model, got)
    ours = factored_grads(model, per_example_ce, (x, y), proj)
    assert ours.shape == got["features"].shape == (40, 3 * 16)
    torch.testing.assert_close(ours, got["features"], rtol=1e-4, atol=1e-6 * float(ours.abs().max()))
    query = factored_grads(model, per_example_ce, (xq, yq), proj)
    scores = blockwise_influence(ours, query, proj.shapes, damping=1e-3)
    theirs = -got["influence"] / len(y)  # bergson's q^T (H + c I)^-1 g_i in interplab's sign
    torch.testing.assert_close(scores, theirs, rtol=1e-3, atol=1e-5 * float(scores.abs().max()))
    # the preconditioning matters: plain dot products are other scores
    assert not torch.allclose(-(query.double() @ ours.double().T) / len(y), theirs, rtol=1e-2, atol=0)
