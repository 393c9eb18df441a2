"""Causal scrubbing of a user-defined computational graph: nodes are functions of their inputs, not a model.

REMIX day 4 part 1 (redwoodresearch/remix_public, ``remix_d4_part1_solution.py``) teaches causal scrubbing on
a toy graph over three integers before the paren balancer; this module states such graphs and scrubs the same
`Hypothesis` / `Claim` / `Feature` trees as the transformer compiler (`interplab.scrub.compile`), with the
same treeification semantics:

- the root claim is on the graph's output; its datum agrees with the reference on its feature (None: the
  reference itself), as REMIX's root ``InterpNode`` draws from its cond sampler;
- a child's datum agrees with its parent's on the child's feature (``feature=None``: the parent's datum);
- a leaf runs its whole upstream computation (every input below its node, on every path) on its datum;
- an internal claim draws one *other-inputs* datum (random; its own datum with ``others="same"``) that feeds
  every input below it that no child claims;
- a child names a node its parent's node reads directly (``paths="direct"``, the default: REMIX's
  ``IterativeMatcher("A").chain("x0")``), or with ``paths="all"`` a node on every path below the parent, with
  one datum (REMIX's ``IterativeMatcher("D")`` matching D on every path; ``avoid=`` leaves out the paths
  through the nodes named). Walking any path down from a claim, the first node a child claims owns the rest of
  the path; two children on the same node are an error. Inputs (data-set columns) are nodes too
  (``Claim("labels", ...)``).

Positions, rewrites and masks are transformer notions: a graph claim with them is an error.

The graph of REMIX part 1, a hypothesis about it and its scrub (the loss is part of the graph, so the
"behaviour" is the output itself):

>>> import torch
>>> g = ComputationGraph(["xs", "labels"])
>>> g = g.add("x0", lambda xs: xs[:, 0], "xs").add("x1", lambda xs: xs[:, 1], "xs")
>>> g = g.add("A", lambda x0: (x0 > 3).double(), "x0").add("B", lambda x1: (x1 > 3).double(), "x1")
>>> g = g.add("D", lambda a, b: torch.maximum(a, b), "A", "B")
>>> g = g.add("loss", lambda d, y: (d - y) ** 2, "D", "labels")
>>> xs = torch.randint(0, 10, (500, 2), generator=torch.Generator().manual_seed(0))
>>> data = {"xs": xs, "labels": ((xs[:, 0] > 3) | (xs[:, 1] > 3)).double()}
>>> h = Hypothesis(Claim("loss", children=[
...     Claim("D", feature(lambda d: (d["xs"] > 3).any(1), name="x0_or_x1_gt_3"), paths="all"),
...     Claim("labels", feature(lambda d: d["labels"], name="label"), paths="all")]), output="loss")
>>> result = scrub_graph(g, data, h, n_examples=200)
>>> result.loss_original.mean, result.loss_scrubbed.mean
(0.0, 0.0)

`scrub_graph` returns the original and scrubbed means of the output over references drawn without
replacement (`GraphScrubResult`); `compile_graph_hypothesis(...).run(refs, gen, data={path: rows})` is the
seam tests use to fix every claim's rows (keys: claim paths ``loss/D``, ``<path> (others)``), as
`interplab.scrub.compile.CompiledHypothesis.spec` does for models. docs/scrub.md, "Part 1: a toy graph",
states every REMIX part-1 experiment this way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from interplab.hooks.site import suggest
from interplab.scrub.compile import depth_first
from interplab.scrub.estimate import Estimate
from interplab.scrub.hypothesis import Claim, Feature, Hypothesis, feature
from interplab.scrub.result import OTHERS
from interplab.scrub.sampling import FeatureGroups, ScrubError, evaluate

__all__ = [
    "CompiledGraphHypothesis",
    "ComputationGraph",
    "GraphScrubResult",
    "compile_graph_hypothesis",
    "feature",
    "scrub_graph",
]

GraphData = Mapping[str, Tensor]
"""the data set: one tensor per input of the graph, rows first (features are functions of it)"""


@dataclass(frozen=True)
class GraphNode:
    name: str
    reads: tuple[str, ...]
    """the nodes whose values are ``fn``'s arguments, in order (empty for an input)"""
    fn: Callable[..., Tensor] | None
    """None for an input: its value is the data set's column of that name"""


