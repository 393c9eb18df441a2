"""The REMIX paren features (interplab.scrub.parens) against direct hand computations on hand-made strings.

Integer features are checked against a character-by-character reading of the string with `fractions.Fraction`;
the model-derived ones (h00_open_vector, phi, the adjusted proportion of 3b) against loop-by-loop
recomputations of REMIX's definitions on a random model of the paren balancer's shape (no fixture needed).
"""

import math
from fractions import Fraction

import pytest
import torch

from interplab.model import Transformer
from interplab.scrub.parens import (
    adjusted_attention,
    adjusted_horizon,
    adjusted_p_open_after,
    as_fraction,
    count_and_open,
    count_equal,
    h00_open_vector,
    horizon,
    horizon_all,
    horizon_at,
    horizon_ok,
    input_length,
    p1_if_starts_open,
    p_open_after,
    phi,
    starts_open,
    tokenize,
)
from interplab.tasks.parens import ParensTask

STRINGS = ["(()", "()()", ")(", "(())()", "))((", "(((", ")", "((()))", "()))((", "(()))(()"]


def hand_tokens(s: str) -> list[str]:
    return ["S", *s, "E"] + ["P"] * (40 - len(s))


def hand_p(s: str, i: int) -> Fraction | None:
    """Proportion of '(' among parens at positions >= i of the token list."""
    rest = [c for c in hand_tokens(s)[i:] if c in "()"]
    return Fraction(rest.count("("), len(rest)) if rest else None


def hand_horizon(s: str, i: int) -> int:
    toks = hand_tokens(s)
    if toks[i] == "P":
        return 0
    if toks[i] == "E":
        return -1 if toks[i - 1] == "(" else 1
    p = hand_p(s, i)
    assert p is not None
    return -2 if p > Fraction(1, 2) else 2


def test_whole_string_features_match_a_hand_reading():
    t = tokenize(STRINGS)
    assert count_equal(t).tolist() == [s.count("(") == s.count(")") for s in STRINGS]
    assert starts_open(t).tolist() == [s[0] == "(" for s in STRINGS]
    assert count_and_open(t).tolist() == [s.count("(") == s.count(")") and s[0] == "(" for s in STRINGS]
    assert input_length(t).tolist() == [len(s) + 2 for s in STRINGS]


def test_p_open_after_is_an_exact_reduced_fraction_per_position():
    t = tokenize(STRINGS)
    num, den = p_open_after(t)
    for r, s in enumerate(STRINGS):
        for i in range(42):
            assert as_fraction(num[r, i], den[r, i]) == hand_p(s, i), (s, i)
            if den[r, i]:
                assert math.gcd(int(num[r, i]), int(den[r, i])) == 1  # reduced: equal p, equal value


def test_p1_if_starts_open_has_one_class_for_closed_starts_and_p_otherwise():
    t = tokenize(STRINGS)
    values = [tuple(v) for v in p1_if_starts_open(t).tolist()]
    for s, v in zip(STRINGS, values, strict=True):
        if s[0] == ")":
            assert v == (-1, 1)
        else:
            p = Fraction(s.count("("), len(s))
            assert v == (p.numerator, p.denominator)
    # equal proportions with different counts are one class: 2/4 and 3/6 -> (1, 2)
    assert values[STRINGS.index("()()")] == values[STRINGS.index("(())()")] == (1, 2)


def test_horizon_classes_per_position_and_horizon_all():
    t = tokenize(STRINGS)
    h = horizon(t)
    assert h.shape == (len(STRINGS), 42)
    for r, s in enumerate(STRINGS):
        assert h[r].tolist() == [hand_horizon(s, i) for i in range(42)], s
        assert horizon_at(3)(t)[r] == hand_horizon(s, 3)
    # p exactly 1/2 is +2 ("at most half"), never split: "()()" at 0, 2 and "(())()" at 0, 4
    assert h[1, 0] == h[1, 2] == h[3, 0] == h[3, 4] == 2
    assert horizon_all(t).tolist() == horizon_ok(t).tolist()


def test_horizon_refuses_a_string_without_parens():
    with pytest.raises(ValueError, match="row 1 has no paren at or after position 0"):
        horizon(tokenize(["()", ""]))
    with pytest.raises(ValueError, match="position must be an int in 0..41"):
        horizon_at(42)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return Transformer(ParensTask().model_config(init_range=0.3))


def _ln(model, x):
    ln = model.blocks[0].ln1
    mu = sum(x) / len(x)
    var = sum((v - mu) ** 2 for v in x) / len(x)
    return [
        (v - mu) / math.sqrt(var + ln.eps) * float(w) + float(b)
        for v, w, b in zip(x, ln.w.tolist(), ln.b.tolist(), strict=True)
    ]


