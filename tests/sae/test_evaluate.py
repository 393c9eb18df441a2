import json
import math

import pytest
import torch
from torch.testing import assert_close

from interplab.sae import SAEConfig, create_sae
from interplab.sae.evaluate import evaluate_sae
from tests.sae.helpers import token_batches

HOOK = "blocks.0.hook_resid_post"


def identity_sae(d: int, hook: str = HOOK):
    """relu(x) - relu(-x) = x exactly: an "SAE" that reconstructs perfectly."""
    sae = create_sae(SAEConfig(d_in=d, d_sae=2 * d, hook_name=hook, apply_b_dec_to_input=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_identity_sae_recovers_everything(tiny_model):
    report = evaluate_sae(tiny_model, identity_sae(32), token_batches(3))
    assert report.ce_loss_recovered == 1.0 and report.ce_loss_recovered_vs_mean == 1.0
    assert report.fvu == 0.0 and report.mse == 0.0
    assert report.kl_div == pytest.approx(0.0, abs=1e-6)
    assert report.ce_spliced == report.ce_clean
    assert report.tokens == 3 * 4 * 15


def test_zero_sae_is_zero_ablation(tiny_model):
    sae = create_sae(SAEConfig(d_in=32, d_sae=64, hook_name=HOOK))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    report = evaluate_sae(tiny_model, sae, token_batches(3))
    assert report.ce_spliced == report.ce_zero_ablation
    assert report.ce_loss_recovered == 0.0
    assert report.dead_fraction == 1.0 and report.l0 == 0.0
    assert report.ce_zero_ablation != report.ce_clean


def test_metrics_match_a_direct_computation(tiny_model, tmp_path):
    torch.manual_seed(3)
    sae = create_sae(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=5, hook_name=HOOK))
    batches = token_batches(2)
    report = evaluate_sae(tiny_model, sae, batches)
    xs = torch.cat(
        [tiny_model.run_with_cache(b, names=[HOOK])[1][HOOK][:, 1:].reshape(-1, 32) for b in batches]
    )
    with torch.no_grad():
        out = sae(xs)
    assert report.l0 == pytest.approx(float((out.feature_acts != 0).sum(-1).float().mean()), rel=1e-5)
    fvu = (out.reconstruction - xs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
    assert report.fvu == pytest.approx(float(fvu), rel=1e-4)
    density = (out.feature_acts != 0).float().mean(0)
    assert_close(report.density, density)
    assert report.dead_fraction == pytest.approx(float((density == 0).float().mean()))
    assert 0 < report.kl_div and math.isfinite(report.ce_loss_recovered)
    report.save(tmp_path / "r")
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["fvu"] == report.fvu and sum(data["density_histogram"]["counts"]) == int((density > 0).sum())
    assert (tmp_path / "r" / "density.html").stat().st_size > 1000


def test_transcoder_is_spliced_at_its_output(tiny_model):
    sae = create_sae(SAEConfig(d_in=32, d_sae=64, hook_name=HOOK, hook_name_out="blocks.1.hook_resid_pre"))
    d = 32
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    report = evaluate_sae(tiny_model, sae, token_batches(2))  # resid_post 0 == resid_pre 1: perfect
    assert report.ce_loss_recovered == 1.0 and report.hook_name == "blocks.1.hook_resid_pre"


def test_wrong_width_is_a_clear_error(tiny_model):
    sae = create_sae(SAEConfig(d_in=64, d_sae=64, hook_name="blocks.0.mlp.hook_post"))
    sae_bad = create_sae(SAEConfig(d_in=16, d_sae=64, hook_name=HOOK))
    with pytest.raises(ValueError, match=r"d_in=16 but blocks.0.hook_resid_post has width 32"):
        evaluate_sae(tiny_model, sae_bad, token_batches(1))
    evaluate_sae(tiny_model, sae, token_batches(1))  # d_mlp = 64 fits


@pytest.mark.parametrize("reshape", ["hook_z", "none"])
def test_per_head_site_is_evaluated_on_flat_rows(tiny_model, reshape):
    """attn.hook_z is [batch, pos, head, d_head]: the SAE sees n_heads * d_head wide rows, the metrics are over
    those rows, and the reconstruction is spliced back per head (either reshape mode)."""
    hook = "blocks.1.attn.hook_z"
    identity = identity_sae(32, hook)
    sae = create_sae(identity.cfg.replace(reshape_activations=reshape))
    sae.load_state_dict(identity.state_dict())
    report = evaluate_sae(tiny_model, sae, token_batches(2))
    assert report.fvu == 0.0 and report.ce_spliced == report.ce_clean
    assert report.cosine == pytest.approx(1.0)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    report = evaluate_sae(tiny_model, sae, token_batches(2))
    tokens = torch.cat(token_batches(2))
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens, names=[hook])
        x = cache[hook][:, 1:].flatten(2).reshape(-1, 32)  # BOS dropped, as the default TokenFilter does
        mse = float((sae(x).reconstruction - x).pow(2).sum(-1).mean())
    assert report.mse == pytest.approx(mse, rel=1e-4)
