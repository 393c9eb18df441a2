import pytest
import torch

from interplab.analysis.heads import (
    attention_patterns,
    head_scores,
    masked_score,
    pattern_masks,
    repeated_random_tokens,
)
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


def test_the_probe_draws():
    distinct = repeated_random_tokens(50, 20, 6, seed=3, low=2)
    assert distinct.shape == (6, 40) and torch.equal(distinct[:, :20], distinct[:, 20:])
    assert all(len(set(row[:20].tolist())) == 20 for row in distinct) and int(distinct.min()) >= 2
    # with replacement: exactly a uniform draw of that seed (formation's probe, so its numbers reproduce)
    drawn = repeated_random_tokens(50, 20, 6, seed=3, low=2, distinct=False)
    torch.testing.assert_close(
        drawn[:, :20], torch.randint(2, 50, (6, 20), generator=torch.Generator().manual_seed(3))
    )
    with_bos = repeated_random_tokens(50, 5, 2, seed=3, bos=0)
    assert with_bos[:, 0].tolist() == [0, 0] and torch.equal(
        with_bos[:, 1:], repeated_random_tokens(50, 5, 2, seed=3)
    )
    with pytest.raises(ValueError, match="low=50"):
        repeated_random_tokens(50, 5, low=50)


def test_probe_targets_equal_token_targets_without_repeats_inside_a_half():
    for bos in (None, 1):
        tokens = repeated_random_tokens(V, 8, 5, seed=2, low=2, bos=bos)  # the BOS id not inside x
        by_tokens, by_period = pattern_masks(tokens), pattern_masks(tokens, period=8)
        for name in ("previous_token", "duplicate_token", "induction"):
            assert torch.equal(by_tokens[name], by_period[name]), name
    # a repeat inside the half: the tokens give query 6 three induction targets, the construction one
    tokens = torch.tensor([[3, 5, 3, 7, 3, 5, 3, 7]])
    assert pattern_masks(tokens)["induction"][0, 6].nonzero().flatten().tolist() == [1, 3, 5]
    assert pattern_masks(tokens, period=4)["induction"][0, 6].nonzero().flatten().tolist() == [3]
    with pytest.raises(ValueError, match="must repeat with period 3"):
        pattern_masks(tokens, period=3)


def test_masked_score_equals_a_plain_loop():
    patterns = torch.rand(2, 3, 2, 6, 6)  # layer batch head q k
    tokens = torch.tensor([[1, 2, 1, 2, 3, 1], [4, 4, 5, 6, 5, 4], [1, 2, 3, 4, 5, 6]])
    for name, mask in pattern_masks(tokens).items():
        got = masked_score(patterns, mask)
        pairs = [(b, q) for b in range(3) for q in range(6) if mask[b, q].any()]
        want = torch.stack(
            [torch.stack([patterns[:, b, :, q][..., mask[b, q]].sum(-1) for b, q in pairs]).mean(0)]
        )[0]
        torch.testing.assert_close(got, want, msg=name)
    assert torch.equal(masked_score(patterns, torch.zeros(3, 6, 6, dtype=torch.bool)), torch.zeros(2, 2))
