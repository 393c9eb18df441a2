"""LogIX 0.1.1's LoGra per-example projected gradients equal interplab's `factored_grads` with the same
projection matrices (LogIX's LoRA encoder ``A`` and decoder ``C``, handed over as files; biases left out as LogIX
does), and its K-FAC influence equals interplab's, raw and in the LoGra space. Skips with the reason unless the
peer is there (INTERPLAB_LOGIX_PYTHON or .peers/logix, built by ``bash scripts/peers.sh logix``; not in CI's peer
set, so it skips there too)."""

from __future__ import annotations

import torch

from interplab.data_attribution.factored import factored_grads
from interplab.data_attribution.kfac import EKFAC, ekfac_influence
from tests.kronfluence_peer import per_example_ce, to_interplab, trained_mlp, write_problem
from tests.logix_peer import logra_projector, run_logix, write_projection
from tests.peers import peer_env, peer_python


def test_logra_features_equal_factored_grads(tmp_path):
    python = peer_python("logix")
    model, (x, y), (xq, yq) = trained_mlp([8, 6, 5, 3], n_train=40, n_query=5, steps=50)
    write_problem(tmp_path, model, (x, y), (xq, yq), activation="tanh", damping=1e-3, batch_size=16)
    proj, mats = logra_projector(model, rank=4, seed=0)
    write_projection(tmp_path, mats)
    raw, report = run_logix(python, tmp_path, ["logra"], env=peer_env(), timeout=600)
    assert report["version"] == "0.1.1"
    ours = factored_grads(model, per_example_ce, (x, y), proj)
    theirs = raw["logra"]
    assert ours.shape == theirs.shape == (40, proj.dim)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-6 * float(ours.abs().max()))
    # the projection matters: another seed's matrices give other features
    other, _ = logra_projector(model, rank=4, seed=1)
    assert not torch.allclose(
        factored_grads(model, per_example_ce, (x, y), other), theirs.to(ours.dtype), atol=1e-3
    )


def test_kfac_influence_equals_logix_raw_and_in_the_logra_space(tmp_path):
    """LogIX's K-FAC influence (its covariances of layer inputs and output gradients, eigenvalues the products
    of theirs, absolute damping) is interplab's `EKFAC.fit(corrected=False)` + `ekfac_influence` over the same
    features: raw weight gradients (no biases, as LogIX logs) and LoGra's projected ones."""
    python = peer_python("logix")
    model, (x, y), (xq, yq) = trained_mlp([8, 6, 5, 3], n_train=40, n_query=5, steps=50)
    write_problem(tmp_path, model, (x, y), (xq, yq), activation="tanh", damping=1e-3, batch_size=16)
    proj, mats = logra_projector(model, rank=4, seed=0)
    raw_proj, _ = logra_projector(model, rank=None)
    write_projection(tmp_path, mats)
    got, _ = run_logix(python, tmp_path, ["logra_influence", "influence"], env=peer_env(), timeout=600)

    def influence(p, corrected: bool) -> torch.Tensor:
        curv = EKFAC.fit(model, per_example_ce, (x, y), p, corrected=corrected)
        train, query = (factored_grads(model, per_example_ce, e, p) for e in ((x, y), (xq, yq)))
        return ekfac_influence(curv, train, query, damping=1e-3, relative_damping=False).double()

    for job, p in (("influence", raw_proj), ("logra_influence", proj)):
        ours, theirs = influence(p, corrected=False), to_interplab(got[job], len(y))
        assert ours.shape == theirs.shape == (5, 40)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6 * float(ours.abs().max()))
        # the eigenvalue correction changes the scores (EK-FAC is not K-FAC on this model)
        assert not torch.allclose(influence(p, corrected=True), theirs, rtol=1e-3, atol=0)
