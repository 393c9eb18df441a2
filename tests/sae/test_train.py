import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from interplab.sae import SAEConfig, create_sae, load_sae
from interplab.sae.recovery import SyntheticFeatures, feature_recovery
from interplab.sae.train import TrainConfig, TrainProgress, _Trainer, resample_dead, train_saes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("arch", "k", "coefficient", "steps"), [("topk", 8, 0.0, 120), ("relu", None, 0.5, 150)]
)
def test_recovers_planted_features(arch, k, coefficient, steps):
    """256 true directions in 64 dims, each active with probability 1/32: a 512-latent SAE finds >= 90%."""
    syn = SyntheticFeatures(n_features=256, d=64, probability=1 / 32)
    sae = create_sae(SAEConfig(d_in=64, d_sae=512, architecture=arch, k=k))
    cfg = TrainConfig(
        total_steps=steps,
        lr=8e-3,
        coefficient=coefficient,
        warmup_steps=20,
        coefficient_warmup_steps=50,
        dead_after_tokens=50_000,
        resample_every=100,
    )
    result = train_saes(sae, syn.batches(1024, steps), cfg)
    rec = feature_recovery(sae.W_dec.detach(), syn.directions())
    assert rec.fraction_recovered >= 0.9, rec
    assert result.final("sae")["fvu"] < 0.35
    # and a random dictionary does not "recover" them (the score can fail)
    assert feature_recovery(torch.randn(512, 64), syn.directions()).fraction_recovered < 0.05


def test_schedules():
    cfg = TrainConfig(
        total_steps=100,
        lr=1.0,
        warmup_steps=10,
        decay_fraction=0.2,
        coefficient=2.0,
        coefficient_warmup_steps=4,
    )
    assert cfg.lr_at(0) == pytest.approx(0.1)
    assert cfg.lr_at(50) == 1.0
    assert cfg.lr_at(90) == pytest.approx(0.5)
    assert cfg.coefficient_at(1) == pytest.approx(1.0) and cfg.coefficient_at(10) == 2.0
    with pytest.raises(ValueError, match="total_steps must be > 0, got 0"):
        TrainConfig(total_steps=0)


def test_joint_training_equals_separate_runs():
    """Several SAEs from one pass over the activations = each trained alone on the same batches."""
    syn = SyntheticFeatures(n_features=32, d=16)
    batches = list(syn.batches(64, 15, seed=2))
    cfgs = {
        "a": TrainConfig(total_steps=15, coefficient=0.1, autocast=False, log_every=5),
        "b": TrainConfig(total_steps=10, lr=1e-3, autocast=False, log_every=5),
    }
    archs = {"a": ("relu", None), "b": ("topk", 4)}

    def fresh(name):
        torch.manual_seed(7)
        arch, k = archs[name]
        return create_sae(SAEConfig(d_in=16, d_sae=64, architecture=arch, k=k))

    joint = train_saes({n: fresh(n) for n in cfgs}, batches, cfgs)
    for name in cfgs:
        alone = train_saes({name: fresh(name)}, batches, {name: cfgs[name]})
        for (pn, p), q in zip(
            joint.saes[name].named_parameters(), alone.saes[name].parameters(), strict=True
        ):
            assert_close(p, q, msg=f"{name}.{pn}")
    assert joint.steps == 15


def test_run_dir_log_checkpoints_and_progress(tmp_path):
    syn = SyntheticFeatures(n_features=32, d=16)
    sae = create_sae(
        SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4, hook_name="blocks.0.hook_resid_post")
    )
    seen: list[TrainProgress] = []
    cfg = TrainConfig(total_steps=12, log_every=4, checkpoint_every=6)
    train_saes(
        {"l0": sae},
        syn.batches(32, 12, key="blocks.0.hook_resid_post"),
        cfg,
        run_dir=tmp_path,
        progress=seen.append,
    )
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12] == [p.step for p in seen]
    assert {"l0", "mse", "fvu", "dead_fraction", "dense_fraction", "lr"} <= set(rows[0])
    assert rows[-1]["l0"] <= 4
    assert (tmp_path / "checkpoints" / "step_000006" / "l0" / "sae_weights.safetensors").exists()
    back = load_sae(tmp_path / "saes" / "l0")
    x = torch.randn(5, 16)
    assert_close(back(x).reconstruction, sae(x).reconstruction)


def test_transcoder_trains_on_its_output_site():
    d = 16
    A = torch.randn(d, d) / 4
    batches = []
    for _ in range(120):
        x = torch.randn(128, d)
        batches.append({"blocks.0.hook_mlp_in": x, "blocks.0.hook_mlp_out": (x @ A).relu()})
    sae = create_sae(
        SAEConfig(d_in=d, d_sae=64, hook_name="blocks.0.hook_mlp_in", hook_name_out="blocks.0.hook_mlp_out")
    )
    r = train_saes(sae, batches, TrainConfig(total_steps=120, lr=1e-2, log_every=20, b_dec_init="mean"))
    assert r.final("sae")["fvu"] < 0.1 < r.history[0]["fvu"]


def test_dead_latents_are_detected_and_resampled():
    sae = create_sae(SAEConfig(d_in=16, d_sae=64))
    t = _Trainer("s", sae, TrainConfig(total_steps=10, dead_after_tokens=100))
    t.since_fired[:10] = 1000
    with torch.no_grad():
        sae.W_enc[:, :10] = 0.0
    n = resample_dead(t, torch.randn(256, 16), None)
    assert n == 10 and (t.since_fired[:10] == 0).all()
    assert (sae.W_enc[:, :10].norm(dim=0) > 0).all()


def test_missing_hook_in_batches_is_a_clear_error():
    sae = create_sae(SAEConfig(d_in=16, d_sae=64, hook_name="blocks.1.hook_resid_post"))
    with pytest.raises(KeyError, match="no 'blocks.1.hook_resid_post'.*blocks.0.hook_resid_post"):
        train_saes(sae, [{"blocks.0.hook_resid_post": torch.randn(8, 16)}], TrainConfig(total_steps=1))


@pytest.mark.parametrize("arch", ["relu", pytest.param("topk", marks=pytest.mark.slow)])
def test_torchrun_data_parallel_equals_one_process(arch, tmp_path):
    """2 CPU processes (gloo), each on half of every batch, end where one process on whole batches ends.
    (No dead latents here: AuxK normalises by each rank's own residual variance, so it is not batch-exact.)"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
        str(ROOT / "tests" / "sae" / "ddp_worker.py"),
        str(tmp_path / "ddp"),
        arch,
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    ddp = load_sae(tmp_path / "ddp" / "saes" / "sae")
    torch.manual_seed(0)
    single = create_sae(SAEConfig(d_in=16, d_sae=64, architecture=arch, k=4 if arch == "topk" else None))
    batches = list(SyntheticFeatures(n_features=32, d=16).batches(64, 20, seed=5))
    cfg = TrainConfig(
        total_steps=20,
        lr=1e-2,
        coefficient=0.1,
        autocast=False,
        warmup_steps=2,
        log_every=5,
        dead_after_tokens=10**9,
        b_dec_init="zeros",
    )
    train_saes(single, batches, cfg)
    for (name, p), q in zip(single.named_parameters(), ddp.parameters(), strict=True):
        assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
