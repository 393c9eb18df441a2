"""Commands that take a model accept a training run folder: they load its final/ and say so; a run without
final/ ends in one line naming the checkpoint to load instead."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from interplab.cli.main import app
from interplab.data import CharTokenizer
from interplab.model import ModelConfig, Transformer
from interplab.sae import SAEConfig, create_sae, save_sae
from interplab.train import TrainConfig
from interplab.train.checkpoint import checkpoint_dir, save_checkpoint


def _run_folder(root, final: bool):
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=20, n_ctx=16, d_mlp=32)
    run = root / ("done" if final else "stopped")
    TrainConfig(model=cfg, data={"seq_len": 16}, steps=4).to_json(run / "config.json")
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_checkpoint(run, 2, model, None, {"tokens": 0})
    if final:
        model.save(run / "final")
    return run


def test_info_on_a_run_loads_its_final_model_and_says_so(tmp_path):
    run = _run_folder(tmp_path, final=True)
    result = CliRunner().invoke(app, ["info", str(run), "--no-hooks"])
    assert result.exit_code == 0, result.output
    assert f"loaded {run / 'final'}" in result.stdout
    plain = CliRunner().invoke(app, ["info", str(run / "final"), "--no-hooks"])
    assert plain.exit_code == 0 and "loaded" not in plain.stdout  # nothing to say when the path is the model


def test_info_on_an_unfinished_run_names_its_latest_checkpoint(tmp_path):
    run = _run_folder(tmp_path, final=False)
    result = CliRunner().invoke(app, ["info", str(run)])
    err = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(err) == 1, result.output
    assert "no final/ yet" in err[0] and str(checkpoint_dir(run, 2)) in err[0]


HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A finished training run whose model has a tokenizer, an SAE on its residual stream, a tiny corpus."""
    root = tmp_path_factory.mktemp("lab")
    tok = CharTokenizer("abcdefgh \n")
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=tok.vocab_size, n_ctx=16, d_mlp=32)
    run = root / "run"
    TrainConfig(model=cfg, data={"seq_len": 16}, steps=4).to_json(run / "config.json")
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.tokenizer = tok
    model.save(run / "final")
    save_sae(create_sae(SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4, hook_name=HOOK)), root / "sae")
    (root / "corpus").mkdir()
    for i in range(4):
        (root / "corpus" / f"{i}.txt").write_text("abc def\n" * 50)
    return root


@pytest.mark.parametrize(
    "args",
    [
        "heads {run} --out {tmp}/heads --batch 2 --seq-len 4",
        "sae cache {run} --hook {hook} --out {tmp}/cache --corpus {root}/corpus --seq-len 8 --batch 2 "
        "--tokens 32",
        "features steer --model {run} --sae {root}/sae --feature 0 --value 1 --prompt abc --max-new-tokens 2",
    ],
    ids=lambda args: " ".join(args.split()[:2]),
)
def test_every_command_given_a_run_as_its_model_loads_its_final_and_says_so(lab, tmp_path, args):
    run = lab / "run"
    args = args.format(run=run, root=lab, tmp=tmp_path, hook=HOOK).split()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"loaded {run / 'final'}" in result.stdout


def test_serve_resolves_a_run_given_as_its_model_at_start(lab, monkeypatch):
    import uvicorn

    from interplab.web.guard import MAX_REQUEST_HEAD

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    run = lab / "run"
    result = CliRunner().invoke(app, ["serve", "--runs", str(lab), "--model", str(run)])
    assert result.exit_code == 0, result.output
    assert f"model {run / 'final'} (loaded on first use)" in result.stdout and served
    assert served["h11_max_incomplete_event_size"] == MAX_REQUEST_HEAD  # long URLs are answered, not reset
