import json
import math

import pytest
import torch
from safetensors.torch import load_file

from interplab.train import list_checkpoints, read_log, train
from interplab.train.checkpoint import verify_checkpoint


def _weights(run):
    return load_file(str(run / "final" / "model.safetensors"))


def _losses(run):
    return {r["step"]: r["loss"] for r in read_log(run) if "loss" in r}


def test_resume_is_bit_exact(corpus_dir, tmp_path, tiny_config):
    cfg = tiny_config(corpus_dir, grad_accum=2)
    straight = train(cfg, tmp_path / "a")
    half = train(cfg, tmp_path / "b", stop_after=4)
    assert half.step == 4 and not (tmp_path / "b" / "final").exists()
    resumed = train(cfg, tmp_path / "b")
    assert resumed.resumed_from == 4 and resumed.step == 8
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    logged = [r["step"] for r in read_log(tmp_path / "b") if "loss" in r]
    assert logged == list(range(1, 9))  # the resumed run's log has each step once
    assert resumed.loss == straight.loss
    assert straight.tokens == resumed.tokens == 8 * 4 * 32


def test_checkpoint_schedule_and_contents(corpus_dir, tmp_path, tiny_config):
    from interplab import load_model

    cfg = tiny_config(corpus_dir)
    train(cfg, tmp_path / "run")
    steps = [c.step for c in list_checkpoints(tmp_path / "run")]
    assert steps == cfg.checkpoints.steps(8) == [0, 2, 3, 5, 6, 8]  # log-spaced 2, 3, 5, 8 and every 3
    for ckpt in list_checkpoints(tmp_path / "run"):
        assert verify_checkpoint(ckpt.path) is None
    model = load_model(list_checkpoints(tmp_path / "run")[-1].path)
    final = load_model(tmp_path / "run" / "final")
    for (k, v), (_, w) in zip(model.state_dict().items(), final.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert final.tokenizer is not None
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["finished"] and report["step"] == 8
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove_state"])
def test_corrupt_checkpoint_is_skipped_and_resume_uses_newest_good_one(
    corpus_dir, tmp_path, damage, tiny_config
):
    cfg = tiny_config(corpus_dir)
    train(cfg, tmp_path / "ref")
    run = tmp_path / "run"
    train(cfg, run, stop_after=6)
    newest = list_checkpoints(run)[-1]
    assert newest.step == 6
    target = newest.path / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (newest.path / "state.json").unlink()
    earlier = {c.step: c.path.joinpath("model.safetensors").read_bytes() for c in list_checkpoints(run)[:-1]}
    result = train(cfg, run)
    assert result.resumed_from == 5
    assert len(result.skipped_checkpoints) == 1 and "step_000006" in result.skipped_checkpoints[0]
    for step, data in earlier.items():  # the earlier checkpoints are untouched
        ckpt = next(c for c in list_checkpoints(run) if c.step == step)
        assert ckpt.path.joinpath("model.safetensors").read_bytes() == data
    a, b = _weights(tmp_path / "ref"), _weights(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert verify_checkpoint(list_checkpoints(run)[-2].path) is None  # step 6 was rewritten whole


def test_load_checkpoint_refuses_corrupt_file(corpus_dir, tmp_path, tiny_config):
    from interplab.train import build_model, load_checkpoint
    from interplab.train.sources import make_source

    cfg = tiny_config(corpus_dir, steps=2)
    train(cfg, tmp_path / "run")
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    (ckpt.path / "optimizer.safetensors").write_bytes(b"garbage")
    model = build_model(cfg, make_source(cfg))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="optimizer.safetensors is corrupt or truncated"):
        load_checkpoint(ckpt.path, model, opt)


def test_bf16_autocast_keeps_float32_master_weights(corpus_dir, tmp_path, tiny_config):
    fp32 = train(tiny_config(corpus_dir, steps=3), tmp_path / "fp32")
    bf16 = train(tiny_config(corpus_dir, steps=3, precision="bf16"), tmp_path / "bf16")
    weights = _weights(tmp_path / "bf16")
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert torch.isfinite(torch.tensor(bf16.loss))
    assert bf16.loss != fp32.loss  # the autocast path really ran in bf16
    torch.testing.assert_close(bf16.loss, fp32.loss, atol=0.1, rtol=0)


def test_bf16_autocast_training_lowers_the_loss(corpus_dir, tmp_path, tiny_config):
    run = tmp_path / "bf16-learns"
    train(tiny_config(corpus_dir, steps=24, precision="bf16", optim={"lr": 1e-2, "warmup_steps": 2}), run)
    losses = [
        row["loss"] for row in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in row
    ]
    assert len(losses) >= 20 and all(map(math.isfinite, losses))
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