class ComputationGraph:
    """A computational graph: named inputs (columns of a data set) and nodes ``fn(*values of reads)``, each
    evaluated on a batch of rows (tensors with rows first). `add` returns the graph, so calls chain; the
    last node added is the output unless ``output=`` names another."""

    def __init__(self, inputs: Sequence[str], *, output: str | None = None) -> None:
        if isinstance(inputs, str) or not inputs:
            raise ValueError(f"ComputationGraph needs a list of input names, got {inputs!r}")
        self.nodes: dict[str, GraphNode] = {}
        for name in inputs:
            self._name_ok(name)
            self.nodes[name] = GraphNode(name, (), None)
        self._output = output

    def _name_ok(self, name: str) -> None:
        if not isinstance(name, str) or not name or any(c in name for c in "/@:") or name.endswith(OTHERS):
            raise ValueError(f"graph node names are non-empty strings without '/', '@' or ':', got {name!r}")
        if name in self.nodes:
            raise ValueError(f"graph node {name!r} is defined twice")

    def add(self, name: str, fn: Callable[..., Tensor], *reads: str) -> ComputationGraph:
        """Node ``name = fn(*[value of r for r in reads])``; every read must already be in the graph."""
        self._name_ok(name)
        if not callable(fn):
            raise TypeError(f"graph node {name!r}: fn must be callable, got {type(fn).__name__}")
        if not reads:
            raise ValueError(f"graph node {name!r} reads nothing: name the nodes it is a function of")
        for r in reads:
            self.node(r, f"graph node {name!r} reads")
        self.nodes[name] = GraphNode(name, tuple(reads), fn)
        return self

    def node(self, name: str, what: str = "node") -> GraphNode:
        if name not in self.nodes:
            close = suggest(name, list(self.nodes))
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"{what} unknown node {name!r}; valid: {', '.join(self.nodes)}{hint}")
        return self.nodes[name]

    @property
    def inputs(self) -> list[str]:
        return [n for n, v in self.nodes.items() if v.fn is None]

    @property
    def output(self) -> str:
        out = self._output if self._output is not None else list(self.nodes)[-1]
        node = self.node(out, "the output is an")
        if node.fn is None:
            raise ValueError(f"the graph's output {out!r} is an input: add the nodes that compute from it")
        return out

    def upstream(self, name: str) -> frozenset[str]:
        """Every node with a path into ``name``."""
        out: set[str] = set()
        todo = list(self.node(name).reads)
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo += self.nodes[n].reads
        return frozenset(out)

    def forward(self, data: GraphData, rows: Tensor | None = None) -> dict[str, Tensor]:
        """Every node's value on ``rows`` of ``data`` (default: all rows), the ordinary (unscrubbed) run."""
        values: dict[str, Tensor] = {}
        for name, node in self.nodes.items():
            if node.fn is None:
                column = data[name]
                values[name] = column if rows is None else column[rows]
            else:
                values[name] = node.fn(*(values[r] for r in node.reads))
        return values

    def check_data(self, data: GraphData) -> int:
        """The number of rows of ``data`` (one tensor per input, equal first dimensions)."""
        missing = [n for n in self.inputs if n not in data]
        if missing:
            raise ValueError(f"the data set has no column for input(s) {missing}; it has {sorted(data)}")
        sizes = {n: int(torch.as_tensor(data[n]).shape[0]) for n in self.inputs}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the data set's columns have different numbers of rows: {sizes}")
        return next(iter(sizes.values()))


@dataclass(eq=False)
class GraphClaim:
    """One claim checked against the graph."""

    claim: Claim
    path: str
    node: str
    groups: FeatureGroups | None
    avoid: frozenset[str] = frozenset()
    children: list[GraphClaim] = field(default_factory=list)

    @property
    def leaf(self) -> bool:
        return bool(self.claim.leaf)


