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
    load_crosscoder,
    shuffled_batches,
    train_crosscoder,
)
from interplab.sae.diffing import (
    LABELS,
    DiffResult,
    classify,
    diff_from_folder,
    formation_link,
    relative_norms,
)


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
    # where `interplab formation` writes it (RUN/formation/formation.json), which is found first
    (tmp_path / runs.FORMATION).mkdir()
    runs.write_json(
        tmp_path / runs.FORMATION / runs.FORMATION_JSON, runs.Kind.FORMATION, {"formation_step": 70}
    )
    assert formation_link(tmp_path, 60, 100)["formation_step"] == 70


def test_labels_are_validated():
    r = DiffResult(torch.tensor([0.5]), torch.tensor([1.0]), ("shared",), "a", "b")
    with pytest.raises(ValueError, match="unknown label"):
        r.features("gone")


def test_cli_diff_of_two_checkpoints_of_a_run_says_where_its_outputs_went(tmp_path, monkeypatch):
    """`interplab sae diff RUN --before --after` end to end on a tiny training run: a crosscoder between two
    of its checkpoints, every latent labelled, the files it names on disk, and bad steps refused."""
    from typer.testing import CliRunner

    from interplab.cli.main import app
    from interplab.train import train
    from tests.train.conftest import _tiny_config, write_corpus

    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    train(_tiny_config(write_corpus(tmp_path / "corpus"), steps=8), run)
    steps = sorted(int(p.name.split("_")[-1]) for p in (run / "checkpoints").iterdir() if p.is_dir())
    out = tmp_path / "diff"
    args = ["sae", "diff", str(run), "--before", str(steps[0]), "--after", str(steps[-1]), "--out", str(out)]
    res = CliRunner().invoke(
        app,
        [*args, "--expansion", "2", "--k", "4", "--tokens", "2048", "--steps", "30", "--batch-size", "128"],
    )
    assert res.exit_code == 0, res.output
    assert str(out / "diff.json") in res.output.replace("\n", "")
    back = diff_from_folder(out)
    assert len(back.labels) == 2 * 32 and set(back.labels) <= set(LABELS)
    doc = json.loads((out / "diff.json").read_text())
    assert doc["leaning_new"] == back.leaning_new() and len(doc["leaning_new"]) == 20
    first = back.examples[doc["leaning_new"][0]]
    assert 0 < len(first) <= 5 and first[0]["context"].endswith("]")
    assert [e["act"] for e in first] == sorted((e["act"] for e in first), reverse=True)
    # the latents' feature pages: one per latent, each side's decoder-norm share and label as the diff's
    from interplab.features.reader import FeatureReader

    assert str(out / "features.db") in res.output.replace("\n", "")
    with FeatureReader(out / "features.db") as r:
        cc_meta = r.meta()["crosscoder"]
        assert r.n_features() == 2 * 32 and cc_meta["sides"] == [f"step {steps[0]}", f"step {steps[-1]}"]
        side = {"lost": "A-only", "new": "B-only", "shared": "shared", "partial": "partial"}
        assert [
            side.get(lab, lab) for lab in classify(relative_norms(load_crosscoder(out / "crosscoder")))
        ] == cc_meta["labels"]
    # run again: the final checkpoint in out/train is resumed (no step trained again), the same diff
    assert (out / "train" / "checkpoints" / "step_000030").is_dir()
    again = CliRunner().invoke(
        app,
        [*args, "--expansion", "2", "--k", "4", "--tokens", "2048", "--steps", "30", "--batch-size", "128"],
    )
    assert again.exit_code == 0, again.output
    assert json.loads((out / "diff.json").read_text())["relative_norm"] == doc["relative_norm"]
    # without --out: into the run (RUN/diffs/step_A-step_B), which the run page lists
    small = ["--expansion", "2", "--k", "4", "--tokens", "2048", "--steps", "5", "--batch-size", "128"]
    res = CliRunner().invoke(app, [*args[:-2], *small])
    assert res.exit_code == 0, res.output
    folder = run / "diffs" / f"step_{steps[0]:06d}-step_{steps[-1]:06d}"
    assert (folder / "diff.json").is_file() and "on the run's page" in res.output
    bad = CliRunner().invoke(app, [*args[:3], "--before", "8", "--after", "0", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "earlier step" in bad.output
