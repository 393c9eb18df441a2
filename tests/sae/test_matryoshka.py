"""Matryoshka BatchTopK SAEs: prefix losses equal a hand computation and sae_lens' own training forward,
nested planted features are recovered with the coarse ones in the first prefix, files round-trip and
sae_lens reads them, the CLI trains one."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from interplab.sae import SAEConfig, SAETrainConfig, create_sae, load_sae, train_saes
from interplab.sae.activations import TensorActivations
from interplab.sae.architectures.matryoshka import MatryoshkaSAE
from interplab.sae.io import saelens_config
from tests.peers import peer_env, peer_python

HERE = Path(__file__).parent
RESID = "blocks.0.hook_resid_post"


def randomised(d_in=8, d_sae=32, k=3, widths=(4, 12), seed=0) -> MatryoshkaSAE:
    sae = create_sae(
        SAEConfig(d_in=d_in, d_sae=d_sae, architecture="matryoshka", k=k, matryoshka_widths=widths),
        seed=seed,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    assert isinstance(sae, MatryoshkaSAE)
    return sae


def hand_loss(
    sae: MatryoshkaSAE, x: torch.Tensor
) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
    """BatchTopK by hand (the k * batch largest ReLU pre-activations over the batch) and one squared error
    per prefix width, written out with explicit loops."""
    W_enc, b_enc, W_dec, b_dec = (t.detach() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = torch.relu((x - b_dec) @ W_enc + b_enc)
    n_keep = sae.cfg.k * x.shape[0]
    cut = pre.flatten().sort(descending=True).values[n_keep - 1]
    acts = torch.where(pre >= cut, pre, torch.zeros_like(pre))
    losses = {}
    for w in sae.widths:
        recon = torch.zeros_like(x) + b_dec
        for j in range(w):
            recon = recon + acts[:, j : j + 1] * W_dec[j]
        losses[w] = ((recon - x) ** 2).sum(-1).mean()
    return sum(losses.values()), losses, acts


def test_widths_resolved_and_validated():
    cfg = SAEConfig(d_in=8, d_sae=64, architecture="matryoshka", k=4)
    assert cfg.matryoshka_widths == (4, 16, 64)
    assert SAEConfig(
        d_in=8, d_sae=64, architecture="matryoshka", k=4, matryoshka_widths=(8, 32)
    ).matryoshka_widths == (8, 32, 64)
    assert (
        SAEConfig(d_in=8, d_sae=64, architecture="batchtopk", k=4, matryoshka_widths=(8,)).matryoshka_widths
        is None
    )
    for bad in [(16, 8), (0, 8), (8, 100)]:
        with pytest.raises(ValueError, match="matryoshka_widths"):
            SAEConfig(d_in=8, d_sae=64, architecture="matryoshka", k=4, matryoshka_widths=bad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_losses_equal_hand_computation(seed):
    sae = randomised(seed=seed)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed))
    total, per_width, acts = hand_loss(sae, x)
    out = sae.loss(x, with_counts=True)
    assert_close(out.feature_acts, acts)
    assert_close(out.mse, per_width[32])
    assert_close(out.loss, total)  # no dead latents: AuxK is 0
    got = sae.prefix_losses(x)
    assert list(got) == [4, 12, 32]
    for w in got:
        assert_close(got[w], per_width[w])


def test_one_width_is_batchtopk():
    """With a single width the Matryoshka loss is BatchTopK's, bit for bit."""
    m = randomised(widths=(32,))
    b = create_sae(m.cfg.replace(architecture="batchtopk", matryoshka_widths=None))
    b.load_state_dict(m.state_dict())
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    assert_close(m.loss(x).loss, b.loss(x).loss, rtol=0, atol=0)


def test_gradient_flows_through_inner_losses():
    """Inner prefix losses reach the first latents' decoder rows: their gradient differs from BatchTopK's."""
    m = randomised()
    b = create_sae(m.cfg.replace(architecture="batchtopk", matryoshka_widths=None))
    b.load_state_dict(m.state_dict())
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(6))
    m.loss(x).loss.backward()
    b.loss(x).loss.backward()
    assert not torch.allclose(m.W_dec.grad[:4], b.W_dec.grad[:4])


