import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from interplab.sae import SAEConfig, create_sae, load_sae
from interplab.sae.config import Architecture
from interplab.sae.recovery import SyntheticFeatures, feature_recovery
from interplab.sae.train import (
    DEFAULT_COEFFICIENTS,
    SAETrainConfig,
    SAETrainProgress,
    _step,
    _Trainer,
    resample_dead,
    train_saes,
)
from tests.peers import peer_python

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("arch", "k", "coefficient", "steps"), [("topk", 8, 0.0, 120), ("relu", None, 0.5, 150)]
)
def test_recovers_planted_features(arch, k, coefficient, steps, seed):
    """256 true directions in 64 dims, each active with probability 1/32: a 512-latent SAE finds >= 90%,
    for every seed (directions, data and the SAE's initial weights all change with it)."""
    syn = SyntheticFeatures(n_features=256, d=64, probability=1 / 32, seed=seed)
    sae = create_sae(SAEConfig(d_in=64, d_sae=512, architecture=arch, k=k), seed=seed)
    cfg = SAETrainConfig(
        total_steps=steps,
        lr=8e-3,
        coefficient=coefficient,
        warmup_steps=20,
        coefficient_warmup_steps=50,
        dead_after_tokens=50_000,
        resample_every=100,
    )
    result = train_saes(sae, syn.batches(1024, steps, seed=100 + seed), cfg)
    rec = feature_recovery(sae.W_dec.detach(), syn.directions())
    assert rec.fraction_recovered >= 0.9, rec
    assert result.final("sae")["fvu"] < 0.35
    # and a random dictionary does not "recover" them (the score can fail)
    random = torch.randn(512, 64, generator=torch.Generator().manual_seed(12345))
    assert feature_recovery(random, syn.directions()).fraction_recovered < 0.05


