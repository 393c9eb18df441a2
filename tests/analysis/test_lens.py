import pytest
import torch

from interplab.analysis.lens import direct_logit_attribution, logit_lens, residual_decomposition
from tests.analysis.conftest import VARIANTS, make_model


@pytest.mark.parametrize("variant", ["gpt2", "rotary-gqa-rms-gated", "smear-attn-only", "parallel"])
def test_dla_components_sum_to_the_logit_difference(variant):
    model = make_model(**VARIANTS[variant], unembed_bias=True)
    with torch.no_grad():
        model.unembed.b_U.normal_()
        for p in model.parameters():  # non-trivial norm weights and biases
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    tokens = torch.randint(0, 50, (4, 9))
    answer, wrong = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])
    positions = torch.tensor([8, 5, -1, 2])
    dla = direct_logit_attribution(model, tokens, answer, wrong, positions=positions)
    torch.testing.assert_close(
        torch.tensor(dla.sum_of_components()), torch.tensor(dla.total), atol=1e-4, rtol=1e-5
    )
    decomposition = residual_decomposition(model, tokens, answer, wrong, positions=positions)
    torch.testing.assert_close(decomposition.accumulated[-1], torch.tensor(dla.total), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(
        decomposition.components.sum() + decomposition.biases, torch.tensor(dla.total), atol=1e-4, rtol=1e-5
    )


def test_neuron_attributions_sum_to_mlp_minus_bias():
    model = make_model()
    tokens = torch.randint(0, 50, (2, 6))
    dla = direct_logit_attribution(model, tokens, 3, 4)
    without = direct_logit_attribution(model, tokens, 3, 4, neurons=False)
    assert without.neurons is None
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.b_out.zero_()
    zero_bias = direct_logit_attribution(model, tokens, 3, 4)
    torch.testing.assert_close(zero_bias.neurons.sum(-1), zero_bias.mlps, atol=1e-5, rtol=1e-5)
    assert dla.top_neurons(3)[0][2] != 0


def test_logit_lens_final_layer_is_the_model(tmp_path):
    model = make_model()
    tokens = torch.randint(0, 50, (3, 8))
    lens = logit_lens(model, tokens)
    assert lens.logprob_next.shape == (3, 7)  # 2 layers + final, 7 next-token positions
    expected = torch.log_softmax(model(tokens), -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0].mean(0)
    torch.testing.assert_close(lens.logprob_next[-1], expected, atol=1e-5, rtol=1e-5)
    assert lens.top_tokens[-1][0] == str(int(model(tokens)[0, 0].argmax()))
    lens.save(tmp_path / "lens.html")
    dla = direct_logit_attribution(model, tokens, 1, 2)
    dla.save(tmp_path / "dla.html")
    dla.save(tmp_path / "dla.json")
    residual_decomposition(model, tokens, 1, 2).save(tmp_path / "resid.html")


def test_dla_bad_ids():
    model = make_model()
    with pytest.raises(ValueError, match="out of range for d_vocab_out=50"):
        direct_logit_attribution(model, torch.randint(0, 50, (2, 5)), 99, 1)
