"""Model diffing: a crosscoder between two planted "checkpoints" that share some features, lose some and
gain some classifies each correctly by relative decoder norm; the formation report is linked; results save."""

import json

import pytest
import torch

from interplab import runs
from interplab.sae.crosscoder import (
    Crosscoder,
    CrosscoderConfig,
    CrosscoderTrainConfig,
    shuffled_batches,
    train_crosscoder,
)
from interplab.sae.diffing import DiffResult, classify, formation_link, relative_norms


def planted_pair(n_tokens: int, d=24, n_shared=8, n_lost=4, n_new=4, seed=0):
    """Activations of "before" and "after" on the same tokens: shared features write the same direction into
    both, lost ones only into before, new ones only into after."""
    g = torch.Generator().manual_seed(seed)
    n = n_shared + n_lost + n_new
    dirs = torch.linalg.qr(torch.randn(d, d, generator=g))[0].T[:n]
    on = (torch.rand(n_tokens, n, generator=g) < 1.5 / n).float() * (1 + torch.rand(n_tokens, n, generator=g))
    before_mask = torch.tensor([1.0] * (n_shared + n_lost) + [0.0] * n_new)
    after_mask = torch.tensor([1.0] * n_shared + [0.0] * n_lost + [1.0] * n_new)
    x = torch.stack([(on * before_mask) @ dirs, (on * after_mask) @ dirs], dim=1)
    truth = ["shared"] * n_shared + ["lost"] * n_lost + ["new"] * n_new
    return x, dirs, truth


def test_classify_thresholds():
    rel = torch.tensor([0.0, 0.05, 0.2, 0.5, 0.75, 0.95, 1.0, float("nan"), 0.5])
    alive = torch.tensor([True] * 8 + [False])
    assert classify(rel, alive) == [
        "lost",
        "lost",
        "partial",
        "shared",
        "partial",
        "new",
        "new",
        "dead",
        "dead",
    ]


def test_relative_norm_is_hand_ratio():
    cc = Crosscoder(CrosscoderConfig(d_in=4, d_sae=3, k=1, sources=("a", "b")))
    with torch.no_grad():
        cc.W_dec.copy_(
            torch.tensor(
                [[[3.0, 4, 0, 0], [0, 0, 0, 0]], [[1, 0, 0, 0], [0, 1, 0, 0]], [[0, 0, 0, 0], [0, 2, 0, 0]]]
            )
        )
    torch.testing.assert_close(relative_norms(cc), torch.tensor([0.0, 0.5, 1.0]))
    r = DiffResult.from_crosscoder(cc)
    assert r.labels == ("lost", "shared", "new")
    torch.testing.assert_close(r.cosine, torch.tensor([0.0, 0.0, 0.0]))


def test_planted_diff_classified_correctly(tmp_path):
    x, dirs, truth = planted_pair(16_384)
    cc = Crosscoder(CrosscoderConfig(d_in=24, d_sae=48, k=2, sources=("before", "after")), seed=0)
    train_crosscoder(
        cc, shuffled_batches(x, 512), CrosscoderTrainConfig(steps=1200, lr=3e-3, dead_after_tokens=20_000)
    )
    with torch.no_grad():
        alive = (cc.encode(x[:4096]) > 0).any(0)
    result = DiffResult.from_crosscoder(cc, alive=alive)
    # match each planted feature to the live latent whose (summed) decoder direction is closest
    W = cc.W_dec.detach().sum(1)
    cos = dirs @ (W / W.norm(dim=-1, keepdim=True).clamp_min(1e-8)).T
    cos[:, ~alive] = -1
    best = cos.argmax(1)
    matched = (cos.max(1).values > 0.9).tolist()
    assert sum(matched) >= len(truth) - 1, cos.max(1).values  # at most one planted feature left unmatched
    got = [result.labels[i] for i in best.tolist()]
    for i, ok in enumerate(matched):
        if ok:
            assert got[i] == truth[i], (i, truth[i], got[i], float(result.relative_norm[best[i]]))
    c = result.counts()
    assert c["new"] >= 3 and c["lost"] >= 3 and c["shared"] >= 7
    paths = result.save(tmp_path / "diff")
    data = json.loads((tmp_path / "diff" / "diff.json").read_text())
    assert data["counts"] == c and len(data["relative_norm"]) == 48
    assert (tmp_path / "diff" / "relative_norm.html").is_file() and paths["md"]
    assert result.plot().data[0].type == "histogram"


def test_formation_link(tmp_path):
    assert formation_link(tmp_path, 10, 100) is None
    runs.write_json(tmp_path / runs.FORMATION_JSON, runs.Kind.FORMATION, {"formation_step": 50})
    link = formation_link(tmp_path, 10, 100)
    assert link["formation_step"] == 50 and link["brackets"] is True
    assert formation_link(tmp_path, 60, 100)["brackets"] is False
    r = DiffResult(torch.tensor([0.5]), torch.tensor([1.0]), ("shared",), "a", "b", formation=link)
    assert "formed at step 50, between them" in r.summary()


def test_labels_are_validated():
    r = DiffResult(torch.tensor([0.5]), torch.tensor([1.0]), ("shared",), "a", "b")
    with pytest.raises(ValueError, match="unknown label"):
        r.features("gone")
