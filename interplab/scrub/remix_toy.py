"""REMIX day 4 part 1: causal scrubbing of a toy computational graph over three integers.

From ``remix_d4_part1_solution.py`` (redwoodresearch/remix_public @ 45c291d), the example of the causal
scrubbing write-up (Chan et al. 2022, section 3.1): 10,000 rows of three integers in [0, 10) (torch generator,
seed 33), the label ``x0 > 3 or x1 > 3``, and the graph

    A = sigmoid(x0 + 0.1 x1 - 0.05 x2 - 3)      B = sigmoid(-0.01 x0 + x1 + 0.2 x2 - 3)     C = x0 + x1 + x2
    D = A + B + 0.1 C      diff = D - labels      loss = diff * diff

whose output is the loss itself (the labels are an input, claimable like ``xs``). Every hypothesis of the
notebook as a `Hypothesis` on this `ComputationGraph` (`interplab.scrub.graph`), by name (`TOY_EXPERIMENTS`):

>>> print(toy_hypothesis("main").describe())  # doctest: +NORMALIZE_WHITESPACE
loss [x0_or_x1_gt_3_agrees_with_label]
  D [x0_or_x1_gt_3] (all paths)
    A [x0_gt_3]
      x0 [x0_val]
    B [x1_gt_3]
      x1 [x1_val]
  labels [label_val] (all paths)
>>> result = scrub_graph(toy_graph(), toy_data(), toy_hypothesis("main"), n_examples=2000)
>>> round(result.loss_original.mean, 3), round(result.loss_scrubbed.mean, 3)
(4.188, 3.936)

How each REMIX matcher becomes a claim: ``corr_root_matcher`` -> the root ``Claim("loss")``;
``IterativeMatcher("D")`` (D on every path: the loss reads ``diff`` twice) -> ``Claim("D", paths="all")``;
``IterativeMatcher("A").chain("x0")`` -> ``Claim("x0")`` under ``Claim("A")`` (A reads x0 directly);
``IterativeMatcher("x0")`` (x0 under A, B and C, one datum) -> ``Claim("x0", paths="all")``;
``ExactSampler`` -> ``feature=None``; ``UncondSampler`` -> `anything`. REMIX publishes no numbers for part 1
(the notebook prints 20-example means); docs/scrub.md, "Part 1: a toy graph", has interplab's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from interplab.scrub.graph import ComputationGraph, GraphData, scrub_graph
from interplab.scrub.hypothesis import Claim, Feature, Hypothesis, anything, feature

__all__ = ["TOY_EXPERIMENTS", "scrub_graph", "toy_data", "toy_graph", "toy_hypothesis"]


def toy_data(n: int = 10_000, seed: int = 33) -> dict[str, Tensor]:
    """REMIX's data: ``xs`` int64 [n 3] uniform in [0, 10) (``torch.randint`` with a generator seeded 33, as
    the notebook draws it), ``labels`` int64 [n]: ``x0 > 3 or x1 > 3``."""
    xs = torch.randint(high=10, size=(n, 3), generator=torch.Generator().manual_seed(seed))
    return {"xs": xs, "labels": torch.logical_or(xs[:, 0] > 3, xs[:, 1] > 3).to(torch.int64)}


def toy_graph() -> ComputationGraph:
    """REMIX part 1's computational graph (float64); the loss multiplies two reads of ``diff``, as REMIX's
    ``Einsum(diff, diff)``, so ``diff`` and everything below it are on two paths."""
    sig = torch.sigmoid
    return (
        ComputationGraph(["xs", "labels"])
        .add("x0", lambda xs: xs[:, 0].double(), "xs")
        .add("x1", lambda xs: xs[:, 1].double(), "xs")
        .add("x2", lambda xs: xs[:, 2].double(), "xs")
        .add("A", lambda x0, x1, x2: sig(x0 + 0.1 * x1 - 0.05 * x2 - 3), "x0", "x1", "x2")
        .add("B", lambda x0, x1, x2: sig(-0.01 * x0 + x1 + 0.2 * x2 - 3), "x0", "x1", "x2")
        .add("C", lambda x0, x1, x2: x0 + x1 + x2, "x0", "x1", "x2")
        .add("D", lambda a, b, c: a + b + 0.1 * c, "A", "B", "C")
        .add("diff", lambda d, y: d - y.double(), "D", "labels")
        .add("loss", lambda a, b: a * b, "diff", "diff")
    )


@feature
def x0_val(d: GraphData) -> Tensor:
    return d["xs"][:, 0]


@feature
def x1_val(d: GraphData) -> Tensor:
    return d["xs"][:, 1]


@feature
def x0_gt_3(d: GraphData) -> Tensor:
    return d["xs"][:, 0] > 3


@feature
def x1_gt_3(d: GraphData) -> Tensor:
    return d["xs"][:, 1] > 3


@feature
def x0_or_x1_gt_3(d: GraphData) -> Tensor:
    return x0_gt_3(d) | x1_gt_3(d)


@feature
def x0_and_x1_gt_3(d: GraphData) -> Tensor:
    return x0_gt_3(d) & x1_gt_3(d)


@feature
def x0_or_x1_gt_3_agrees_with_label(d: GraphData) -> Tensor:
    return x0_or_x1_gt_3(d) == d["labels"].bool()


@feature
def x0_and_x1_gt_3_agrees_with_label(d: GraphData) -> Tensor:
    return x0_and_x1_gt_3(d) == d["labels"].bool()


@feature
def label_val(d: GraphData) -> Tensor:
    return d["labels"]


Feat = Feature | None

TOY_EXPERIMENTS: dict[str, str] = {
    "main": "D computes x0 > 3 or x1 > 3 from A (x0 > 3, from x0) and B (x1 > 3, from x1); the loss reads D "
    "and the label",
    "ex1": "the output depends on x0, x1 (everywhere they are read) and the label only",
    "ex2-random": "x0 -> A resampled at random, everything else unchanged",
    "ex2-exact": "x0 -> A not resampled (the control of ex2-random)",
    "ex3": "information flows x0 -> A -> D, x1 -> B -> D, labels -> loss; values unclaimed (ExactSampler)",
    "and": "as main, with D computing x0 > 3 AND x1 > 3",
    "shuffled-labels": "the baseline: xs from the reference, labels from a random row",
}
"""the part-1 hypotheses of REMIX's notebook (its "Other hypotheses" example is ``and``), and its baseline"""


