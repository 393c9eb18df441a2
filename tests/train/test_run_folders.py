"""A training run folder is a model path: `load_model(RUN)` reads ``RUN/final``, a stopped run names its latest
intact checkpoint, and a folder that holds no model is described, never sent to the Hugging Face loader."""

import json

import pytest
import torch

from interplab import load_model, runs
from interplab.model.load import model_source
from interplab.runs import Kind, RunError
from interplab.train import TrainConfig, train
from interplab.train.checkpoint import checkpoint_dir
from interplab.train.log import read_log, truncate_log


def test_a_run_folder_loads_its_final_model_and_a_stopped_run_names_its_checkpoint(
    corpus_dir, tmp_path, tiny_config
):
    cfg, run = tiny_config(corpus_dir), tmp_path / "run"
    train(cfg, run, stop_after=5)  # checkpoints at 0, 1, 2, 3, 5 ...: no final/
    assert not (run / "final").exists()
    latest = checkpoint_dir(run, 5)
    with pytest.raises(
        RunError, match=rf"training run with no final/ yet.*latest intact checkpoint, {latest}"
    ):
        load_model(run)
    (latest / "model.safetensors").write_bytes(
        b"damaged"
    )  # the newest is not intact: the one before is named
    with pytest.raises(RunError, match=rf"{checkpoint_dir(run, 3)}"):
        load_model(run)
    torch.testing.assert_close(
        load_model(checkpoint_dir(run, 3)).W_E, load_model(run / "checkpoints" / "step_000003").W_E
    )

    train(cfg, run)  # resumes from step 3 and finishes: final/ exists
    assert model_source(run) == run / "final"
    assert model_source(run / "final") == run / "final"
    assert model_source(run / "final" / "model.safetensors") == run / "final"
    assert model_source(run / "config.json") == run / "final"  # a file of the run stands for the run
    from_run, from_final = load_model(run), load_model(run / "final")
    assert from_run.state_dict().keys() == from_final.state_dict().keys()
    for name, tensor in from_final.state_dict().items():
        torch.testing.assert_close(from_run.state_dict()[name], tensor, rtol=0, atol=0)
    assert from_run.tokenizer is not None

    # every JSON document of the run says what it is
    kinds = {name: json.loads((run / name).read_text())["kind"] for name in ("config.json", "report.json")}
    kinds["final"] = json.loads((run / "final" / "config.json").read_text())["kind"]
    kinds["state.json"] = json.loads((checkpoint_dir(run, 8) / "state.json").read_text())["kind"]
    assert kinds == {
        "config.json": "train",
        "report.json": "train_report",
        "final": "model",
        "state.json": "checkpoint",
    }
    assert TrainConfig.from_file(run / "config.json") == cfg  # a run's config.json is a config file too

    # a run written before `kind` existed still loads and resumes
    for file in (run / "config.json", run / "final" / "config.json"):
        data = json.loads(file.read_text())
        del data["kind"]
        file.write_text(json.dumps(data))
    (run / "final" / "checksums.json").unlink()  # the older folder had none
    assert runs.detect(run) is Kind.TRAIN and runs.detect(run / "final") is Kind.MODEL
    torch.testing.assert_close(load_model(run).W_E, from_final.W_E, rtol=0, atol=0)
    result = train(cfg.replace(steps=9), run)
    assert result.resumed_from == 8 and result.step == 9


def test_a_folder_without_a_model_says_what_it_is(tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"learning": "nothing"}))
    with pytest.raises(RunError, match=r"notes is a folder that is none of interplab's .*; expected a model"):
        load_model(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"empty is not a model folder: it is an empty folder, with no config.json"
    ):
        load_model(empty)
    sae_run = tmp_path / "sae_run"  # what `sae train` writes: described, never read as a Hugging Face folder
    sae_run.mkdir()
    (sae_run / "config.json").write_text(json.dumps({"kind": "sae_train", "version": 1, "saes": {}}))
    with pytest.raises(RunError, match=r"sae_run is an SAE training run .*; expected a model"):
        load_model(sae_run)


def test_resuming_drops_the_rows_after_the_checkpoint_and_a_torn_last_line(tmp_path):
    rows = [{"step": i, "loss": 0.1 * i} for i in range(6)] + [{"event": "resume"}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "log.jsonl").write_text(text + '{"step": 6, "lo')  # killed while writing step 6
    assert read_log(tmp_path) == rows
    truncate_log(tmp_path, 3)
    assert read_log(tmp_path) == rows[:4] + [{"event": "resume"}]
    assert (tmp_path / "log.jsonl").read_text().endswith('{"event": "resume"}\n')


def test_a_config_of_another_kind_is_refused_by_name(tiny_config, tmp_path):
    data = tiny_config(tmp_path).to_dict()
    assert TrainConfig.from_dict({"kind": "train", **data}) == TrainConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"'sae_train' document, not a training config"):
        TrainConfig.from_dict({"kind": "sae_train", **data})
