"""What was written is what is read: checksummed model folders (final/, checkpoints), stale temp folders of
interrupted checkpoint writes, and formation saying which checkpoints it skipped."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from interplab import load_model
from interplab.analysis.formation import formation
from interplab.data import CharTokenizer
from interplab.integrity import CHECKSUMS, IntegrityError
from interplab.model import ModelConfig, Transformer
from interplab.train import list_checkpoints, train
from interplab.train.checkpoint import checkpoint_dir, clean_stale_temps, verify_checkpoint
from interplab.train.log import read_log


def _saved(tmp_path, seed=0, tokenizer=True):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=12, n_ctx=8, d_mlp=32))
    if tokenizer:
        model.tokenizer = CharTokenizer("abcdefgh")
    return model, model.save(tmp_path / "m")


@pytest.mark.parametrize("file", ["model.safetensors", "config.json", "tokenizer.json"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_changed_byte_in_a_model_folder_is_named_on_load(tmp_path, file, damage):
    model, folder = _saved(tmp_path)
    assert load_model(folder).state_dict().keys() == model.state_dict().keys()
    data = bytearray((folder / file).read_bytes())
    if damage == "flip":
        # a byte that keeps the file parseable: a weight's low mantissa bit, or a digit/letter in the JSON
        i = (
            len(data) - 5
            if file.endswith(".safetensors")
            else next(i for i in range(len(data) - 1, 0, -1) if chr(data[i]).isalnum())
        )
        data[i] ^= 0x01
    else:
        data = data[:-3]
    (folder / file).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{file} is corrupt or truncated"):
        load_model(folder)


def test_folders_without_checksums_still_load_and_a_resave_records_new_ones(tmp_path):
    model, folder = _saved(tmp_path)
    (folder / CHECKSUMS).unlink()  # e.g. written by an older interplab
    torch.testing.assert_close(load_model(folder).W_E, model.W_E)
    other, _ = _saved(tmp_path, seed=1)  # saving again into the same folder
    torch.testing.assert_close(load_model(folder).W_E, other.W_E)
    record = json.loads((folder / CHECKSUMS).read_text())
    assert record["kind"] == "checksums" and set(record["files"]) == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
    }
    assert all(r["size"] == (folder / n).stat().st_size for n, r in record["files"].items())


def test_final_and_checkpoints_are_checksummed(corpus_dir, tmp_path, tiny_config):
    run = tmp_path / "run"
    train(tiny_config(corpus_dir, steps=3), run)
    for folder in [run / "final", *(c.path for c in list_checkpoints(run))]:
        assert (folder / CHECKSUMS).is_file()
        load_model(folder)
    weights = run / "final" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="final/model.safetensors"):
        load_model(run / "final")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_are_cleaned_safely(tmp_path):
    run = tmp_path / "run"
    model, _ = _saved(tmp_path)
    for step in (1, 2):
        model.save(checkpoint_dir(run, step))
    root = run / "checkpoints"
    dead, live = _dead_pid(), os.getppid()
    (root / f".tmp-step_000003-{dead}").mkdir()  # an interrupted new checkpoint
    (root / f".tmp-step_000003-{dead}" / "model.safetensors").write_bytes(b"half")
    os.rename(root / "step_000002", root / f".old-step_000002-{dead}")  # died mid-replace of step 2
    model.save(root / f".old-step_000001-{dead}")  # step 1 was replaced: the old copy is garbage
    (root / f".tmp-step_000004-{live}").mkdir()  # a process that is still writing: left alone
    done = clean_stale_temps(run)
    assert len(done) == 3 and any("restored step_000002" in d for d in done)
    assert sorted(p.name for p in root.iterdir()) == [
        f".tmp-step_000004-{live}",
        "step_000001",
        "step_000002",
    ]
    assert clean_stale_temps(run) == []


def test_resume_cleans_temp_folders_and_logs_it(corpus_dir, tmp_path, tiny_config):
    cfg = tiny_config(corpus_dir, steps=6)
    run = tmp_path / "run"
    train(cfg, run, stop_after=3)
    stale = run / "checkpoints" / f".tmp-step_000006-{_dead_pid()}"
    shutil.copytree(list_checkpoints(run)[-1].path, stale)
    result = train(cfg, run)
    assert result.step == 6 and not stale.exists()
    assert any(r.get("event") == "cleaned" for r in read_log(run))


def test_formation_says_which_checkpoints_it_skipped(corpus_dir, tmp_path, tiny_config):
    run = tmp_path / "run"
    train(tiny_config(corpus_dir, steps=4), run)
    ckpts = list_checkpoints(run)
    bad = ckpts[1].path / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[-2] ^= 0x01
    bad.write_bytes(bytes(data))
    assert verify_checkpoint(ckpts[1].path, need_optimizer=False) is not None
    with pytest.warns(UserWarning, match=rf"skipping checkpoint .*{ckpts[1].path.name}.*corrupt"):
        result = formation(run, n_seqs=2, val_seqs=1)
    assert ckpts[1].step not in result.steps and len(result.steps) == len(ckpts) - 1
    assert result.skipped == (
        f"{ckpts[1].path.name}: model.safetensors is corrupt or truncated "
        "(its SHA-256 differs from the one recorded when it was written)",
    )
    result.save(tmp_path / "f")
    saved = json.loads((tmp_path / "f" / "formation.json").read_text())
    assert saved["skipped_checkpoints"] == list(result.skipped)