def _main(out: Feat, d_feature: Feat, a: Feat, b: Feat, x0: Feat, x1: Feat, y: Feat) -> Claim:
    return Claim(
        "loss",
        out,
        children=[
            Claim(
                "D",
                d_feature,
                paths="all",
                children=[
                    Claim("A", a, children=[Claim("x0", x0)]),
                    Claim("B", b, children=[Claim("x1", x1)]),
                ],
            ),
            Claim("labels", y, paths="all"),
        ],
    )


def toy_hypothesis(name: str) -> Hypothesis:
    """REMIX part 1's hypothesis ``name`` (a key of `TOY_EXPERIMENTS`) on `toy_graph`."""
    if name not in TOY_EXPERIMENTS:
        raise ValueError(f"unknown toy experiment {name!r}; valid: {', '.join(TOY_EXPERIMENTS)}")
    if name == "main":
        root = _main(
            x0_or_x1_gt_3_agrees_with_label, x0_or_x1_gt_3, x0_gt_3, x1_gt_3, x0_val, x1_val, label_val
        )
    elif name == "and":
        root = _main(
            x0_and_x1_gt_3_agrees_with_label, x0_and_x1_gt_3, x0_gt_3, x1_gt_3, x0_val, x1_val, label_val
        )
    elif name == "ex3":
        root = _main(None, None, None, None, None, None, None)
    elif name == "ex1":
        root = Claim(
            "loss",
            x0_or_x1_gt_3_agrees_with_label,
            children=[
                Claim("x0", x0_val, paths="all"),
                Claim("x1", x1_val, paths="all"),
                Claim("labels", label_val, paths="all"),
            ],
        )
    elif name in ("ex2-random", "ex2-exact"):
        x0 = Claim("x0", anything if name == "ex2-random" else None)
        root = Claim("loss", children=[Claim("A", paths="all", children=[x0]), Claim("labels", paths="all")])
    else:  # shuffled-labels
        root = Claim("loss", others="same", children=[Claim("labels", anything, paths="all")])
    return Hypothesis(root, name=name, output="loss")
