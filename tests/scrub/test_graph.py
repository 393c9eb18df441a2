"""Causal scrubbing of a user-defined computational graph (interplab.scrub.graph) on REMIX day 4 part 1's toy
graph (interplab.scrub.remix_toy), against hand-written references:

- per draw: for every part-1 experiment, the treeified graph written out by hand as the composition of A, B,
  C, D it is (which row each input of each path reads), on the rows the library drew, equals the library's
  output exactly; the drawn rows agree with their parents' on each claim's feature;
- in expectation: the exact expected scrubbed loss of every reference, computed by hand by enumerating the
  resampling distribution (the data set's value counts, each claim's agreeing class, conditional independence
  of the claims below a datum), against the library's Monte Carlo mean (within 4 standard errors);
- errors name the claim and what is valid.
"""

import pytest
import torch

from interplab.circuits.engine import EdgeEngine
from interplab.circuits.planted import induction_data, planted_induction
from interplab.scrub import ScrubError, compile_hypothesis
from interplab.scrub.graph import ComputationGraph, compile_graph_hypothesis, scrub_graph
from interplab.scrub.hypothesis import Claim, Hypothesis, anything
from interplab.scrub.remix_toy import TOY_EXPERIMENTS, toy_data, toy_graph, toy_hypothesis


def A(x0, x1, x2):
    return torch.sigmoid(x0 + 0.1 * x1 - 0.05 * x2 - 3)


def B(x0, x1, x2):
    return torch.sigmoid(-0.01 * x0 + x1 + 0.2 * x2 - 3)


def C(x0, x1, x2):
    return x0 + x1 + x2


def D(x0, x1, x2):
    return A(x0, x1, x2) + B(x0, x1, x2) + 0.1 * C(x0, x1, x2)


@pytest.fixture(scope="module")
def data():
    return toy_data()


