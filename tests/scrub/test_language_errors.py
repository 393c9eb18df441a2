"""Bad hypotheses in the v2 language fail before anything runs, naming the claim's path and what is valid."""

import pytest
import torch

from interplab.circuits.planted import induction_data, planted_induction
from interplab.scrub import (
    Claim,
    Feature,
    Hypothesis,
    Rewrite,
    ScrubConfig,
    ScrubError,
    anything,
    feature,
    scrub,
)
from interplab.scrub.induction import induction_task, next_token

CFG = ScrubConfig(n_examples=50, n_seeds=1, per_claim=False)


@pytest.fixture(scope="module")
def setup():
    tokens, _, _ = induction_data(200)  # 10 positions
    return planted_induction(), induction_task(tokens)


def run(setup, *children, **cfg):
    model, task = setup
    return scrub(
        model,
        task,
        Hypothesis(Claim("logits", children=list(children))),
        ScrubConfig(**{**CFG.__dict__, **cfg}),
    )


@feature(per_position=True)
def token_at(tokens):
    return tokens


def test_unknown_nodes_are_named_with_suggestions(setup):
    with pytest.raises(
        ScrubError, match=r"claim 'logits/a1\.7'.*unknown node 'a1\.7'; did you mean 'a1\.1', 'a1\.0'"
    ):
        run(setup, Claim("a1.7"))
    with pytest.raises(
        ScrubError,
        match=r"claim 'logits/a1\.0/a1\.0\.x'.*inputs \(a1\.0\.q, a1\.0\.k, a1\.0\.v, a1\.0\.in, a1\.0\.mask\)",
    ):
        run(setup, Claim("a1.0", children=[Claim("a1.0.x")]))
    with pytest.raises(ScrubError, match=r"claim 'logits/a1\.0/a1\.0\.in@1/a0\.0'.*avoid: unknown node 'm7'"):
        run(
            setup,
            Claim("a1.0", children=[Claim("a1.0.in@1", children=[Claim("a0.0", paths="all", avoid=["m7"])])]),
        )


@pytest.mark.parametrize("target", ["a1.0.in@10", "a1.0.in@[8..12]", "a1.0.in@-11"])
def test_positions_out_of_range_name_the_valid_range(setup, target):
    with pytest.raises(
        ScrubError, match=r"claim 'logits/a1\.0/a1\.0\.in@.*out of range.*valid 0\.\.9 \(or -10\.\.-1"
    ):
        run(setup, Claim("a1.0", children=[Claim(target)]))


def test_position_syntax_errors_say_how_to_write_them():
    with pytest.raises(ValueError, match=r"write @3, @-1, @\[1\.\.40\]"):
        Claim("a1.0.in@1-3")
    with pytest.raises(ValueError, match="positions twice"):
        Claim("a1.0.in@1", positions=2)
    with pytest.raises(ValueError, match="empty"):
        Claim("a1.0.in@[5..2]")
    assert Claim("a1.0.in", positions=range(2, 5)).name == "a1.0.in@[2..4]"
    assert Claim("a1.0.q@[0, 3,5]").name == "a1.0.q@[0,3,5]"


def test_a_child_must_stay_inside_its_parents_positions(setup):
    with pytest.raises(
        ScrubError, match=r"claim 'logits/a1\.0/a1\.0\.in@\[1\.\.2\]/a0\.0@3'.*not all covered"
    ):
        run(setup, Claim("a1.0", children=[Claim("a1.0.in@[1..2]", children=[Claim("a0.0@3")])]))


@pytest.mark.parametrize(
    "children, first, second",
    [
        ([Claim("a1.0.in@[1..3]"), Claim("a1.0.q@2")], "a1.0.in@[1..3]", "a1.0.q@2"),
        ([Claim("a1.0.k"), Claim("a1.0.in@4")], "a1.0.k", "a1.0.in@4"),
        ([Claim("a1.0.mask"), Claim("a1.0.mask", anything)], "a1.0.mask", "a1.0.mask"),
    ],
)
def test_overlapping_head_inputs_have_no_precedence(setup, children, first, second):
    with pytest.raises(
        ScrubError,
        match=rf"no precedence between 'logits/a1\.0/{_re(first)}' and 'logits/a1\.0/{_re(second)}'",
    ):
        run(setup, Claim("a1.0", children=children))


def _re(s):
    return s.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")


def test_overlapping_components_have_no_precedence(setup):
    with pytest.raises(ScrubError, match=r"no precedence between 'logits/embed' and 'logits/embed'"):
        run(setup, Claim("embed"), Claim("embed", paths="all", avoid=["a1.0"]))
    with pytest.raises(ScrubError, match=r"'logits/a1\.0@\[0\.\.5\]' and 'logits/a1\.0@5'"):
        run(setup, Claim("a1.0@[0..5]"), Claim("a1.0@5"))
    run(setup, Claim("a1.0@[0..4]"), Claim("a1.0@[5..9]"))  # disjoint positions: fine
    run(setup, Claim("a0.0"), Claim("embed", paths="all"))  # different components: the first owns its paths


