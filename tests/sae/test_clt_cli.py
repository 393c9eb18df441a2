"""`interplab clt train|eval` end to end on a tiny model with a character tokenizer, also across the
checkpoints of a training run (one CLT per checkpoint in one run folder)."""

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from interplab.cli.common import command_hint
from interplab.cli.main import app
from interplab.data import CharTokenizer
from interplab.model import ModelConfig, Transformer
from interplab.runs import Kind, detect, open_run, write_json
from interplab.runs.openers import CLTTrainRun
from interplab.sae.clt import load_clt
from interplab.train.checkpoint import save_checkpoint

runner = CliRunner()


def _model(seed: int, tok: CharTokenizer) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(
        ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=tok.vocab_size, n_ctx=64, d_mlp=32)
    )
    model.tokenizer = tok
    return model


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path / "cache"))
    tok = CharTokenizer("abcdefgh \n")
    _model(0, tok).save(tmp_path / "model")
    run = tmp_path / "run"  # a training run with two checkpoints (different weights)
    run.mkdir()
    write_json(
        run / "config.json", Kind.TRAIN, {"model": {}, "data": {}, "optim": {}, "steps": 20, "batch_size": 1}
    )
    for step in (10, 20):
        save_checkpoint(run, step, _model(step, tok), None, {"step": step})
    rng = random.Random(0)
    (tmp_path / "corpus").mkdir()
    for i in range(20):
        text = "\n".join("".join(rng.choice("abcdefgh ") for _ in range(200)) for _ in range(8))
        (tmp_path / "corpus" / f"{i}.txt").write_text(text)
    return tmp_path


