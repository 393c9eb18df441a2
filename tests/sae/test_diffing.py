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
    formation_window,
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


N_SHARED = 6
ALPHABET = "".join(chr(0x100 + i) for i in range(2 ** (N_SHARED + 1)))
"""one character per combination of 7 binary attributes: bits 0-5 shared features, bit 6 a feature only the
later checkpoint writes"""


def _attributes(ch: str) -> list[int]:
    i = ord(ch) - 0x100
    return [(i >> bit) & 1 for bit in range(N_SHARED + 1)]


def planted_run(root):
    """A training run of two checkpoints (steps 100 and 200) of a one-layer model whose residual stream at
    blocks.0.hook_resid_pre is its token embedding, a sum of orthonormal feature directions, one per attribute
    the character has: both checkpoints write the 6 shared ones; step 200 adds v where bit 6 is set (a feature
    only the later checkpoint has). The corpus (a folder of files, the run's data
    source) draws each attribute on with probability 1/4, independently, so the features are sparse and
    independent of one another. A formation report puts the formation at step 150, between the checkpoints."""
    from interplab.data import CharTokenizer
    from interplab.model import ModelConfig, Positional, Transformer
    from interplab.train.checkpoint import save_checkpoint

    tok = CharTokenizer(ALPHABET)
    q = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)))[0].T
    shared, v = q[:N_SHARED], q[N_SHARED]
    run = root / "run"
    run.mkdir()
    corpus = root / "corpus"
    corpus.mkdir()
    rng = torch.Generator().manual_seed(0)
    weights = 2 ** torch.arange(N_SHARED + 1)
    for i in range(24):
        bits = (torch.rand(2400, N_SHARED + 1, generator=rng) < 0.25).long()
        (corpus / f"{i}.txt").write_text("".join(ALPHABET[j] for j in (bits @ weights).tolist()))
    config = {"model": {}, "data": {"source": str(corpus)}, "optim": {}, "steps": 200, "batch_size": 1}
    runs.write_json(run / runs.CONFIG, runs.Kind.TRAIN, config)
    for step in (100, 200):
        torch.manual_seed(0)
        model = Transformer(
            ModelConfig(d_model=32, n_layers=1, n_heads=2, d_vocab=tok.vocab_size, n_ctx=64, d_mlp=64,
                        positional=Positional.ROTARY)
        )  # fmt: skip
        with torch.no_grad():
            model.embed.W_E.zero_()
            for ch in ALPHABET:
                a = torch.tensor(_attributes(ch), dtype=torch.float32)
                model.embed.W_E[tok.stoi[ch]] = a[:N_SHARED] @ shared + (
                    a[N_SHARED] * v if step == 200 else 0
                )
        model.tokenizer = tok
        save_checkpoint(run, step, model, None, {"step": step})
    (run / runs.FORMATION).mkdir()
    runs.write_json(
        run / runs.FORMATION / runs.FORMATION_JSON, runs.Kind.FORMATION, {"formation_step": 150, "rows": []}
    )
    return run, {"shared": shared, "v": v}


def test_sae_diff_of_a_planted_run_finds_the_feature_only_the_later_checkpoint_has(
    tmp_path, monkeypatch, capsys
):
    """`interplab sae diff RUN --before 100 --after 200` on a run whose later checkpoint writes a feature the
    earlier does not: the latent reading the new direction is labelled new and fires only on the characters
    that carry it, the shared features' latents are shared, nothing is lost; the diff is linked to the run's
    formation report (step 150, between them) and saved with its table and picture where the run page lists
    it."""
    from typer.testing import CliRunner

    from interplab.cli.formation import print_diffs
    from interplab.cli.main import app
    from interplab.web.run_page import diff_view

    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path / "cache"))
    run, dirs = planted_run(tmp_path)
    # what the formation report points to: the checkpoints either side of its step, and the command
    assert formation_window(run) == (100, 200) and formation_window(run, 250) is None
    print_diffs(run, 150)
    assert f"sae diff {run} --before 100 --after 200" in " ".join(capsys.readouterr().out.split())
    args = ["sae", "diff", str(run), "--before", "100", "--after", "200", "--hook", "blocks.0.hook_resid_pre"]
    small = ["--expansion", "1", "--k", "2", "--tokens", "16384", "--steps", "800", "--batch-size", "256"]
    res = CliRunner().invoke(app, [*args, *small, "--no-features"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    folder = run / runs.DIFFS / "step_000100-step_000200"
    assert "the induction head formed at step 150, between them" in " ".join(res.output.split())
    assert runs.detect(folder) is runs.Kind.MODEL_DIFF
    assert (folder / runs.DIFF_TABLE).is_file() and (folder / "relative_norm.html").is_file()
    diff = diff_from_folder(folder)
    cc = load_crosscoder(folder / runs.CROSSCODER_DIR)
    W = cc.W_dec.detach()  # [d_sae, 2 sources, d_in]

    def best(direction, side):
        cos = (W[:, side] @ direction) / W[:, side].norm(dim=-1).clamp_min(1e-8)
        return int(cos.argmax()), float(cos.max())

    new, cos_new = best(dirs["v"], 1)
    assert cos_new > 0.99 and diff.labels[new] == "new", (cos_new, diff.labels[new])
    assert float(diff.relative_norm[new]) > 0.95 and diff.features("lost") == []
    found = [best(d, 0) for d in dirs["shared"]]
    assert sum(c > 0.9 for _, c in found) >= N_SHARED - 1, found  # at most one shared feature missed
    for i, c in found:
        if c > 0.9:
            assert diff.labels[i] == "shared", (c, diff.labels[i], float(diff.relative_norm[i]))
    # the new latent fires where the later checkpoint writes v: on the characters with c = 1, only there
    examples = diff.examples[new]
    assert len(examples) == 5 and all(_attributes(e["token"])[N_SHARED] == 1 for e in examples), examples
    data = json.loads((folder / runs.DIFF_JSON).read_text())
    assert data["kind"] == "model_diff" and new in data["features"]["new"]
    assert data["formation"]["formation_step"] == 150 and data["formation"]["brackets"] is True
    # the run page lists it beside the formation report, the latents leaning new first
    view = diff_view(folder / runs.DIFF_JSON, run, tmp_path)
    assert (
        view["counts"]["new"] >= 1 and view["brackets"] and new in [x["latent"] for x in view["latents"][:3]]
    )
    # and the formation command lists it, with its counts and where it lies against the formation
    print_diffs(run, 150)
    shown = " ".join(capsys.readouterr().out.split())
    assert "model diff step_000100-step_000200: a model diff between two checkpoints" in shown, shown
    assert "the formation (step 150) between them" in shown and "--before 100" not in shown
    assert runs.TrainRun.open(run).diffs == {folder.name: folder}
    assert runs.open_dictionary(folder).reads == (
        "step_100:blocks.0.hook_resid_pre",
        "step_200:blocks.0.hook_resid_pre",
    )
