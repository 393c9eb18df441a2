"""The chain-batched forward of `interplab.dynamics.chains` against the model it stands for: every chain's
next-token loss and gradient equal the model's own (`functional_call` + `lm_loss`, the reference path), and
whole SGLD runs through it equal the reference path's draws for a seed."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch.func import functional_call, grad_and_value

from interplab.dynamics import SGLDConfig, estimate_llc, llc, lm_loss
from interplab.dynamics.chains import ChainLoss, unsupported
from interplab.dynamics.llc import head_component, layer_component
from interplab.model import ModelConfig, Transformer

CONFIGS = {
    "rotary-attn-only": dict(positional="rotary", attn_only=True),
    "learned-mlp-tied": dict(positional="learned", attn_only=False, tie_embeddings=True, act_fn="gelu_new"),
    "smeared-partial-rotary-gptj": dict(
        positional="rotary", attn_only=True, smear_keys=True, rotary_dim=4, rotary_style="gptj"
    ),
    "no-norm-relu-unembed-bias": dict(
        positional="learned", attn_only=False, normalization="none", act_fn="relu", unembed_bias=True
    ),
}


def _model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=19, n_ctx=10, **kw))


def _perturbed(model: Transformer, chains: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Every parameter, one copy per chain, each moved off the model's weights (the smear gates too)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v.detach() + 0.05 * torch.randn(chains, *v.shape, generator=g) for k, v in model.named_parameters()
    }


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_chain_losses_and_gradients_equal_the_models(kw):
    model = _model(**kw)
    assert unsupported(model) is None
    C = 3
    params = _perturbed(model, C)
    tokens = torch.randint(0, 19, (C, 4, 10), generator=torch.Generator().manual_seed(2))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    losses = ChainLoss(model)(leaves, tokens)
    grads = torch.autograd.grad(losses.sum(), list(leaves.values()), materialize_grads=True)
    reference = grad_and_value(lambda p, t: lm_loss(functional_call(model, p, (t,)), (t,)))
    for c in range(C):
        grad, loss = reference({k: v[c] for k, v in params.items()}, tokens[c])
        torch.testing.assert_close(losses[c], loss, rtol=1e-5, atol=1e-6)
        for k, g in zip(leaves, grads, strict=True):
            torch.testing.assert_close(g[c], grad[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_frozen_parameters_are_the_models_own():
    """A parameter left out of the mapping is the model's weight, shared by the chains."""
    model = _model(**CONFIGS["rotary-attn-only"])
    params = _perturbed(model, 2)
    tokens = torch.randint(0, 19, (2, 3, 10), generator=torch.Generator().manual_seed(3))
    part = {k: v for k, v in params.items() if k.startswith("blocks.1.")}
    own = dict(model.named_parameters())
    full = {k: part.get(k, own[k].detach().expand(2, *own[k].shape)) for k in own}
    with torch.no_grad():
        torch.testing.assert_close(ChainLoss(model)(part, tokens), ChainLoss(model)(full, tokens))


@pytest.mark.parametrize("name", ["rotary-attn-only", "learned-mlp-tied", "smeared-partial-rotary-gptj"])
def test_sgld_through_the_chains_equals_the_reference_path(name):
    """The same minibatches and noise for a seed: the draws (loss traces), L(w*) and the estimate equal the
    per-chain reference path's, for the whole model and for a head and a layer."""
    model = _model(**CONFIGS[name])
    tokens = torch.randint(0, 19, (24, 10), generator=torch.Generator().manual_seed(4))
    cfg = SGLDConfig(
        step_size=1e-3, gamma=10.0, nbeta=20.0, chains=3, draws=30, burn_in=5, batch_size=6, seed=7
    )
    for component in (None, head_component(model, 1, 0), layer_component(model, 0)):
        fast = estimate_llc(model, (tokens,), lm_loss, cfg, component=component)
        ref = estimate_llc(model, (tokens,), lm_loss, cfg, component=component, vectorize=False)
        assert fast.n_params == ref.n_params
        torch.testing.assert_close(fast.init_loss, ref.init_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(fast.trace, ref.trace, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(fast.llc, ref.llc, rtol=1e-4, atol=1e-4)
        assert not torch.equal(fast.trace[0], fast.trace[1])  # the chains' own noise and batches


def test_full_batch_and_determinism():
    model = _model(**CONFIGS["rotary-attn-only"])
    tokens = torch.randint(0, 19, (8, 10), generator=torch.Generator().manual_seed(5))
    cfg = SGLDConfig(step_size=1e-3, gamma=10.0, chains=2, draws=10, burn_in=0, batch_size=None, seed=1)
    a = estimate_llc(model, (tokens,), lm_loss, cfg)
    torch.testing.assert_close(a.trace, estimate_llc(model, (tokens,), lm_loss, cfg, vectorize=False).trace)
    assert torch.equal(a.trace, estimate_llc(model, (tokens,), lm_loss, cfg).trace)


def test_what_the_chain_batched_path_does_not_cover():
    """Models it does not compute exactly take the generic path (`unsupported` says why)."""
    assert "without a gate" in unsupported(_model(attn_only=False, gated_mlp=True))
    assert "soft-capping" in unsupported(_model(logit_softcap=30.0))
    assert unsupported(torch.nn.Linear(2, 1)) == "not an interplab Transformer"
    model = _model(**CONFIGS["rotary-attn-only"])
    with model.hook_registry.scoped(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, site: x)]):
        assert "no hooks" in unsupported(model)
    with pytest.raises(ValueError, match="needs"):
        ChainLoss(_model(logit_softcap=30.0))


