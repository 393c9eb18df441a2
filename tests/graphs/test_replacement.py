"""The replacement model with its error terms equals the original model (to float precision), on every
architecture that freezes linearly; what cannot is refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from interplab.graphs.replacement import ReplacementModel
from tests.graphs.helpers import HandCLT, HandCLTConfig, random_clt, variant_model

ARCHS = [
    "gpt2",
    "rotary_neox_rms_gated_gqa",
    "rotary_gptj_partial_parallel",
    "rotary_neox_partial_mqa",
    "bidirectional",
    "smeared_keys",
    "gemma_like",
    "qk_norm_local_global",
]
CASES = [(name, hook) for name in ARCHS for hook in (None, "blocks.{layer}.ln2.hook_normalized")]


@pytest.mark.parametrize(("name", "hook_in"), [*CASES, ("olmo_like", None)])  # OLMo-2 has no ln2 to read
def test_with_errors_equals_the_original(name, hook_in):
    model = variant_model(name)
    clt = random_clt(model, hook_in=hook_in)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9))
    run = ReplacementModel(model, clt).run(tokens)
    torch.testing.assert_close(run.logits, model(tokens))
    torch.testing.assert_close(run.recon + run.errors, run.mlp_out)
    assert (run.acts > 0).any() and (run.acts == 0).any()


def test_linear_in_the_features():
    """Given feature activations, the forward is affine: f(a + b) - f(0) = (f(a) - f(0)) + (f(b) - f(0))."""
    model = variant_model("gpt2")
    clt = random_clt(model)
    rm = ReplacementModel(model, clt)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 7))
    run = rm.run(tokens)

    def logits(acts):
        recon = rm.decode(acts)
        return rm.forward(run.tokens, run.frozen, run.embed, lambda layer, _x: recon[:, :, layer]).logits

    a, b = torch.randn_like(run.acts), torch.randn_like(run.acts)
    zero = logits(torch.zeros_like(a))
    torch.testing.assert_close(
        logits(a + b) - zero, (logits(a) - zero) + (logits(b) - zero), atol=1e-4, rtol=1e-4
    )


def test_refuses_attention_only():
    model = variant_model("attn_only_nonorm_nopos")
    clt = HandCLT(HandCLTConfig(n_layers=2, d_model=16, d_sae=4))
    with pytest.raises(ValueError, match="attention-only"):
        ReplacementModel(model, clt)


def test_refuses_resid_mid_of_a_parallel_model():
    model = variant_model("rotary_gptj_partial_parallel")
    clt = HandCLT(HandCLTConfig(n_layers=2, d_model=16, d_sae=4))
    with pytest.raises(ValueError, match=r"hook_resid_mid.*parallel"):
        ReplacementModel(model, clt)


def test_refuses_a_clt_of_another_model():
    model = variant_model("gpt2")
    clt = HandCLT(HandCLTConfig(n_layers=2, d_model=32, d_sae=4, model_name="big-model"))
    with pytest.raises(ValueError, match=r"big-model.*d_model 32.*d_model 16"):
        ReplacementModel(model, clt)


def test_refuses_a_clt_on_another_hook():
    model = variant_model("gpt2")
    clt = HandCLT(HandCLTConfig(n_layers=2, d_model=16, d_sae=4))
    object.__setattr__(clt.cfg, "hook_in", "blocks.{layer}.hook_resid_pre")  # written by another tool
    with pytest.raises(ValueError, match=r"blocks.0.hook_resid_pre.*blocks.0.hook_resid_mid"):
        ReplacementModel(model, clt)
    clt = HandCLT(HandCLTConfig(n_layers=2, d_model=16, d_sae=4))
    object.__setattr__(clt.cfg, "hook_out", "blocks.{layer}.hook_attn_out")
    with pytest.raises(ValueError, match=r"hook_attn_out.*hook_mlp_out"):
        ReplacementModel(model, clt)
