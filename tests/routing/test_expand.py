import pytest
import torch

from interplab.model import ModelConfig, Transformer
from interplab.routing import ablate_expansion, expand_mlp

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=40, n_ctx=16, d_mlp=48)


@pytest.mark.parametrize("gated", [False, True, "gate_bias"])
def test_expand_keeps_the_function_and_ablate_inverts_it(gated):
    torch.manual_seed(0)
    cfg = CFG.replace(
        gated_mlp=bool(gated), act_fn="silu" if gated else "gelu", gate_bias=gated == "gate_bias"
    )
    model = Transformer(cfg)
    if gated == "gate_bias":  # (biases start at zero: make the gate's count)
        with torch.no_grad():
            for block in model.blocks:
                block.mlp.b_gate.normal_(0, 1.0)
    tokens = torch.randint(0, 40, (3, 12))
    expanded, expansion = expand_mlp(model, 8, layers=[1])
    assert expanded.cfg.d_mlp == 56 and expansion.layers == (1,) and expansion.d_mlp_orig == 48
    torch.testing.assert_close(expanded(tokens), model(tokens))
    assert torch.count_nonzero(expanded.blocks[1].mlp.W_in[:, 48:]) > 0  # random inputs, zero outputs
    assert torch.count_nonzero(expanded.blocks[1].mlp.W_out[48:]) == 0
    assert torch.count_nonzero(expanded.blocks[0].mlp.W_in[:, 48:]) == 0  # unexpanded layer: inert units
    assert torch.equal(ablate_expansion(expanded, expansion)(tokens), model(tokens))


def test_ablation_equals_zeroing_the_units():
    torch.manual_seed(0)
    expanded, expansion = expand_mlp(Transformer(CFG), 8)
    with torch.no_grad():
        for block in expanded.blocks:
            block.mlp.W_out[48:].normal_()
    tokens = torch.randint(0, 40, (3, 12))

    def zero_extra(x, site):
        x = x.clone()
        x[..., 48:] = 0
        return x

    with expanded.hooks([(lambda name: name.endswith("mlp.hook_post"), zero_extra)]):
        reference = expanded(tokens)
    torch.testing.assert_close(ablate_expansion(expanded, expansion)(tokens), reference)
    assert not torch.allclose(expanded(tokens), reference)


def test_param_route_of_the_expansion_trains_only_it():
    torch.manual_seed(0)
    expanded, expansion = expand_mlp(Transformer(CFG), 8)
    with torch.no_grad():
        for block in expanded.blocks:
            block.mlp.W_out[48:].normal_(std=0.1)
    with expansion.param_route(extra=1.0, rest=0.0).apply(expanded):
        expanded(torch.randint(0, 40, (3, 12))).logsumexp(-1).mean().backward()
    for name, p in expanded.named_parameters():
        if p.grad is None:
            continue
        if ".mlp." in name and name.split(".")[-1] in ("W_in", "b_in", "W_out"):
            original = p.grad[..., :48] if name.endswith("W_in") else p.grad[:48]
            extra = p.grad[..., 48:] if name.endswith("W_in") else p.grad[48:]
            assert torch.count_nonzero(original) == 0 and torch.count_nonzero(extra) > 0, name
        else:
            assert torch.count_nonzero(p.grad) == 0, name


def test_expand_bad_input():
    model = Transformer(CFG)
    with pytest.raises(ValueError, match="n_units must be a positive int, got 0"):
        expand_mlp(model, 0)
    with pytest.raises(ValueError, match=r"layers \[2\] must be in 0..1"):
        expand_mlp(model, 4, layers=[2])
    with pytest.raises(ValueError, match="attention-only"):
        expand_mlp(Transformer(CFG.replace(attn_only=True)), 4)
    _, expansion = expand_mlp(model, 4)
    with pytest.raises(ValueError, match="d_mlp=48, but the expansion needs 48 \\+ 4"):
        ablate_expansion(model, expansion)
