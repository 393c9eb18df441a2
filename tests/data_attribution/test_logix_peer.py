"""LogIX 0.1.1's LoGra per-example projected gradients equal interplab's `factored_grads` with the same
projection matrices (LogIX's LoRA encoder ``A`` and decoder ``C``, handed over as files; biases left out as LogIX
does). Skips with the reason unless the peer is there (INTERPLAB_LOGIX_PYTHON or .peers/logix, built by
``bash scripts/peers.sh logix``; not in CI's peer set, so it skips there too)."""

from __future__ import annotations

import torch

from interplab.data_attribution.factored import factored_grads
from tests.kronfluence_peer import per_example_ce, trained_mlp, write_problem
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