def nested_planted(n: int, d_in=32, n_coarse=4, n_fine=24, seed=0):
    """Orthogonal directions; coarse features fire on half the tokens, fine ones rarely (each only together
    with its coarse parent: the nested structure that makes plain SAEs absorb the parent)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0].T[: n_coarse + n_fine]
    coarse = (torch.rand(n, n_coarse, generator=g) < 0.5).float()
    parent = torch.arange(n_fine) % n_coarse
    fine = (torch.rand(n, n_fine, generator=g) < 0.08).float() * coarse[:, parent]
    mags = 1 + 0.2 * torch.rand(n, n_coarse + n_fine, generator=g)
    acts = torch.cat([coarse, fine], 1) * mags
    return acts @ dirs, dirs, n_coarse


def test_planted_nested_features_recovered_coarse_first():
    """Trained side by side with a BatchTopK SAE (same k, width, data, seed): the Matryoshka SAE recovers the
    features (cosine of the best-matching decoder row), carries the coarse ones in its first prefix of 8
    latents, and absorbs them less than BatchTopK does (the effect the architecture exists for)."""
    x, dirs, n_coarse = nested_planted(20_000)
    saes = {
        arch: create_sae(
            SAEConfig(
                d_in=32,
                d_sae=64,
                architecture=arch,
                k=4,
                matryoshka_widths=(8, 32) if arch == "matryoshka" else None,
                hook_name=RESID,
            ),
            seed=0,
        )
        for arch in ("matryoshka", "batchtopk")
    }
    train_saes(
        saes,
        TensorActivations({RESID: x}, batch_size=512, epochs=40, seed=0),
        # 600 steps: the same margins as 1,500 (smallest fine cosine 0.890 vs 0.891, 3 of 4 coarse features in
        # the prefix, coarse gap 0.106 vs 0.106) at 0.34x the CPU time
        SAETrainConfig(total_steps=600, lr=3e-3, warmup_steps=50, autocast=False, log_every=300),
    )
    cos = {}
    for arch, sae in saes.items():
        W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
        cos[arch] = dirs @ W.T  # [feature, latent]
    m = cos["matryoshka"]
    assert float(m[n_coarse:].max(1).values.min()) > 0.85, m[n_coarse:].max(1)
    in_prefix = m[:n_coarse, :8].max(1).values
    assert int((in_prefix > 0.95).sum()) >= n_coarse - 1, in_prefix
    coarse = {arch: float(c[:n_coarse].max(1).values.mean()) for arch, c in cos.items()}
    assert coarse["matryoshka"] > coarse["batchtopk"] + 0.05, coarse


@pytest.mark.parametrize("seed", [0, 4])
def test_save_load_round_trip(tmp_path, seed):
    sae = randomised(seed=seed)
    sae.threshold.fill_(0.2)
    sae.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"  # saved for inference, as sae_lens saves it
    assert cfg["metadata"]["interplab"]["matryoshka_widths"] == [4, 12, 32]
    back = load_sae(tmp_path / "m")
    assert type(back) is MatryoshkaSAE and back.cfg == sae.cfg
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(seed))
    assert_close(back(x).feature_acts, sae(x).feature_acts)
    assert_close(back(x).reconstruction, sae(x).reconstruction)
    assert saelens_config(sae.cfg)["architecture"] == "jumprelu"


def test_reads_a_saelens_matryoshka_training_checkpoint(tmp_path):
    """A sae_lens training checkpoint (architecture matryoshka_batchtopk, topk_threshold) loads as ours."""
    sae = randomised()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    w = {k: getattr(sae, k).detach().clone() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file({**w, "topk_threshold": torch.tensor(0.25)}, str(folder / "sae_weights.safetensors"))
    raw = {
        "d_in": 8,
        "d_sae": 32,
        "k": 3,
        "matryoshka_widths": [4, 12, 32],
        "architecture": "matryoshka_batchtopk",
    }
    (folder / "cfg.json").write_text(
        json.dumps(
            {**raw, "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.0.hook_resid_post"}}
        )
    )
    back = load_sae(folder)
    assert isinstance(back, MatryoshkaSAE) and back.widths == (4, 12, 32)
    assert float(back.threshold) == pytest.approx(0.25)
    assert_close(back.W_dec.detach(), w["W_dec"])


# ---- with the real sae_lens (the peer environment) -------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_training_loss_equals_saelens(tmp_path, seed):
    """sae_lens' MatryoshkaBatchTopKTrainingSAE on the same weights and batch: the same total loss, inner
    prefix losses, and feature activations."""
    py = peer_python("saelens")
    sae = randomised(seed=seed)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed))
    w = {k: getattr(sae, k).detach().clone().contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file({**w, "x": x}, str(tmp_path / "weights.safetensors"))
    setup = {"d_in": 8, "d_sae": 32, "k": 3, "matryoshka_widths": list(sae.widths)}
    (tmp_path / "setup.json").write_text(json.dumps(setup))
    subprocess.run(
        [py, str(HERE / "matryoshka_saelens_loss.py"), str(tmp_path)], check=True, env=peer_env(), timeout=300
    )
    got = load_file(str(tmp_path / "saelens_loss.safetensors"))
    out = sae.loss(x)
    ours = sae.prefix_losses(x)
    assert_close(got["loss"], out.loss.detach(), rtol=1e-5, atol=1e-4)
    assert_close(got["mse_loss"], out.mse.detach(), rtol=1e-5, atol=1e-4)
    for w_ in sae.widths[:-1]:
        assert_close(got[f"inner_mse_loss_{w_}"], ours[w_].detach(), rtol=1e-5, atol=1e-4)
    assert_close(got["feature_acts"], out.feature_acts.detach(), rtol=1e-5, atol=1e-5)


def test_saelens_loads_our_matryoshka_file(tmp_path):
    """sae_lens.SAE.load_from_disk reads our file as the JumpReLU SAE it is at inference: same numbers."""
    py = peer_python("saelens")
    sae = randomised()
    sae.threshold.fill_(0.2)
    sae.save(tmp_path / "m")
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, str(tmp_path / "m" / "inputs.safetensors"))
    subprocess.run(
        [py, str(HERE / "saelens_check.py"), str(tmp_path / "m")], check=True, env=peer_env(), timeout=300
    )
    got = load_file(str(tmp_path / "m" / "saelens_out.safetensors"))
    assert_close(got["feature_acts"], sae.encode(x), rtol=1e-5, atol=1e-5)
    assert_close(got["reconstruction"], sae(x).reconstruction, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "m" / "saelens_out.json").read_text())["class"] == "JumpReLUSAE"