def _by_hand(name: str, data, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """The treeified toy graph of experiment ``name``: which row each input on each path reads."""
    X, L = data["xs"].double(), data["labels"].double()

    def x(key: str, i: int) -> torch.Tensor:
        return X[rows[key], i]

    if name in ("main", "and", "ex3"):
        # x0 of A: x0's datum; A's other inputs: A's others; x1 of B: x1's datum; B's other inputs and C: the
        # others of B and D; the label: y's datum (the same on both paths through diff)
        a = A(x("loss/D/A/x0", 0), x("loss/D/A (others)", 1), x("loss/D/A (others)", 2))
        b = B(x("loss/D/B (others)", 0), x("loss/D/B/x1", 1), x("loss/D/B (others)", 2))
        c = C(*(x("loss/D (others)", i) for i in range(3)))
        diff = a + b + 0.1 * c - L[rows["loss/labels"]]
    elif name == "ex1":
        # x0 and x1 everywhere they are read (A, B, C) from their data, x2 from the root's others
        v = (x("loss/x0", 0), x("loss/x1", 1), x("loss (others)", 2))
        diff = D(*v) - L[rows["loss/labels"]]
    elif name in ("ex2-random", "ex2-exact"):
        a = A(x("loss/A/x0", 0), x("loss/A (others)", 1), x("loss/A (others)", 2))
        o = [x("loss (others)", i) for i in range(3)]
        diff = a + B(*o) + 0.1 * C(*o) - L[rows["loss/labels"]]
    else:  # shuffled-labels: xs from the root's datum (others="same"), the label from its own datum
        diff = D(*(x("loss", i) for i in range(3))) - L[rows["loss/labels"]]
    return diff * diff


@pytest.mark.parametrize("name", list(TOY_EXPERIMENTS))
def test_every_experiment_equals_the_treeified_graph_by_hand(name, data):
    compiled = compile_graph_hypothesis(toy_graph(), data, toy_hypothesis(name))
    refs = torch.randperm(10_000, generator=torch.Generator().manual_seed(1))[:3000]
    record: dict[str, torch.Tensor] = {}
    got = compiled.run(refs, torch.Generator().manual_seed(2), record=record)
    torch.testing.assert_close(got, _by_hand(name, data, record), rtol=0, atol=0)
    # fixing every datum through data= gives the same numbers (the seam notebooks use)
    torch.testing.assert_close(compiled.run(refs, data=record), got, rtol=0, atol=0)
    # every datum agrees with its parent's on the claim's feature (None: is the parent's datum)
    for c in compiled.claims():
        parent = c.path.rpartition("/")[0]
        d, p = record[c.path], record[parent] if parent else refs
        f = c.claim.feature
        if f is None:
            assert torch.equal(d, p), c.path
        else:
            assert torch.equal(f(data)[d], f(data)[p]), c.path


def _values(data):
    """The data set as value frequencies: P[x0, x1, x2] and P(label | xs) (the label is a function of xs)."""
    xs = data["xs"]
    counts = torch.zeros(10, 10, 10, dtype=torch.float64)
    counts.index_put_(
        (xs[:, 0], xs[:, 1], xs[:, 2]), torch.ones(len(xs), dtype=torch.float64), accumulate=True
    )
    return counts / counts.sum()


def _grid():
    v = torch.arange(10, dtype=torch.float64)
    return v[:, None, None], v[None, :, None], v[None, None, :]


def _moments(f: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """Mean and variance of ``f`` under the probabilities ``p`` (same shape)."""
    m = float((f * p).sum())
    return m, float(((f - m) ** 2 * p).sum())


def _exact(name: str, data, refs: torch.Tensor) -> torch.Tensor:
    """Each reference's exact expected scrubbed loss, by enumerating the resampling distribution."""
    P = _values(data)
    g0, g1, g2 = _grid()
    xs, labels = data["xs"], data["labels"].double()
    p12, p02 = P.sum(0), P.sum(1)  # marginals of (x1, x2) and (x0, x2)
    out = torch.empty(len(refs), dtype=torch.float64)
    if name in ("main", "and", "ex3"):
        # below D's datum d the claims are independent: T_A from A's chain (x0 from rows whose x0 > 3 agrees
        # with d's, its x1, x2 from A's others), T_B likewise, T_C from D's others; the label is y's datum,
        # which agrees with the root's datum r on the label (ex3: every datum is the reference)
        def t_a(cls):  # x0 ~ rows with (x0 > 3) == cls (None: the reference's x0 itself, handled below)
            px0 = P.sum((1, 2)) * ((torch.arange(10) > 3) == cls)
            return _moments(A(g0, g1, g2), (px0 / px0.sum())[:, None, None] * p12[None])

        def t_b(cls):
            px1 = P.sum((0, 2)) * ((torch.arange(10) > 3) == cls)
            return _moments(B(g0, g1, g2), (px1 / px1.sum())[None, :, None] * p02[:, None, :])

        m_c, v_c = _moments(0.1 * C(g0, g1, g2), P)
        gt0, gt1 = xs[:, 0] > 3, xs[:, 1] > 3
        f_d = (gt0 | gt1) if name != "and" else (gt0 & gt1)
        f_root = f_d == labels.bool()
        for j, ref in enumerate(refs.tolist()):
            if name == "ex3":
                ma, va = _moments(A(xs[ref, 0].double(), g1[0], g2[0]), p12)
                mb, vb = _moments(B(g0[:, 0], xs[ref, 1].double(), g2[:, 0]), p02)
                out[j] = va + vb + v_c + (ma + mb + m_c - labels[ref]) ** 2
                continue
            total = torch.zeros((), dtype=torch.float64)
            roots = (f_root == f_root[ref]).nonzero()[:, 0]  # r: uniform over these rows
            for f_r in (False, True):
                for y in (0.0, 1.0):
                    p_r = float(((f_d[roots] == f_r) & (labels[roots] == y)).double().mean())
                    if p_r == 0:
                        continue
                    ds = f_d == f_r  # d: uniform over these rows; its classes (x0 > 3, x1 > 3) matter
                    for c0 in (False, True):
                        for c1 in (False, True):
                            p_d = float((ds & (gt0 == c0) & (gt1 == c1)).double().sum() / ds.double().sum())
                            if p_d == 0:
                                continue
                            (ma, va), (mb, vb) = t_a(c0), t_b(c1)
                            total += p_r * p_d * (va + vb + v_c + (ma + mb + m_c - y) ** 2)
            out[j] = total
    elif name == "ex1":
        # the root's datum r is uniform (its feature is True on every row); x0, x1 and the label are r's,
        # x2 is the root's others' (random)
        p2 = P.sum((0, 1))
        r = torch.arange(len(xs))
        per_r = (
            (D(xs[r, 0, None].double(), xs[r, 1, None].double(), torch.arange(10.0)[None]) - labels[r, None])
            ** 2
        ) @ p2
        out[:] = per_r.mean()
    elif name in ("ex2-random", "ex2-exact"):
        m_o, v_o = _moments(B(g0, g1, g2) + 0.1 * C(g0, g1, g2), P)  # B and C share the root's others
        for j, ref in enumerate(refs.tolist()):
            if name == "ex2-random":
                ma, va = _moments(A(g0, g1, g2), P.sum((1, 2))[:, None, None] * p12[None])
            else:
                ma, va = _moments(A(xs[ref, 0].double(), g1[0], g2[0]), p12)
            out[j] = va + v_o + (ma + m_o - labels[ref]) ** 2
    else:  # shuffled-labels
        p1 = float(labels.mean())
        d = D(*(xs[refs, i].double() for i in range(3)))
        out[:] = p1 * (d - 1) ** 2 + (1 - p1) * d**2
    return out


@pytest.mark.parametrize("name", list(TOY_EXPERIMENTS))
def test_the_scrubbed_loss_is_the_exact_expectation(name, data):
    result = scrub_graph(toy_graph(), data, toy_hypothesis(name), n_examples=2000, n_seeds=8, seed=3)
    exact = _exact(name, data, result.refs)
    gap = result.scrubbed.mean(0) - exact  # per reference: only the resampling noise
    se = float(gap.std() / gap.numel() ** 0.5)
    assert se > 0 and abs(float(gap.mean())) < 4 * se, (name, float(gap.mean()), se)


def test_what_the_hypotheses_claim():
    assert toy_hypothesis("ex2-random").describe().splitlines() == [
        "loss [same input]",
        "  A [same input] (all paths)",
        "    x0 [anything]",
        "  labels [same input] (all paths)",
    ]
    with pytest.raises(ValueError, match="unknown toy experiment 'x'; valid: main, ex1"):
        toy_hypothesis("x")


def test_a_leaf_root_is_the_unscrubbed_graph_and_shared_nodes_share_one_datum(data):
    g = toy_graph()
    result = scrub_graph(g, data, Hypothesis(Claim("loss"), output="loss"), n_examples=500)
    torch.testing.assert_close(result.scrubbed[0], result.original)
    # D on both paths through diff: one datum, so the loss is a square (never negative), and it equals
    # (D(d) - label(d))^2 with D's datum d
    h = Hypothesis(Claim("loss", children=[Claim("D", anything, paths="all")]), output="loss")
    compiled = compile_graph_hypothesis(g, data, h)
    refs = torch.arange(400)
    rec: dict[str, torch.Tensor] = {}
    got = compiled.run(refs, torch.Generator().manual_seed(0), record=rec)
    X, L = data["xs"].double(), data["labels"].double()
    want = (D(*(X[rec["loss/D"], i] for i in range(3))) - L[rec["loss (others)"]]) ** 2
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # avoid=: C's path below D is not covered, so C reads the root's others
    h = Hypothesis(Claim("loss", children=[Claim("xs", anything, paths="all", avoid=["C"])]), output="loss")
    rec = {}
    got = compile_graph_hypothesis(g, data, h).run(refs, torch.Generator().manual_seed(0), record=rec)
    xs, o = [X[rec["loss/xs"], i] for i in range(3)], [X[rec["loss (others)"], i] for i in range(3)]
    want = (A(*xs) + B(*xs) + 0.1 * C(*o) - L[rec["loss (others)"]]) ** 2
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_graph_hypotheses_name_the_claim_and_what_is_valid(data):
    g = toy_graph()

    def check(root, match):
        with pytest.raises(ScrubError, match=match):
            compile_graph_hypothesis(g, data, Hypothesis(root, output=root.target))

    check(Claim("D"), r"claim 'D': the root claim is on the graph's output 'loss'")
    check(Claim("loss", children=[Claim("Q")]), r"claim 'loss/Q': unknown node 'Q'; valid: xs, labels, x0")
    check(Claim("loss", children=[Claim("D")]), r"loss does not read 'D' directly \(it reads diff, diff\)")
    check(
        Claim("loss", children=[Claim("D", paths="all", children=[Claim("labels", paths="all")])]),
        r"claim 'loss/D/labels': 'labels' is not below 'D'",
    )
    check(
        Claim("loss", children=[Claim("D", paths="all"), Claim("D", anything, paths="all")]),
        r"'loss/D' \(no precedence",
    )
    check(Claim("loss", children=[Claim("diff@1")]), "a computational graph has no sequence positions")
    check(
        Claim("loss", children=[Claim("diff", paths="all", avoid=["Z"])]), "avoid names an unknown node 'Z'"
    )
    with pytest.raises(ValueError, match="root target must be 'loss', got 'logits'"):
        Hypothesis(Claim("logits"), output="loss")
    with pytest.raises(ValueError, match="graph node 'A' reads unknown node 'y'"):
        ComputationGraph(["x"]).add("A", lambda y: y, "y")
    with pytest.raises(ValueError, match="no column for input"):
        scrub_graph(g, {"xs": data["xs"]}, toy_hypothesis("main"))
    # a model's compiler refuses a graph's hypothesis
    tokens, _, _ = induction_data(8)
    with pytest.raises(ScrubError, match="rooted at 'loss': a model's hypothesis is rooted at 'logits'"):
        compile_hypothesis(EdgeEngine(planted_induction(), tokens), toy_hypothesis("main"))
