"""Parameters with ``requires_grad=False`` (an interplab `Transformer`'s biases switched off by its config)
are not free parameters of the model: the LLC leaves them at w*, like buffers, and does not count them."""

from __future__ import annotations

import warnings

import pytest
import torch

from interplab.dynamics import SGLDConfig, estimate_llc, lm_loss
from interplab.dynamics.hmc import HMCConfig, estimate_llc_hmc
from interplab.dynamics.llc import Component, head_component, layer_component, trainable
from interplab.model import ModelConfig, Transformer

CFG = SGLDConfig(step_size=1e-3, gamma=10.0, nbeta=30.0, chains=2, draws=5, burn_in=1, batch_size=4, seed=3)


def _model() -> tuple[Transformer, torch.Tensor]:
    """No attention, MLP or unembedding biases (frozen parameters), the frozen ones set away from zero so
    that sampling them would change the loss."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=16, n_layers=1, n_heads=2, d_vocab=19, n_ctx=8, d_mlp=32, attn_bias=False, mlp_bias=False
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.normal_(0, 0.3)
    return model, torch.randint(0, 19, (12, 8), generator=torch.Generator().manual_seed(1))


def _as_buffers(model: Transformer) -> Transformer:
    """A copy of ``model`` with every frozen parameter a buffer of the same value."""
    twin = Transformer(model.cfg)
    twin.load_state_dict(model.state_dict())
    for name, p in list(twin.named_parameters()):
        if not p.requires_grad:
            owner, _, leaf = name.rpartition(".")
            mod = twin.get_submodule(owner)
            del mod._parameters[leaf]
            mod.register_buffer(leaf, p.detach().clone())
    return twin


def test_the_model_has_frozen_parameters():
    model, _ = _model()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"unembed.b_U", "blocks.0.attn.b_Q", "blocks.0.mlp.b_in"} <= frozen
    assert frozen.isdisjoint(trainable(model))


@pytest.mark.parametrize("vectorize", [None, False, True])
def test_frozen_parameters_are_left_at_w_star_like_buffers(vectorize):
    """The same estimate, trace for trace, as the model whose frozen parameters are buffers, on every path
    (the chain-batched kernel, one call per chain, vmap); n_params counts the trainable entries only."""
    model, tokens = _model()
    twin = _as_buffers(model)
    assert not any(not p.requires_grad for p in twin.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = estimate_llc(model, (tokens,), lm_loss, CFG, vectorize=vectorize)
        ref = estimate_llc(twin, (tokens,), lm_loss, CFG, vectorize=vectorize)
    torch.testing.assert_close(ours.trace, ref.trace)
    torch.testing.assert_close(ours.llc, ref.llc)
    assert ours.n_params == ref.n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ours.n_params < sum(p.numel() for p in model.parameters())


def test_the_hmc_reference_samples_the_same_set():
    model, tokens = _model()
    twin = _as_buffers(model)
    cfg = HMCConfig(chains=2, draws=4, burn_in=4, leapfrog_steps=2, nbeta=30.0, gamma=10.0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = estimate_llc_hmc(model, (tokens,), lm_loss, cfg)
        ref = estimate_llc_hmc(twin, (tokens,), lm_loss, cfg)
    assert ours.n_params == ref.n_params == sum(p.numel() for p in trainable(model).values())
    torch.testing.assert_close(ours.llc, ref.llc)


def test_components_leave_frozen_parameters_out():
    model, _ = _model()
    head = head_component(model, 0, 1)
    assert set(head.masks) == {f"blocks.0.attn.{n}" for n in ("W_Q", "W_K", "W_V", "W_O")}
    layer = layer_component(model, 0)
    assert set(layer.masks) == {n for n in trainable(model) if n.startswith("blocks.0.")}
    assert "blocks.0.mlp.b_in" not in layer.masks and "blocks.0.mlp.W_in" in layer.masks
    with pytest.raises(ValueError, match=r"no trainable parameter matches \['unembed.b_U'\]"):
        Component.matching(model, "unembed.b_U")
    _, tokens = _model()
    by_hand = Component("bias", {"unembed.b_U": None})
    with pytest.raises(ValueError, match=r"requires_grad=False.*\['unembed.b_U'\]"):
        estimate_llc(model, (tokens,), lm_loss, CFG, component=by_hand)


def test_a_model_with_nothing_trainable_is_refused_with_the_fix():
    model, tokens = _model()
    model.requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"none of the model's \d+ parameters has requires_grad=True.*requires_grad_\(True\)"
    ):
        estimate_llc(model, (tokens,), lm_loss, CFG)