def test_chains_grouped_or_one_by_one_give_the_same_draws(monkeypatch):
    """Large minibatches run the chains in groups (`CHAIN_GROUP_TOKENS`): the draws are the same."""
    from interplab.dynamics import llc

    model = _model(**CONFIGS["learned-mlp-tied"])
    tokens = torch.randint(0, 19, (24, 10), generator=torch.Generator().manual_seed(6))
    cfg = SGLDConfig(
        step_size=1e-3, gamma=10.0, nbeta=20.0, chains=3, draws=12, burn_in=0, batch_size=6, seed=2
    )
    together = estimate_llc(model, (tokens,), lm_loss, cfg)
    for group_tokens in (60, 120):  # one chain per forward; two, then one
        monkeypatch.setattr(llc, "CHAIN_GROUP_TOKENS", group_tokens)
        grouped = estimate_llc(model, (tokens,), lm_loss, cfg)
        torch.testing.assert_close(grouped.trace, together.trace, rtol=2e-5, atol=1e-6)
    ref = estimate_llc(model, (tokens,), lm_loss, cfg, vectorize=False)
    torch.testing.assert_close(grouped.trace, ref.trace, rtol=2e-5, atol=1e-6)


def test_attention_and_rotary_functions_have_their_gradients():
    """The two hand-written autograd Functions of the chain-batched forward: forward equal to the plain
    formula, backward equal to the numerical gradient (float64 gradcheck)."""
    from interplab.dynamics.chains import _CausalAttention, _Rotary

    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)
    plain = torch.softmax(q @ k.transpose(1, 2) * 0.5 + mask, -1) @ v
    torch.testing.assert_close(_CausalAttention.apply(q, k, v, mask, 0.5), plain)
    assert torch.autograd.gradcheck(lambda *t: _CausalAttention.apply(*t, mask, 0.5), (q, k, v))
    model = _model(**CONFIGS["smeared-partial-rotary-gptj"])  # rotary on 4 of 8 dimensions
    chain_loss = ChainLoss(model)
    cos, sin, sin_swapped = (t.double() for t in chain_loss._tables(5))
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    from interplab.model.attention import apply_rotary

    cos_r, sin_r = (t.double() for t in model._rotary_range(0, 5, x.device))  # [1 pos 1 rotary_dim]
    expected = apply_rotary(x.transpose(1, 2), cos_r, sin_r, model.cfg.rotary_style)
    rotary = (cos, sin, sin_swapped, chain_loss.swap)
    torch.testing.assert_close(_Rotary.apply(x, *rotary), expected.transpose(1, 2))
    assert torch.autograd.gradcheck(lambda t: _Rotary.apply(t, *rotary), (x,))


@pytest.mark.slow  # the compile: ~1 min on two loaded cores
@pytest.mark.filterwarnings("ignore::interplab.dynamics.llc.LLCConvergenceWarning")
def test_compiled_chains_equal_the_eager_ones():
    """``compile=True``: the same draws as the eager chain-batched path (several chains, MLPs, rotary), and a
    clear error where there is no chain-batched path to compile."""
    model = _model(**CONFIGS["rotary-attn-only"] | {"attn_only": False})
    tokens = torch.randint(0, 19, (24, 10), generator=torch.Generator().manual_seed(9))
    cfg = SGLDConfig(step_size=1e-3, gamma=10.0, nbeta=20.0, chains=3, draws=8, burn_in=2, batch_size=4)
    eager = estimate_llc(model, (tokens,), lm_loss, cfg)
    compiled = estimate_llc(model, (tokens,), lm_loss, cfg, compile=True)
    torch.testing.assert_close(compiled.trace, eager.trace, rtol=2e-5, atol=1e-6)
    with pytest.raises(ValueError, match="compile=True needs the chain-batched path.*vectorize=False"):
        estimate_llc(model, (tokens,), lm_loss, cfg, vectorize=False, compile=True)
    with pytest.raises(ValueError, match="compile=True needs.*soft-capping"):
        estimate_llc(_model(logit_softcap=30.0), (tokens,), lm_loss, cfg, compile=True)


def test_compiled_step_may_hold_more_graphs_than_dynamos_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each set of sampled parameters (a component) is a graph of its own; past dynamo's default of 8 per
    function the rest would run eager without a word, so the compiled step raises the limit while it runs
    (checked here with a stand-in for torch.compile: a real compile per graph takes seconds)."""
    seen: list[int] = []

    def fake_compile(fn, **kwargs):
        def run(*args):
            seen.append(torch._dynamo.config.recompile_limit)
            return fn(*args)

        return run

    monkeypatch.setattr(llc, "_compiled", None)
    monkeypatch.setattr(llc.torch, "compile", fake_compile)
    before = torch._dynamo.config.recompile_limit
    out = llc._compiled_call()(lambda params, tokens: tokens.sum(), {}, torch.ones(3))
    assert float(out) == 3.0
    assert seen == [llc.RECOMPILE_LIMIT] and llc.RECOMPILE_LIMIT > 8
    assert torch._dynamo.config.recompile_limit == before  # restored after the call
