import pytest
import torch

from interplab.analysis import LogitDiff, activation_patch
from interplab.analysis.attribution import attribution_patch, compare_patching
from interplab.model import ModelConfig, Transformer


def linear_model() -> Transformer:
    """No norms, no MLPs, constant (uniform causal) attention: logits are affine in every residual-stream
    activation, head output, value and attention pattern."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            d_model=24,
            n_layers=2,
            n_heads=3,
            d_vocab=30,
            n_ctx=12,
            attn_only=True,
            normalization="none",
            init_range=0.3,
        )
    )
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.zero_()
            block.attn.b_Q.zero_()
    return model


@pytest.mark.parametrize(
    "target,by_position",
    [
        ("resid_pre", None),
        ("resid_post", None),
        ("attn_out", None),
        ("z", False),
        ("z", True),
        ("v", True),
        ("pattern", False),
        ("pattern", True),
    ],
)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_is_exact_for_a_linear_model(target, by_position, direction):
    model = linear_model()
    clean, corrupted = torch.randint(0, 30, (4, 6)), torch.randint(0, 30, (4, 6))
    metric = LogitDiff(answer=torch.tensor([1, 2, 3, 4]), wrong=torch.tensor([5, 6, 7, 8]))
    exact = activation_patch(
        model, clean, corrupted, metric, target, by_position=by_position, direction=direction
    )
    approx = attribution_patch(
        model, clean, corrupted, metric, target, by_position=by_position, direction=direction
    )
    assert approx.dims == exact.dims
    torch.testing.assert_close(approx.per_example, exact.per_example, atol=1e-4, rtol=1e-5)
    assert compare_patching(exact, approx).max_abs_error < 1e-4


def _train_first_token_copier(steps: int = 250) -> Transformer:
    """A 2-layer model trained to output the sequence's first token at the last position."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, d_vocab=12, n_ctx=8, d_mlp=64))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        tokens = torch.randint(0, 12, (64, 6))
        loss = torch.nn.functional.cross_entropy(model(tokens)[:, -1], tokens[:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_attribution_correlates_with_activation_patching_on_a_trained_model():
    model = _train_first_token_copier()
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 12, (16, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 0] = (clean[:, 0] + 1 + torch.randint(0, 11, (16,), generator=g)) % 12
    metric = LogitDiff(answer=clean[:, 0], wrong=corrupted[:, 0])
    with torch.no_grad():
        assert float(metric(model(clean)).mean()) > 2.0  # the model learned the task
    exact = activation_patch(model, clean, corrupted, metric, "resid_pre")
    approx = attribution_patch(model, clean, corrupted, metric, "resid_pre")
    comparison = compare_patching(exact, approx)
    assert comparison.correlation > 0.9, comparison
    assert len(comparison.plot().data[0].x) == 2 * 6


def test_compare_rejects_different_layouts(model, pair):
    clean, corrupted = pair
    metric = LogitDiff(answer=torch.tensor([1, 2, 3]), wrong=torch.tensor([4, 5, 6]))
    a = activation_patch(model, clean, corrupted, metric, "resid_pre")
    b = attribution_patch(model, clean, corrupted, metric, "z")
    with pytest.raises(ValueError, match="differ in layout"):
        compare_patching(a, b)