def _ok(args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


COMMON = ["--d-sae", "32", "--steps", "12", "--batch", "64", "--seq-len", "32"]


def test_train_and_eval(setup):
    t = setup
    out = _ok(["clt", "train", "--model", t / "model", "--corpus", t / "corpus", *COMMON, "--out", t / "c"])
    assert "FVU per layer" in out and "clt eval" in out
    assert detect(t / "c") is Kind.CLT_TRAIN and detect(t / "c" / "clt") is Kind.CLT
    run = open_run(t / "c")
    assert isinstance(run, CLTTrainRun) and run.clt == t / "c" / "clt"
    assert load_clt(run.clt).cfg.n_layers == 2
    assert [r["step"] for r in run.log if "loss" in r][-1] == 12
    out = _ok(
        [
            "clt",
            "eval",
            t / "c",
            "--corpus",
            t / "corpus",
            "--batches",
            "2",
            "--seq-len",
            "32",
            "--split",
            "train",
        ]
    )
    report = json.loads((t / "c" / "eval" / "report.json").read_text())
    assert report["kind"] == "clt_eval" and len(report["fvu"]) == 2 and "CE" in out
    # topk needs k; a bad activation is named
    res = runner.invoke(
        app,
        ["clt", "train", "--model", str(t / "model"), *COMMON, "--activation", "topk", "--out", str(t / "x")],
    )
    assert res.exit_code == 2 and "--k" in res.output


def test_train_across_checkpoints(setup):
    t = setup
    args = ["clt", "train", "--model", t / "run", "--checkpoints", "step_000010,20", "--corpus", t / "corpus"]
    out = _ok([*args, *COMMON, "--activation", "topk", "--k", "4", "--out", t / "across"])
    assert "step_000010" in out and "step_000020" in out
    run = CLTTrainRun.open(t / "across")
    assert run.across and list(run.clts) == ["step_000010", "step_000020"]
    a, b = (load_clt(p) for p in run.clts.values())
    assert not torch.equal(a.W_enc, b.W_enc)  # trained on different models
    _ok(
        [
            "clt",
            "eval",
            t / "across",
            "--corpus",
            t / "corpus",
            "--batches",
            "1",
            "--seq-len",
            "32",
            "--split",
            "train",
        ]
    )
    assert (t / "across" / "eval" / "step_000020" / "report.json").is_file()
    res = runner.invoke(
        app,
        [
            "clt",
            "train",
            "--model",
            str(t / "run"),
            "--checkpoint",
            "step_000030",
            *COMMON,
            "--out",
            str(t / "y"),
        ],
    )
    assert res.exit_code == 2 and "no checkpoint of step 30" in res.output


def test_clts_along_the_formation_window_then_graphs_across(setup):
    """`--checkpoints window` reads the run's formation report; without --out the CLTs go into RUN/clt, where
    `interplab graph across` finds them and writes RUN/graphs/across with the formation scores beside."""
    from interplab.analysis.formation import FormationResult
    from interplab.graphs import GraphsAcross

    t = setup
    args = [
        "clt",
        "train",
        "--model",
        t / "run",
        "--checkpoints",
        "window",
        "--corpus",
        t / "corpus",
        *COMMON,
    ]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2 and "interplab formation" in res.output  # no formation report yet
    induction = torch.zeros(2, 2, 2)
    induction[1, 0, 1] = 0.6
    f = FormationResult(
        str(t / "run"), (10, 20), (0, 0), induction, torch.zeros(2, 2, 2), (1.0, 1.0), (1.0, 0.5),
        (None, None), (None, None), formation_step=20,
    )  # fmt: skip
    f.save(t / "run" / "formation")
    _ok(args)
    run = CLTTrainRun.open(t / "run" / "clt")
    assert list(run.clts) == ["step_000010", "step_000020"]
    out = _ok(["graph", "across", "--model", t / "run", "--tokens", "0,1,2,3,4,5,1,2", "--targets", "3,"])
    assert "| 20 | 0.600 |" in out
    across = GraphsAcross.load(t / "run" / "graphs" / "across")
    assert across.steps == [10, 20] and [g.induction for g in across.graphs] == [0.0, pytest.approx(0.6)]
    assert (t / "run" / "graphs" / "across" / "step_000020" / "graph.json").is_file()
    # --qk best: the formation report's best head (L0H1), on the induction edge (the last 2 against the 3)
    out = _ok(["graph", "across", "--model", t / "run", "--tokens", "0,1,2,3,4,5,1,2", "--targets", "3,",
               "--qk", "best", "--out", t / "qk"])  # fmt: skip
    assert "top QK pair" in out and "step 20: L0H1 score" in out
    qk = GraphsAcross.load(t / "qk").graphs[1].qk
    assert qk is not None and (qk["layer"], qk["head"], qk["query_pos"], qk["key_pos"]) == (0, 1, 7, 3)
    assert qk["score"] == pytest.approx(qk["current"] + qk["through_previous"], abs=1e-5)
    for bad, why in [("1.9", "2 layers of 2 heads"), ("x", "write LAYER.HEAD")]:
        res = runner.invoke(
            app, ["graph", "across", "--model", str(t / "run"), "--tokens", "0,1,2", "--qk", bad]
        )
        assert res.exit_code != 0 and why in res.output, res.output
    res = runner.invoke(
        app, ["graph", "across", "--model", str(t / "run"), "--tokens", "0,1,2", "--qk", "0.0"]
    )
    assert res.exit_code != 0 and "does not occur earlier" in res.output
    res = runner.invoke(
        app, ["graph", "across", "--model", str(t / "run"), "--tokens", "0,1", "--steps", "30"]
    )
    assert res.exit_code != 0 and "has CLTs of steps [10, 20]" in res.output


def test_one_clt_shared_by_the_checkpoints_then_graphs_across_with_it(setup):
    """`clt train --checkpoints A,B --shared` trains one CLT on both checkpoints' activations (RUN/clt-shared);
    `clt eval` evaluates it at each; `graph across --shared-clt` builds both graphs with it, features named by
    their index, and compares its fit with RUN/clt's CLTs per checkpoint."""
    from interplab.graphs import GraphsAcross

    t = setup
    base = ["clt", "train", "--model", t / "run", "--checkpoints", "10,20", "--corpus", t / "corpus", *COMMON]
    res = runner.invoke(app, [str(a) for a in ["clt", "train", "--model", t / "run", "--shared", *COMMON]])
    assert res.exit_code != 0 and "give --checkpoints" in res.output
    _ok(base)  # the CLTs per checkpoint, RUN/clt
    out = _ok([*base, "--shared"])
    assert "shared by step_000010, step_000020" in out and "--shared-clt" in out
    assert f"next: {command_hint('clt', 'eval', t / 'run' / 'clt-shared')} ;" in out  # a command that runs
    run = CLTTrainRun.open(t / "run" / "clt-shared")
    assert run.shared is not None and run.shared["checkpoints"] == ["step_000010", "step_000020"]
    assert run.shared["rows_per_checkpoint"] == [32, 32]
    _ok(
        [
            "clt",
            "eval",
            t / "run" / "clt-shared",
            "--corpus",
            t / "corpus",
            "--seq-len",
            "32",
            "--batches",
            "1",
            "--split",
            "train",
        ]
    )
    assert (t / "run" / "clt-shared" / "eval" / "step_000020" / "report.json").is_file()
    out = _ok(["graph", "across", "--model", t / "run", "--tokens", "0,1,2,3,4,5,1,2", "--targets", "3,",
               "--shared-clt", "--fit-batches", "1", "--out", t / "shared-graphs"])  # fmt: skip
    assert "fvu shared | fvu own" in out
    across = GraphsAcross.load(t / "shared-graphs")
    assert across.shared and across.steps == [10, 20] and [r["step"] for r in across.fit or []] == [10, 20]
    assert all(r["fvu_shared"] > 0 and r["fvu_own"] > 0 for r in across.fit or [])
    ids = [c.identity for c in across.changes if c.what == "node" and c.identity[0].isdigit()]
    assert ids and not any("@" in i for i in ids)  # no tracks: one dictionary
    res = runner.invoke(
        app, ["graph", "across", "--model", str(t / "run"), "--tokens", "0,1", "--own-clt", "x"]
    )
    assert res.exit_code != 0 and "give --shared-clt too" in res.output