def _vec(model, tok, pos):
    return [
        float(a + b)
        for a, b in zip(model.embed.W_E[tok].detach(), model.pos_embed.W_pos[pos].detach(), strict=True)
    ]


def test_h00_open_vector_and_phi_by_hand(model):
    attn = model.blocks[0].attn
    wv, bv, wo = attn.W_V[0].double(), attn.b_V[0].double(), attn.W_O[0].double()

    def out(tok, pos):
        x = torch.tensor(_ln(model, _vec(model, tok, pos)), dtype=torch.float64)
        return (x @ wv + bv) @ wo

    opens = sum(out(3, p) for p in range(1, 41)) / 40
    closes = sum(out(4, p) for p in range(1, 41)) / 40
    v = h00_open_vector(model)
    torch.testing.assert_close(v.double(), (opens - closes) / 2, rtol=1e-5, atol=1e-6)
    t = tokenize(["(((", "(()", "()", ")))("])
    got = phi(model)(torch.zeros(4, 42, 56), t)
    assert got.shape == (4, 1, 56)
    for r, p in enumerate([1, Fraction(2, 3), Fraction(1, 2), Fraction(1, 4)]):
        torch.testing.assert_close(got[r, 0], v * float(2 * p - 1))


def _hand_adjusted_weights(model, length, q):
    """REMIX's get_adjusted_attn_factors for one (input length, query position), by loops."""
    attn = model.blocks[0].attn

    def canonical(pos, query):
        if pos == 0:
            return _ln(model, _vec(model, 0, 0))
        if pos == length - 1:
            return _ln(model, _vec(model, 2, pos))
        if pos >= length:
            return _ln(model, _vec(model, 1, pos))
        if query:
            return _ln(model, _vec(model, 3, pos))
        o, c = _ln(model, _vec(model, 3, pos)), _ln(model, _vec(model, 4, pos))
        return [(a + b) / 2 for a, b in zip(o, c, strict=True)]

    qv = torch.tensor(canonical(q, True), dtype=torch.float64) @ attn.W_Q[0].double() + attn.b_Q[0].double()
    scores = []
    for k in range(42):
        kv = (
            torch.tensor(canonical(k, False), dtype=torch.float64) @ attn.W_K[0].double()
            + attn.b_K[0].double()
        )
        s = float((qv @ kv).detach()) - (10_000 if k >= length else 0)
        scores.append(s / math.sqrt(28))
    m = max(scores)
    e = [math.exp(s - m) for s in scores]
    probs = [v / sum(e) for v in e]
    before = [probs[k] for k in range(1, length - 1) if k < q]
    after = [probs[k] for k in range(1, length - 1) if k >= q]
    return (sum(before) / len(before) if before else 0.0), (sum(after) / len(after) if after else 0.0)


def test_adjusted_attention_and_proportion_by_hand(model):
    w = adjusted_attention(model)
    assert w.shape == (43, 42, 2) and bool(w[:2].isnan().all())
    for length, q in [(4, 0), (4, 2), (7, 3), (12, 1), (12, 11), (42, 20), (42, 41)]:
        a_b, a_a = _hand_adjusted_weights(model, length, q)
        torch.testing.assert_close(w[length, q], torch.tensor([a_b, a_a], dtype=torch.float64))
    t = tokenize(STRINGS)
    adj = adjusted_p_open_after(model, t)
    for r, s in enumerate(STRINGS):
        length = len(s) + 2
        for q in range(42):
            a_b, a_a = w[length, q].tolist()
            weights = [(a_b if k < q else a_a) if 1 <= k <= length - 2 else 0.0 for k in range(42)]
            want = sum(wk for k, wk in enumerate(weights) if hand_tokens(s)[k] == "(") / sum(weights)
            torch.testing.assert_close(adj[r, q].item(), want, rtol=1e-12, atol=1e-12)


def test_adjusted_horizon_decides_exact_ties_exactly(model):
    # "()()": at positions 0, 1 and 3 the parens before and those at or after each have equal counts, so the
    # adjusted p is exactly 1/2 whatever the weights: class +2, as the unadjusted horizon
    t = tokenize(["()()", "(())()", "(()", "())("])
    got = adjusted_horizon(model)(t)
    assert got[0, [0, 1, 3, 5]].tolist() == [2, 2, 2, 1] == horizon(t)[0, [0, 1, 3, 5]].tolist()
    assert got[1, [0, 1, 5]].tolist() == [2, 2, 2]
    # away from ties the class is the sign of the weighted count
    adj = adjusted_p_open_after(model, t)
    real = (t != 1) & (t != 2)
    torch.testing.assert_close(got[real] == -2, adj[real] > 0.5)
    # the float32 emulation agrees wherever the weighted count is not a tie
    f32 = adjusted_horizon(model, remix_float32=True)(t)
    assert f32[2].tolist() == got[2].tolist() and f32[3].tolist() == got[3].tolist()


