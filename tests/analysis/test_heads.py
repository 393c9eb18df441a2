import pytest
import torch

from interplab.analysis.heads import attention_patterns, head_scores, pattern_masks, repeated_random_tokens
from tests.analysis.handbuilt import V, induction_model


def test_handbuilt_model_does_induction():
    model = induction_model()
    tokens = repeated_random_tokens(V, 10, 4, seed=1)
    logits = model(tokens)
    # in the second half the model predicts the token that followed the current one in the first half
    pred = logits[:, 10:-1].argmax(-1)
    assert (pred == tokens[:, 11:]).float().mean() > 0.8


def test_head_scores_single_out_previous_token_and_induction_heads():
    scores = head_scores(induction_model(), seq_len=10, batch=8)
    assert scores.top("previous_token", 1)[0][:2] == (0, 0)
    assert scores.top("induction", 1)[0][:2] == (1, 0)
    assert scores.top("copying", 1)[0][:2] == (1, 0)
    assert scores.previous_token[0, 0] > 0.95 and scores.induction[1, 0] > 0.8
    others_prev = torch.cat([scores.previous_token[0, 1:], scores.previous_token[1]])
    others_ind = torch.cat([scores.induction[0], scores.induction[1, 1:]])
    assert others_prev.max() < 0.3 and others_ind.max() < 0.3
    torch.testing.assert_close(scores.copying[1, 0], torch.tensor(1.0))
    torch.testing.assert_close(scores.copying[0], torch.zeros(2))  # L0H0 writes where W_U does not read


def test_pattern_masks_on_a_repeated_sequence():
    tokens = torch.tensor([[3, 5, 7, 3, 5, 7]])
    m = pattern_masks(tokens)
    assert m["induction"][0, 3].nonzero().flatten().tolist() == [1]
    assert m["duplicate_token"][0, 4].nonzero().flatten().tolist() == [1]
    assert m["previous_token"][0, 2].nonzero().flatten().tolist() == [1]


def test_head_scores_errors_and_views(tmp_path):
    model = induction_model()
    with pytest.raises(ValueError, match="seq_len=20"):
        head_scores(model, seq_len=20)
    scores = head_scores(model, seq_len=8, batch=2)
    scores.save(tmp_path / "heads.html")
    scores.save(tmp_path / "heads.json")
    with pytest.raises(ValueError, match="unknown head score 'bogus'"):
        scores.top("bogus")
    view = attention_patterns(model, repeated_random_tokens(V, 6, 1)[0], layer=0)
    assert view.patterns.shape == (2, 12, 12)
    fig = view.plot()
    assert len(fig.data) == 2 and len(fig.layout.updatemenus[0].buttons) == 2
    view.save(tmp_path / "attn.html")
    with pytest.raises(ValueError, match="unknown layer 2"):
        attention_patterns(model, torch.tensor([1, 2, 3]), layer=2)