def _compile(
    graph: ComputationGraph,
    data: GraphData,
    n_rows: int,
    pool: Tensor,
    claim: Claim,
    parent: GraphClaim | None,
    path: str,
    cache: dict[str, FeatureGroups],
) -> GraphClaim:
    where = f"claim '{path}'"
    if claim.positions is not None:
        raise ScrubError(f"{where}: a computational graph has no sequence positions (drop the @ suffix)")
    if claim.rewrite is not None:
        raise ScrubError(f"{where}: rewrites are for model components; add the parts as graph nodes instead")
    if parent is None:
        if claim.target != graph.output:
            raise ScrubError(f"{where}: the root claim is on the graph's output {graph.output!r}")
    else:
        try:
            graph.node(claim.target, f"{where}:")
        except ValueError as err:
            raise ScrubError(str(err)) from None
        if claim.paths == "direct" and claim.target not in graph.nodes[parent.node].reads:
            reads = ", ".join(graph.nodes[parent.node].reads) or "nothing"
            raise ScrubError(
                f"{where}: {parent.node} does not read {claim.target!r} directly (it reads {reads}); "
                "claim a node it reads, or give paths='all' for a node further below"
            )
        if claim.paths == "all" and claim.target not in graph.upstream(parent.node):
            raise ScrubError(f"{where}: {claim.target!r} is not below {parent.node!r} in the graph")
    for a in claim.avoid:
        try:
            graph.node(a, f"{where}: avoid names an")
        except ValueError as err:
            raise ScrubError(str(err)) from None
    groups = None
    f = claim.feature
    if isinstance(f, Feature):
        if f.per_position:
            raise ScrubError(f"{where}: feature {f.name!r} is per-position; a graph has no positions")
        key = f"{f.name}@{id(f.fn)}"
        if key not in cache:
            quoted = f"'{path}'"
            raw = evaluate(f, data, quoted)  # type: ignore[arg-type]  # a graph's features take its data set
            cache[key] = FeatureGroups.from_values(f, raw, n_rows, quoted, pool)
        groups = cache[key]
    c = GraphClaim(claim, path, claim.target, groups, frozenset(claim.avoid))
    for child in claim.children:
        k = _compile(graph, data, n_rows, pool, child, c, f"{path}/{child.name}", cache)
        for other in c.children:
            if other.node == k.node:
                raise ScrubError(
                    f"claim '{k.path}': {k.node} is already claimed by '{other.path}' (no precedence between "
                    f"'{other.path}' and '{k.path}': claim different nodes)"
                )
        c.children.append(k)
    return c