def test_schedules():
    cfg = SAETrainConfig(
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
        SAETrainConfig(total_steps=0)


def test_joint_training_equals_separate_runs():
    """Several SAEs from one pass over the activations = each trained alone on the same batches."""
    syn = SyntheticFeatures(n_features=32, d=16)
    batches = list(syn.batches(64, 15, seed=2))
    cfgs = {
        "a": SAETrainConfig(total_steps=15, coefficient=0.1, autocast=False, log_every=5),
        "b": SAETrainConfig(total_steps=10, lr=1e-3, autocast=False, log_every=5),  # TopK: coefficient unused
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
    seen: list[SAETrainProgress] = []
    cfg = SAETrainConfig(total_steps=12, log_every=4, checkpoint_every=6)
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
    # dense Gaussian inputs: no sparse structure, so a light L1 (the default would trade FVU 0.33 for L0 13)
    cfg = SAETrainConfig(total_steps=120, lr=1e-2, log_every=20, b_dec_init="mean", coefficient=0.1)
    r = train_saes(sae, batches, cfg)
    assert r.final("sae")["fvu"] < 0.1 < r.history[0]["fvu"]


ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated"]


def _sae(arch: str, seed: int = 0, **kw):
    k = 4 if "topk" in arch else None
    return create_sae(SAEConfig(d_in=16, d_sae=64, architecture=arch, k=k, **kw), seed=seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_resampling_resets_every_parameter_of_a_dead_latent(arch):
    """Dead latents get new W_enc/W_dec directions and every other per-latent parameter (Gated's r_mag and
    b_mag, JumpReLU's threshold, b_enc) back at its initial value, with zeroed Adam moments; live latents are
    untouched."""
    sae = _sae(arch)
    t = _Trainer("s", sae, SAETrainConfig(total_steps=10, dead_after_tokens=100, coefficient=0.1))
    batches = list(SyntheticFeatures(n_features=32, d=16).batches(128, 3))
    for step, batch in enumerate(batches):  # real training: every parameter and Adam moment moves
        _step(t, batch, step)
    for name, p in sae.named_parameters():
        if name in sae.latent_reset_values():
            with torch.no_grad():
                p.add_(0.5)  # make sure a reset is visible
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    t.since_fired[:10] = 1000
    t.since_fired[10:] = 0
    n = resample_dead(t, batches[0]["x"], None)
    assert n == 10 and (t.since_fired[:10] == 0).all()
    params = dict(sae.named_parameters())
    for name, axis in sae.latent_axes.items():
        dead, live = params[name].narrow(axis, 0, 10), params[name].narrow(axis, 10, 54)
        assert torch.equal(live, before[name].narrow(axis, 10, 54)), name
        if name in sae.latent_reset_values():
            assert (dead == sae.latent_reset_values()[name]).all(), name
        else:
            assert not torch.equal(dead, before[name].narrow(axis, 0, 10)), name
            assert (dead.norm(dim=1 - axis) > 0).all(), name
        state = t.opt.state[params[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert (state[key].narrow(axis, 0, 10) == 0).all(), (name, key)
            assert (state[key].narrow(axis, 10, 54) != 0).any(), (name, key)


def test_resampling_schedule_skips_the_final_stretch():
    cfg = SAETrainConfig(total_steps=300, resample_every=100)
    assert [s for s in range(1, 301) if cfg.resamples_at(s)] == [100, 200]
    cfg = SAETrainConfig(total_steps=1000, resample_every=50)  # the last 10% (100 steps) is longer
    assert [s for s in range(1, 1001) if cfg.resamples_at(s)][-1] == 900
    assert not any(SAETrainConfig(total_steps=40, resample_every=40).resamples_at(s) for s in range(1, 41))
    default = SAETrainConfig(total_steps=400)  # resample_every None: total_steps // 4
    assert [s for s in range(1, 401) if default.resamples_at(s)] == [100, 200, 300]


@pytest.mark.parametrize("arch", ["gated", "relu", "jumprelu"])
def test_no_resampling_on_the_last_step_and_the_final_row_is_the_returned_sae(arch, monkeypatch):
    """total_steps a multiple of resample_every: resampling used to fire on the last step and return untrained
    latents while the log showed the pre-resampling FVU."""
    import interplab.sae.train as train_mod

    calls: list[int] = []
    real = train_mod.resample_dead

    def spy(t, x, target):
        calls.append(t.steps_done)
        return real(t, x, target)

    monkeypatch.setattr(train_mod, "resample_dead", spy)
    batches = list(SyntheticFeatures(n_features=32, d=16).batches(64, 40, seed=3))
    sae = _sae(arch)
    cfg = SAETrainConfig(total_steps=40, resample_every=10, dead_after_tokens=64, stats_every=1, lr=1e-2)
    result = train_saes(sae, batches, cfg)
    assert calls == [10, 20, 30]
    _assert_final_row_is(result.final("sae"), sae, batches[-1]["x"])


def _assert_final_row_is(row, sae, x):
    with torch.no_grad():
        out = sae(x)
        want_fvu = float(
            (out.reconstruction - x).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()
        )
        want_l0 = float((out.feature_acts != 0).sum(-1).float().mean())
    assert row["final"] is True
    assert row["fvu"] == pytest.approx(want_fvu, rel=1e-5)
    assert row["l0"] == pytest.approx(want_l0, rel=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_final_row_describes_the_returned_sae_also_when_batches_run_out(arch):
    batches = list(SyntheticFeatures(n_features=32, d=16).batches(64, 7, seed=4))
    sae = _sae(arch)
    result = train_saes(sae, batches, SAETrainConfig(total_steps=20, log_every=5, coefficient=0.05))
    assert [r["step"] for r in result.history] == [5, 7] and result.steps == 7
    _assert_final_row_is(result.final("sae"), sae, batches[-1]["x"])


def test_joint_run_logs_no_rows_after_a_shorter_sae_stopped():
    batches = list(SyntheticFeatures(n_features=32, d=16).batches(64, 15, seed=2))
    cfgs = {
        "a": SAETrainConfig(total_steps=15, log_every=5),
        "b": SAETrainConfig(total_steps=10, log_every=5),
    }
    result = train_saes({"a": _sae("topk"), "b": _sae("relu")}, batches, cfgs)
    assert [r["step"] for r in result.history if r["sae"] == "b"] == [5, 10]
    _assert_final_row_is(result.final("b"), result.saes["b"], batches[9]["x"])


@pytest.mark.parametrize("arch", ["relu", "topk", "gated"])
def test_same_config_and_seed_give_bit_identical_saes(arch):
    """Initial weights, resampling draws (relu, gated) and AuxK (topk) are all seeded: two runs are
    bit-identical; another seed gives another SAE."""
    batches = list(SyntheticFeatures(n_features=32, d=16).batches(64, 30, seed=6))

    def run(seed):
        sae = _sae(arch, seed=seed)
        cfg = SAETrainConfig(
            total_steps=30, resample_every=10, dead_after_tokens=64, stats_every=1, seed=seed
        )
        train_saes(sae, batches, cfg)
        return sae.state_dict()

    a, b, c = run(0), run(0), run(1)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["W_dec"], c["W_dec"])


@pytest.mark.parametrize(("arch", "power"), [("relu", 1), ("gated", 1), ("jumprelu", 2), ("topk", 1)])
def test_default_coefficient_follows_the_data_scale(arch, power):
    """coefficient=None: the architecture's default for unit-variance inputs, scaled by the data's size (L1 by
    c, L0 by c^2), so the same default means the same trade-off at any activation scale."""
    x = next(SyntheticFeatures(n_features=32, d=16).batches(256, 1, seed=8))["x"]
    rows = []
    for scale in (1.0, 10.0):
        result = train_saes(
            _sae(arch), [{"x": x * scale + 3.0}], SAETrainConfig(total_steps=1, b_dec_init="mean")
        )
        rows.append(result.final("sae")["coefficient"])
    base = DEFAULT_COEFFICIENTS[Architecture.parse(arch)]
    assert rows[0] == pytest.approx(base * float(x.var(0, unbiased=False).mean()) ** (power / 2), rel=1e-4)
    assert rows[1] == pytest.approx(rows[0] * 10.0**power, rel=1e-4)
    if arch != "topk":
        assert rows[0] > 0
    with pytest.raises(ValueError, match="coefficient must be >= 0"):
        SAETrainConfig(total_steps=1, coefficient=-1.0)


def test_default_dead_window_follows_the_run():
    assert SAETrainConfig(total_steps=300).dead_after(1024) == 30 * 1024
    assert SAETrainConfig(total_steps=10**6).dead_after(4096) == 10_000_000
    assert SAETrainConfig(total_steps=5).dead_after(64) == 64
    assert SAETrainConfig(total_steps=300, dead_after_tokens=7).dead_after(1024) == 7


def test_missing_hook_in_batches_is_a_clear_error():
    sae = create_sae(SAEConfig(d_in=16, d_sae=64, hook_name="blocks.1.hook_resid_post"))
    with pytest.raises(KeyError, match="no 'blocks.1.hook_resid_post'.*blocks.0.hook_resid_post"):
        train_saes(sae, [{"blocks.0.hook_resid_post": torch.randn(8, 16)}], SAETrainConfig(total_steps=1))


def test_torchrun_data_parallel_equals_one_process(tmp_path):
    """2 CPU processes (gloo), each on half of every batch, end where one process on whole batches ends.
    (No dead latents here: AuxK normalises by each rank's own residual variance, so it is not batch-exact.)
    TopK only: a ReLU SAE's data-parallel run is tests/sae/test_distributed.py's (the same gradient averaging;
    the architecture changes only the local forward), so a second torchrun here would add no check."""
    arch = "topk"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free rendezvous port of its own (a fixed one can be taken)
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "sae" / "ddp_worker.py"),
        str(tmp_path / "ddp"),
        arch,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    ddp = load_sae(tmp_path / "ddp" / "saes" / "sae")
    torch.manual_seed(0)
    single = create_sae(SAEConfig(d_in=16, d_sae=64, architecture=arch, k=4 if arch == "topk" else None))
    batches = list(SyntheticFeatures(n_features=32, d=16).batches(64, 20, seed=5))
    cfg = SAETrainConfig(
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


def test_every_row_has_measured_metrics_when_log_every_is_not_a_multiple_of_stats_every():
    """A row whose window had no sampled step used to report fvu = l0 = 0."""
    batches = list(SyntheticFeatures(n_features=32, d=16).batches(64, 9, seed=9))
    result = train_saes(_sae("relu"), batches, SAETrainConfig(total_steps=9, log_every=1, stats_every=4))
    assert [r["step"] for r in result.history] == list(range(1, 10))
    assert all(r["fvu"] > 0 and r["l0"] > 0 for r in result.history)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk"])
def test_trained_threshold_saes_encode_the_same_in_saelens(arch, tmp_path):
    """Trained with a pull towards lower thresholds (coefficient 0, large lr): the file sae_lens reads must
    encode as ours does (a negative JumpReLU threshold made the two differ)."""
    py = peer_python("saelens")
    from safetensors.torch import load_file, save_file

    x = next(SyntheticFeatures(n_features=32, d=16).batches(256, 1, seed=10))["x"]
    sae = _sae(arch)
    train_saes(sae, [{"x": x}] * 30, SAETrainConfig(total_steps=30, lr=0.05, warmup_steps=1, coefficient=0.0))
    sae.save(tmp_path / arch)
    save_file({"x": x}, str(tmp_path / arch / "inputs.safetensors"))
    script = str(Path(__file__).parent / "saelens_check.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run([py, script, str(tmp_path / arch)], check=True, env=env, capture_output=True, timeout=300)
    got = load_file(str(tmp_path / arch / "saelens_out.safetensors"))
    with torch.no_grad():
        assert_close(got["feature_acts"], sae.encode(x), rtol=1e-5, atol=1e-6)
        assert (got["feature_acts"] >= 0).all()
