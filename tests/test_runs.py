"""The run-directory contract (interplab/runs/): kinds and versions in every JSON, one recogniser for
folders (including ones written before ``kind`` existed), typed openers with errors that say what a folder is."""

import json

import pytest
import torch

from interplab import runs
from interplab.model import ModelConfig, Transformer
from interplab.runs import Kind, RunError
from interplab.train.checkpoint import write_checkpoint


def _model(folder):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=12, n_ctx=8, d_mlp=32))
    return model.save(folder)


def _train_run(tmp_path, *, final=True, steps=(10, 20)):
    run = tmp_path / "run"
    run.mkdir()
    runs.write_json(
        run / runs.CONFIG, Kind.TRAIN, {"model": {}, "data": {}, "optim": {}, "steps": 20, "batch_size": 2}
    )
    for step in steps:

        def write(tmp, step=step):
            _model(tmp)
            return {"tokens": step * 4}

        write_checkpoint(run / runs.CHECKPOINTS / runs.checkpoint_name(step), step, write)
    if final:
        _model(run / runs.FINAL)
    (run / runs.LOG).write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "lo')
    return run


def test_write_json_stamps_kind_and_version_and_read_json_checks_them(tmp_path):
    p = runs.write_json(tmp_path / "report.json", Kind.SCRUB, {"loss": 0.5})
    data = json.loads(p.read_text())
    assert data == {"kind": "scrub", "version": runs.VERSIONS[Kind.SCRUB], "loss": 0.5}
    assert runs.read_json(p, Kind.SCRUB, strip=True) == {"loss": 0.5}
    with pytest.raises(RunError, match=r"is a causal-scrubbing run; expected a circuit"):
        runs.read_json(p, Kind.CIRCUIT)
    # a config's own version is the document's version
    runs.write_json(tmp_path / "config.json", "train", {"version": 3, "steps": 1})
    assert json.loads((tmp_path / "config.json").read_text())["version"] == 3
    with pytest.raises(ValueError, match=r"data says kind 'scrub'"):
        runs.write_json(tmp_path / "x.json", Kind.PATCH, {"kind": "scrub"})
    with pytest.raises(ValueError, match=r"unknown run kind 'nope'; valid: model, "):
        runs.write_json(tmp_path / "x.json", "nope", {})


def test_a_document_of_a_newer_version_is_refused_naming_both_versions(tmp_path):
    runs.write_json(tmp_path / "report.json", Kind.PATCH, {}, version=runs.VERSIONS[Kind.PATCH] + 1)
    with pytest.raises(
        RunError, match=r"version 2, written by a newer interplab \(this one reads up to version 1\)"
    ):
        runs.read_json(tmp_path / "report.json", Kind.PATCH)


def test_detect_recognises_every_kind_including_legacy_folders(tmp_path):
    model = _model(tmp_path / "model")
    assert runs.detect(model) is Kind.MODEL
    run = _train_run(tmp_path)
    assert runs.detect(run) is Kind.TRAIN
    assert runs.detect(run / runs.CHECKPOINTS / "step_000010") is Kind.CHECKPOINT
    assert runs.detect(run / runs.FINAL) is Kind.MODEL
    # legacy: a training config.json written before ``kind`` (the TrainConfig's keys say what it is)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(
        json.dumps({"model": {}, "data": {}, "optim": {}, "steps": 5, "batch_size": 1})
    )
    assert runs.detect(legacy) is Kind.TRAIN
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert runs.detect(hf) is Kind.HF_MODEL
    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8}))
    assert runs.detect(sae) is None  # no weights: not an SAE
    (sae / runs.SAE_WEIGHTS).write_bytes(b"")
    assert runs.detect(sae) is Kind.SAE
    db = tmp_path / "f.db"
    db.write_bytes(b"SQLite format 3\x00" + bytes(100))
    assert runs.detect(db) is Kind.FEATURE_DB
    assert runs.detect(tmp_path / "missing") is None
    assert runs.detect(tmp_path) is None


def test_train_run_opener(tmp_path):
    run = runs.TrainRun.open(_train_run(tmp_path))
    assert run.config["steps"] == 20 and "kind" not in run.config
    assert [c.step for c in run.checkpoints()] == [10, 20]
    assert run.final == run.path / runs.FINAL
    assert run.log == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]  # a torn last line is skipped
    assert run.checkpoint(20).path.name == "step_000020"
    with pytest.raises(RunError, match=r"has no checkpoint of step 15; it has \[10, 20\]"):
        run.checkpoint(15)
    # a damaged checkpoint is not intact
    w = run.path / runs.CHECKPOINTS / "step_000020" / runs.MODEL_WEIGHTS
    w.write_bytes(w.read_bytes()[:-2])
    assert [c.step for c in run.checkpoints()] == [10]
    assert [c.step for c in run.checkpoints(intact=False)] == [10, 20]


def test_an_unfinished_run_says_which_checkpoint_to_load(tmp_path):
    run = runs.TrainRun.open(_train_run(tmp_path, final=False))
    with pytest.raises(RunError, match=r"no final/ yet .*latest intact checkpoint, .*step_000020"):
        _ = run.final
    with pytest.raises(RunError, match=r"no final/ yet"):
        runs.model_folder(run.path)
    assert "2 checkpoints, no final/ yet" in runs.describe(run.path)