@dataclass(frozen=True, eq=False)
class CompiledGraphHypothesis:
    """A hypothesis checked against a graph and its data: `run` evaluates the treeified graph."""

    hypothesis: Hypothesis
    graph: ComputationGraph
    data: GraphData
    root: GraphClaim
    pool: Tensor

    def claims(self) -> list[GraphClaim]:
        return depth_first(self.root)

    def draw(
        self, refs: Tensor, generator: torch.Generator, data: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Every claim's datum (key: its path) and every internal claim's other-inputs datum (``path
        (others)``), depth first, each claim's datum before its other-inputs datum; ``data`` fixes any."""
        given = dict(data or {})
        out: dict[str, Tensor] = {}

        def take(key: str, draw: Callable[[], Tensor]) -> Tensor:
            rows = torch.as_tensor(given[key]).long() if key in given else draw()
            if rows.shape != refs.shape:
                raise ValueError(
                    f"data[{key!r}] has shape {tuple(rows.shape)}, the references {tuple(refs.shape)}"
                )
            out[key] = rows
            return rows

        def visit(c: GraphClaim, parent: Tensor) -> None:
            d = take(c.path, lambda: parent if c.groups is None else c.groups.agreeing(parent, generator))
            if not c.leaf:
                if c.claim.others == "same":
                    out[c.path + OTHERS] = d
                else:
                    pool = self.pool
                    take(
                        c.path + OTHERS,
                        lambda: pool[torch.randint(0, pool.numel(), refs.shape, generator=generator)],
                    )
            for k in c.children:
                visit(k, d)

        visit(self.root, refs)
        return out

    def run(
        self,
        refs: Tensor,
        generator: torch.Generator | None = None,
        *,
        data: Mapping[str, Tensor] | None = None,
        record: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """The treeified graph's output for reference rows ``refs``: each claim's datum drawn with
        ``generator`` unless ``data`` gives it; ``record`` receives every datum used."""
        refs = torch.as_tensor(refs).long()
        rows = self.draw(refs, generator or torch.Generator(), data)
        if record is not None:
            record.update(rows)
        memo: dict[tuple[str, int, frozenset[int]], Tensor] = {}

        def value(node: str, c: GraphClaim, live: frozenset[int], direct: bool) -> Tensor:
            """``node`` computed under claim ``c``: ``live`` are the ids of ``c``'s children that may still
            claim a node below (``direct``: ``node`` is ``c``'s own node, so direct children count too)."""
            key = (node, id(c), live | ({-1} if direct else frozenset()))
            if key in memo:
                return memo[key]
            spec = self.graph.nodes[node]
            if spec.fn is None:
                out = self.data[node][rows[c.path] if c.leaf else rows[c.path + OTHERS]]
            else:
                args = []
                for r in spec.reads:
                    owner = [
                        k
                        for k in c.children
                        if id(k) in live and k.node == r and (direct or k.claim.paths == "all")
                    ]
                    if owner:
                        k = owner[0]
                        args.append(value(r, k, frozenset(id(j) for j in k.children), True))
                    else:
                        keep = frozenset(
                            id(k)
                            for k in c.children
                            if id(k) in live and k.claim.paths == "all" and r not in k.avoid
                        )
                        args.append(value(r, c, keep if not c.leaf else frozenset(), False))
                out = spec.fn(*args)
            memo[key] = out
            return out

        root = self.root
        if root.leaf:
            return value(root.node, root, frozenset(), False)
        return value(root.node, root, frozenset(id(k) for k in root.children), True)


def compile_graph_hypothesis(
    graph: ComputationGraph, data: GraphData, hypothesis: Hypothesis, *, pool: Tensor | None = None
) -> CompiledGraphHypothesis:
    """Check ``hypothesis`` against ``graph`` (targets, direct reads, paths, overlaps, features on ``data``)
    and return it compiled; raises `ScrubError` naming the claim's path."""
    n_rows = graph.check_data(data)
    pool = torch.arange(n_rows) if pool is None else torch.as_tensor(pool).long()
    data = {k: torch.as_tensor(v) for k, v in data.items()}
    root = _compile(graph, data, n_rows, pool, hypothesis.root, None, hypothesis.root.name, {})
    return CompiledGraphHypothesis(hypothesis, graph, data, root, pool)


@dataclass(frozen=True)
class GraphScrubResult:
    """The mean output (the behaviour, e.g. a loss computed inside the graph) unscrubbed and scrubbed."""

    hypothesis: str
    description: str
    n_examples: int
    n_seeds: int
    loss_original: Estimate
    loss_scrubbed: Estimate
    refs: Tensor
    """the reference rows"""
    original: Tensor
    """[refs] the output on each reference"""
    scrubbed: Tensor
    """[seeds refs] the treeified graph's output per resampling and reference"""
    samples: list[dict[str, int]]
    """for the first references (seed 0), the row every claim ran on (keys: claim paths, ``path (others)``)"""

    def __str__(self) -> str:
        return (
            f"{self.hypothesis}: original {self.loss_original}, scrubbed {self.loss_scrubbed} "
            f"({self.n_examples} references x {self.n_seeds} resampling(s))\n{self.description}"
        )


def scrub_graph(
    graph: ComputationGraph,
    data: GraphData,
    hypothesis: Hypothesis,
    *,
    n_examples: int | None = None,
    n_seeds: int = 1,
    seed: int = 0,
    pool: Tensor | None = None,
    n_show: int = 5,
) -> GraphScrubResult:
    """Scrub ``hypothesis`` on ``graph``: ``n_examples`` references (default all rows) drawn without
    replacement with ``seed``, ``n_seeds`` resamplings each; the graph's output must be one number per row."""
    compiled = compile_graph_hypothesis(graph, data, hypothesis, pool=pool)
    n_rows = graph.check_data(data)
    n = n_rows if n_examples is None else n_examples
    if not isinstance(n, int) or not 0 < n <= n_rows:
        raise ValueError(
            f"n_examples must be an int in 1..{n_rows} (the data set's rows), got {n_examples!r}"
        )
    if not isinstance(n_seeds, int) or n_seeds <= 0:
        raise ValueError(f"n_seeds must be a positive int, got {n_seeds!r}")
    gen = torch.Generator().manual_seed(seed)
    refs = torch.randperm(n_rows, generator=gen)[:n]
    original = graph.forward(compiled.data, refs)[graph.output]
    if original.shape != refs.shape:
        raise ValueError(
            f"the graph's output {graph.output!r} has shape {tuple(original.shape)} for {n} rows: "
            "scrubbing averages one number per row (compute the loss inside the graph)"
        )
    scrubbed = torch.empty(n_seeds, n, dtype=torch.float64)
    samples: list[dict[str, int]] = []
    for s in range(n_seeds):
        record: dict[str, Tensor] = {}
        scrubbed[s] = compiled.run(
            refs, torch.Generator().manual_seed(seed * 1_000_003 + s + 1), record=record
        )
        if s == 0:
            samples = [{k: int(v[j]) for k, v in record.items()} for j in range(min(n, n_show))]
    return GraphScrubResult(
        hypothesis=hypothesis.name,
        description=hypothesis.describe(),
        n_examples=n,
        n_seeds=n_seeds,
        loss_original=Estimate.of(original[None].double()),
        loss_scrubbed=Estimate.of(scrubbed),
        refs=refs,
        original=original,
        scrubbed=scrubbed,
        samples=samples,
    )