def test_parts_need_a_rewrite_and_name_the_valid_parts(setup):
    with pytest.raises(ScrubError, match=r"claim 'logits/a0\.0/a0\.0:phi'.*has no rewrite"):
        run(setup, Claim("a0.0", children=[Claim("a0.0:phi")]))
    rewrite = Rewrite(parts={"phi": lambda v, t: v})
    with pytest.raises(
        ScrubError, match=r"claim 'logits/a0\.0/a0\.0:psi'.*its parts: a0\.0:phi, a0\.0:residual"
    ):
        run(setup, Claim("a0.0", rewrite=rewrite, children=[Claim("a0.0:psi")]))
    with pytest.raises(
        ScrubError, match=r"claim 'logits/a0\.0/a0\.0\.q'.*its parts: a0\.0:phi, a0\.0:residual"
    ):
        run(setup, Claim("a0.0", rewrite=rewrite, children=[Claim("a0.0.q")]))
    with pytest.raises(ValueError, match="'residual' is the implicit rest"):
        Rewrite(parts={"residual": lambda v, t: v})


def test_a_mask_claim_is_a_leaf(setup):
    with pytest.raises(ScrubError, match=r"claim 'logits/a1\.0/a1\.0\.mask'.*a leaf"):
        run(setup, Claim("a1.0", children=[Claim("a1.0.mask", children=[Claim("embed")])]))


def test_per_position_features_need_one_position(setup):
    with pytest.raises(
        ScrubError, match=r"claim 'logits/a1\.0'.*'token_at' is per-position: give the claim positions"
    ):
        run(setup, Claim("a1.0", token_at))
    with pytest.raises(ScrubError, match=r"claim 'logits/a1\.0/a1\.0\.in@\[1\.\.2\]/a0\.0'.*ancestor has 2"):
        run(setup, Claim("a1.0", children=[Claim("a1.0.in@[1..2]", children=[Claim("a0.0", token_at)])]))
    # under a claim at one position, it is read at that position
    run(
        setup, Claim("a1.0", children=[Claim("a1.0.in@[1..2]", token_at, children=[Claim("a0.0", token_at)])])
    )


def test_features_of_the_wrong_shape_say_which_shape(setup):
    per_pos = Feature("half", lambda t: t[:, :5], per_position=True)
    with pytest.raises(
        ScrubError,
        match=r"claim 'logits/a1\.0@3': per-position feature 'half' returned shape \(200, 5\), expected per-position values \(rows, pos\) = \(200, 10\)",
    ):
        run(setup, Claim("a1.0@3", per_pos))
    short = Feature("short", lambda t: t[:3, 0])
    with pytest.raises(
        ScrubError,
        match=r"'short' returned shape \(3,\), expected one value per row \(200,\) or, with per_position=True, \(rows, pos\)",
    ):
        run(setup, Claim("a1.0", short))


def test_nan_in_a_per_position_feature_names_the_position(setup):
    def with_nan(tokens):
        out = tokens.float()
        out[7, 4] = float("nan")
        return out

    nan = Feature("nan_at", with_nan, per_position=True)
    with pytest.raises(
        ScrubError,
        match=r"claim 'logits/a1\.0/a1\.0\.in@4': feature 'nan_at' returned NaN \(first at row 7\).*\(at position 4\)",
    ):
        run(setup, Claim("a1.0", children=[Claim("a1.0.in@[3..5]", nan)]))
    run(setup, Claim("a1.0", children=[Claim("a1.0.in@[0..3]", nan)]))  # a NaN where no claim reads is fine


def test_float_features_with_rounding_ties_are_reported(setup):
    def ratio(tokens):  # 0.1 * 3 and 0.3 are one value in exact arithmetic, two in float64
        return torch.where(
            tokens[:, 0] % 2 == 0,
            torch.tensor(0.1 * 3, dtype=torch.float64),
            torch.tensor(0.3, dtype=torch.float64),
        )

    r = run(setup, Claim("a1.0", Feature("ratio", ratio)))
    assert any(
        "'ratio' has distinct values 0.3 and 0.30000000000000004" in w and "Fraction" in w for w in r.warnings
    )
    exact = run(setup, Claim("a1.0", next_token))
    assert not any("rounding" in w for w in exact.warnings)


def test_paths_all_and_rewrites_only_where_they_mean_something():
    with pytest.raises(ValueError, match="avoid= only applies with paths='all'"):
        Claim("embed", avoid=["a0.0"])
    with pytest.raises(ValueError, match="paths must be 'direct' or 'all'"):
        Claim("embed", paths="some")
    with pytest.raises(ValueError, match="others must be 'random' or 'same'"):
        Claim("a1.0", others="exact")