def test_openers_say_what_a_folder_is_and_what_was_expected(tmp_path):
    model = _model(tmp_path / "model")
    with pytest.raises(RunError, match=r"is an interplab model folder; expected a training run"):
        runs.TrainRun.open(model)
    with pytest.raises(runs.NotARunError, match=r"empty is not a training run: it is an empty folder"):
        (tmp_path / "empty").mkdir() or runs.TrainRun.open(tmp_path / "empty")
    assert issubclass(runs.NotARunError, FileNotFoundError) and issubclass(runs.NotARunError, RunError)
    with pytest.raises(RunError, match=r"is an empty folder; expected an SAE training run"):
        runs.SAERun.open(tmp_path / "empty")
    with pytest.raises(RunError, match=r"missing \(no such file or folder\); expected an activation cache"):
        runs.CacheRun.open(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(RunError, match=r"none of interplab's \(it holds a.txt\); expected a model"):
        runs.model_folder(tmp_path / "junk")
    assert runs.model_folder(model) == model
    assert runs.model_folder(_train_run(tmp_path)) == tmp_path / "run" / runs.FINAL


def _sae(folder):
    folder.mkdir(parents=True)
    (folder / runs.SAE_CFG).write_text(json.dumps({"d_in": 4, "d_sae": 8}))
    (folder / runs.SAE_WEIGHTS).write_bytes(b"")
    return folder


def test_sae_folders_are_found_inside_runs_and_ambiguity_names_the_choices(tmp_path):
    sae_run = tmp_path / "run" / runs.SAE_DIR
    sae_run.mkdir(parents=True)
    runs.write_json(sae_run / runs.CONFIG, Kind.SAE_TRAIN, {"saes": {}, "train": {}, "data": None})
    a = _sae(sae_run / runs.SAES / "blocks_0_hook_resid_post")
    assert runs.pick_sae(a) == a
    assert runs.pick_sae(sae_run) == a
    assert runs.pick_sae(tmp_path / "run") == a  # a training run's sae/ sub-folder
    assert runs.SAERun.open(sae_run).saes == {"blocks_0_hook_resid_post": a}
    b = _sae(sae_run / runs.SAES / "blocks_1_hook_resid_post")
    with pytest.raises(
        RunError, match=r"holds 2 SAEs \(blocks_0_hook_resid_post, blocks_1_hook_resid_post\)"
    ):
        runs.pick_sae(sae_run)
    assert runs.pick_sae(sae_run, "blocks_1_hook_resid_post") == b
    with pytest.raises(RunError, match=r"no SAE named 'x'; it holds blocks_0"):
        runs.pick_sae(sae_run, "x")


def test_old_eight_digit_checkpoint_names_still_list(tmp_path):
    (tmp_path / runs.CHECKPOINTS / "step_00000042").mkdir(parents=True)
    (tmp_path / runs.CHECKPOINTS / ".tmp-step_000043-123").mkdir()
    assert [c.step for c in runs.list_checkpoints(tmp_path)] == [42]
    assert runs.checkpoint_name(42) == "step_000042"
    with pytest.raises(ValueError, match=r"step must be >= 0, got -1"):
        runs.checkpoint_name(-1)


def test_report_and_open_run(tmp_path):
    out = tmp_path / "scrub"
    out.mkdir()
    runs.write_json(out / runs.REPORT, Kind.SCRUB, {"recovered": 0.9})
    rep = runs.open_run(out)
    assert isinstance(rep, runs.Report) and rep.kind is Kind.SCRUB and rep.data["recovered"] == 0.9
    assert isinstance(runs.open_run(_train_run(tmp_path)), runs.TrainRun)
    with pytest.raises(RunError, match=r"expected a causal-scrubbing run"):
        runs.Report.open(tmp_path / "run" / runs.FINAL / runs.CONFIG, Kind.SCRUB)


def test_results_generations_tokenizers_and_configs_carry_kind_and_version(tmp_path):
    from dataclasses import dataclass

    from interplab.data import CharTokenizer, load_tokenizer
    from interplab.model.generate import Generation
    from interplab.plots import save_result

    @dataclass
    class Toy:
        x: int = 3

        def to_dict(self):
            return {"x": self.x}

    save_result(Toy(), tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "kind": "result",
        "version": 1,
        "type": "Toy",
        "x": 3,
    }

    gen = Generation(torch.tensor([[1, 2]]), torch.tensor([[1, 1]]), 1, None)
    gen.save(tmp_path / "g.json")
    assert runs.read_json(tmp_path / "g.json", Kind.GENERATION)["prompt_length"] == 1
    torch.testing.assert_close(Generation.load(tmp_path / "g.json").tokens, gen.tokens)

    tok = CharTokenizer("abc")
    tok.save(tmp_path / "tokenizer.json")
    assert runs.read_json(tmp_path / "tokenizer.json", Kind.TOKENIZER)["alphabet"] == ["a", "b", "c"]
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("cab") == tok.encode("cab")

    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=12, n_ctx=8)
    cfg.to_json(tmp_path / "config.json")
    assert (
        runs.detect_document("config.json", json.loads((tmp_path / "config.json").read_text())) is Kind.MODEL
    )
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg
    runs.write_json(tmp_path / "other.json", Kind.SCRUB, {})
    with pytest.raises(ValueError, match=r"this is a 'scrub' document, not a model config"):
        ModelConfig.from_json(tmp_path / "other.json")


def test_the_config_documents_are_read_up_to_their_configs_own_version():
    # a config.json's version is its config's (ModelConfig / TrainConfig): runs must read up to that version,
    # or bumping a config would make interplab refuse its own new files
    from interplab.model.config import CONFIG_VERSION
    from interplab.train.config import TRAIN_CONFIG_VERSION

    assert runs.VERSIONS[Kind.MODEL] == CONFIG_VERSION
    assert runs.VERSIONS[Kind.TRAIN] == TRAIN_CONFIG_VERSION