@pytest.fixture(scope="module")
def paren_fixture():
    from interplab.scrub.parens import load_data, load_paren_model
    from tests.conftest import SHARED

    folder = SHARED / "fixtures" / "paren_balancer"
    if not folder.is_dir():
        pytest.skip(f"paren balancer fixture absent ({folder})")
    strings, _ = load_data(folder)
    return load_paren_model(folder), list(strings[:20_000])


def _class_by_hand(s: str, i: int, w_before: Fraction, w_after: Fraction) -> int:
    """horizon_i of REMIX 3b from the string's characters, in rational arithmetic: the weight of the ``(``
    keys over the weight of all paren keys (key k at token position k + 1), compared with 1/2."""
    toks = hand_tokens(s)
    if toks[i] in "PE":
        return hand_horizon(s, i)
    weights = [(w_before if k + 1 < i else w_after, c) for k, c in enumerate(s)]
    p = sum((w for w, c in weights if c == "("), Fraction(0)) / sum((w for w, _ in weights), Fraction(0))
    return -2 if p > Fraction(1, 2) else 2


def test_adjusted_horizon_on_the_fixture_is_exact_and_differs_from_remix_float32_only_at_ties(paren_fixture):
    """The corrected 3b feature against a character-by-character rational computation, and against REMIX's
    own float32 arithmetic (`remix_adjusted_attention`): equal everywhere except where p is exactly 1/2."""
    model, strings = paren_fixture
    t = tokenize(strings)
    exact = adjusted_horizon(model)(t)
    remix = adjusted_horizon(model, remix_float32=True)(t)
    w = adjusted_attention(model)
    # ties by hand: the parens before i and those at or after i each have as many ( as )
    tie = torch.zeros_like(t, dtype=torch.bool)
    for r, s in enumerate(strings):
        for i in range(len(s) + 1):  # token positions 0 (start) .. len(s) (the last paren)
            before, after = s[: max(i - 1, 0)], s[max(i - 1, 0) :]
            tie[r, i] = 2 * before.count("(") == len(before) and 2 * after.count("(") == len(after)
    assert int(tie.sum()) > 10_000
    assert bool((exact[tie] == 2).all())  # p = 1/2 exactly: "at most half"
    assert bool((exact[~tie] == remix[~tie]).all())  # REMIX's float32 agrees wherever p is not a tie
    assert bool((remix[tie] == -2).any())  # ... and rounds some ties above 1/2
    # away from ties the adjusted p is far from 1/2 at float32 precision, so those classes are robust
    real = (t == 0) | (t == 3) | (t == 4)
    p = adjusted_p_open_after(model, t)
    assert float((p[real & ~tie] - 0.5).abs().min()) > 1e-6
    # a character-by-character rational computation on ties, on the positions closest to 1/2, and at random
    gap = (p - 0.5).abs().masked_fill(~real | tie, float("inf"))
    picks = set(zip(*[v.tolist() for v in tie.nonzero()[:150].T], strict=True))
    picks |= {divmod(int(j), 42) for j in gap.flatten().argsort()[:150]}
    g = torch.Generator().manual_seed(0)
    picks |= {
        (int(r), int(i))
        for r, i in zip(
            torch.randint(0, len(strings), (200,), generator=g),
            torch.randint(0, 42, (200,), generator=g),
            strict=True,
        )
    }
    for r, i in sorted(picks):
        n = len(strings[r]) + 2
        want = _class_by_hand(strings[r], i, Fraction(float(w[n, i, 0])), Fraction(float(w[n, i, 1])))
        assert int(exact[r, i]) == want, (strings[r], i)


def test_remix_float32_port_reads_the_same_weights(paren_fixture):
    """`remix_adjusted_attention` (REMIX's code in its float32 arithmetic) is the float64 definition to float32
    precision: per key, A_before for paren keys before the query and A_after for those at or after it,
    normalised over the paren keys."""
    from interplab.scrub.parens import remix_adjusted_attention

    model, _ = paren_fixture
    per_key = remix_adjusted_attention(model).double()
    w = adjusted_attention(model)
    k, q = torch.arange(42)[None, None], torch.arange(42)[None, :, None]
    n = torch.arange(43)[:, None, None]
    paren = (k >= 1) & (k <= n - 2)
    want = torch.where(paren & (k < q), w[..., :1], 0.0) + torch.where(paren & (k >= q), w[..., 1:], 0.0)
    want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(per_key[2:], want[2:], rtol=1e-5, atol=1e-7, equal_nan=True)  # length 2: 0/0
    assert bool(per_key[:2].isnan().all())
