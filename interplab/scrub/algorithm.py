"""Causal scrubbing (Chan et al. 2022) on the edge engine.

``scrub(model, task, hypothesis)`` treeifies the model as the hypothesis says (see `interplab.scrub.hypothesis`),
resamples inputs exactly (grouped by feature value), runs the treeified model for every reference example in
batches, and reports the scrubbed, original and random-baseline losses, the fraction of loss recovered
``(L_random - L_scrubbed) / (L_random - L_original)`` with 95% intervals covering resampling and the choice
of references (`interplab.scrub.estimate`), a per-claim breakdown (one claim's resampling at a time) and
per-class losses.

>>> from interplab.circuits.planted import induction_data, planted_induction
>>> from interplab.scrub.induction import induction_steps, induction_task
>>> tokens, _, _ = induction_data(600)
>>> config = ScrubConfig(n_examples=300, n_seeds=2, per_claim=False)
>>> result = scrub(planted_induction(), induction_task(tokens), induction_steps()[-1], config)
>>> result.recovered.mean > 0.95          # the planted induction circuit explains the behaviour
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.engine import EdgeEngine, Spec
from interplab.circuits.graph import ComponentGraph, Edge, Node, NodeKind, Slot, slot_name
from interplab.model.transformer import Transformer
from interplab.scrub.estimate import recovered_fraction
from interplab.scrub.hypothesis import Claim, Feature, Hypothesis
from interplab.scrub.result import ClaimRow, Estimate, ScrubResult
from interplab.scrub.sampling import FeatureGroups, ScrubError

LossFn = Callable[[Float[Tensor, "batch pos d_vocab_out"], Int[Tensor, " batch"]], Float[Tensor, " batch"]]


@dataclass(frozen=True, kw_only=True)
class ScrubTask:
    """A data set and a per-example loss: what scrubbing is measured on."""

    name: str
    """shown in reports"""
    tokens: Int[Tensor, "rows pos"]
    """every input (references are drawn from these; agreeing inputs are sampled from them)"""
    loss: LossFn
    """``loss(logits, reference_rows)`` -> one loss per example (labels looked up by row)"""
    attention_mask: Tensor | None = None
    """1 for real tokens, 0 for padding, as in `Transformer.forward`"""
    classes: Callable[[Tensor], Sequence[str | tuple[str, ...]]] | None = None
    """``classes(tokens)`` -> a class name (or several) per row, for per-class losses"""
    position: int = -1
    """the position whose output the loss reads (used by circuit discovery's KL divergence)"""
    decode: Callable[[Int[Tensor, " pos"]], str] | None = None
    """``decode(row tokens)`` -> the row as text, for the sampled inputs of reports (default: token ids)"""


@dataclass(frozen=True, kw_only=True)
class ScrubConfig:
    """How to scrub."""

    n_examples: int = 4000
    """reference examples (drawn without replacement from the task's rows)"""
    n_seeds: int = 3
    """independent resamplings, for confidence intervals"""
    seed: int = 0
    """seed of the first resampling (and of the choice of references)"""
    random_per_path: bool = False
    """each unclaimed edge gets its own random input (default: one shared by all unclaimed edges of a claim)"""
    per_claim: bool = True
    """also scrub each claim's feature alone (and the hypothesis' structure alone)"""
    batch_size: int = 256
    """reference examples per batch"""
    pool: Tensor | None = None
    """rows agreeing and random inputs are drawn from (default: all rows)"""

    def __post_init__(self) -> None:
        for name in ("n_examples", "n_seeds", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ScrubConfig.{name} must be a positive int, got {value!r}")


@dataclass
class _Compiled:
    claim: Claim
    where: str
    node: Node
    slot: Slot | None  # a head input claim
    edge: Edge | None  # the edge to the parent (node claims under an input or a one-input node)
    groups: FeatureGroups | None
    children: list[_Compiled] = field(default_factory=list)


class _Scrubber:
    def __init__(
        self,
        engine: EdgeEngine,
        hypothesis: Hypothesis,
        config: ScrubConfig,
        pool: Tensor,
        groups: dict[str, FeatureGroups],
    ) -> None:
        self.engine, self.graph, self.config, self.pool = engine, engine.graph, config, pool
        self.groups = groups  # shared by the variants of one hypothesis: each feature is computed once
        self.root = self._compile(hypothesis.root, None, "'logits'")
        self.n_specs = 0  # example-inputs the treeified model runs on (what a naive implementation would run)
        self.n_specs_baseline = 0

    # ---- checking the hypothesis against the model ------------------------------------------------
    def _compile(self, claim: Claim, parent: _Compiled | None, where: str) -> _Compiled:
        graph: ComponentGraph = self.graph
        slot: Slot | None = None
        edge: Edge | None = None
        try:
            if parent is None:
                node = graph.logits
            elif parent.node.kind is NodeKind.HEAD and parent.slot is None:
                try:
                    node, slot = graph.slot(claim.target)
                except ValueError:
                    node, slot = graph.logits, None
                if node != parent.node or slot is None:
                    raise ValueError(
                        f"a child of head {parent.node.name} names one of its inputs "
                        f"({parent.node.name}.q, .k or .v), not {claim.target!r}"
                    )
            else:
                node = graph.node(claim.target)
                into = slot_name(parent.node, parent.slot or Slot.IN)
                edge = graph.edge(f"{node.name}->{into}")
        except ValueError as err:
            raise ScrubError(f"claim {where}: {err}") from None
        groups = None
        if isinstance(claim.feature, Feature):
            key = f"{claim.feature.name}@{id(claim.feature.fn)}"
            if key not in self.groups:
                self.groups[key] = FeatureGroups.build(claim.feature, self.engine.tokens, where, self.pool)
            groups = self.groups[key]
        out = _Compiled(claim, where, node, slot, edge, groups)
        seen: dict[str, str] = {}
        for child in claim.children:
            cw = f"{where[:-1]}/{child.target}'"
            compiled = self._compile(child, out, cw)
            key = compiled.edge.name if compiled.edge is not None else slot_name(compiled.node, compiled.slot)  # type: ignore[arg-type]
            if key in seen:
                raise ScrubError(f"claim {cw}: {key} is already claimed by {seen[key]}")
            seen[key] = cw
            out.children.append(compiled)
        return out

    # ---- building the treeified computation -------------------------------------------------------
    def _random(self, n: int, gen: torch.Generator) -> Tensor:
        self.n_specs += n
        return self.pool[torch.randint(0, self.pool.numel(), (n,), generator=gen)]

    def _input_of(self, c: _Compiled, x: Tensor, gen: torch.Generator) -> Tensor:
        return c.groups.agreeing(x, gen) if c.groups is not None else x

    def node_spec(self, c: _Compiled, x: Tensor, gen: torch.Generator) -> Spec:
        """The spec computing claim ``c``'s component when the claim runs on rows ``x``."""
        self.n_specs += x.numel() if c.claim.leaf else 0
        if c.claim.leaf:
            return Spec(x)
        r = self._random(x.numel(), gen)
        patches: dict[Edge, Spec] = {}
        for child in c.children:
            xc = self._input_of(child, x, gen)
            if child.slot is not None:
                patches.update(self._slot_patches(child, xc, gen))
            else:
                patches[child.edge] = self.node_spec(child, xc, gen)  # type: ignore[index]
        if self.config.random_per_path:
            for edge in self.graph.edges_into(c.node):
                if edge not in patches:
                    patches[edge] = Spec(self._random(x.numel(), gen))
        return Spec(r, patches, context=x)

    def _slot_patches(self, c: _Compiled, x: Tensor, gen: torch.Generator) -> dict[Edge, Spec]:
        edges = self.graph.edges_into(c.node, c.slot)
        if c.claim.leaf:
            self.n_specs += x.numel()
            whole = Spec(x)
            return {e: whole for e in edges}
        claimed = {child.edge: child for child in c.children}
        shared = Spec(self._random(x.numel(), gen))
        out: dict[Edge, Spec] = {}
        for edge in edges:
            if edge in claimed:
                child = claimed[edge]
                out[edge] = self.node_spec(child, self._input_of(child, x, gen), gen)
            elif self.config.random_per_path:
                out[edge] = Spec(self._random(x.numel(), gen))
            else:
                out[edge] = shared
        return out


def _per_example(engine: EdgeEngine, task: ScrubTask, spec: Spec, refs: Tensor) -> Tensor:
    return task.loss(engine.run(spec), refs).detach().float()


def scrub(
    model: Transformer,
    task: ScrubTask,
    hypothesis: Hypothesis,
    config: ScrubConfig | None = None,
    *,
    engine: EdgeEngine | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ScrubResult:
    """Scrub ``hypothesis`` on ``task``; see the module docstring. ``progress(done, total)`` is called per batch."""
    config = config or ScrubConfig()
    engine = engine or EdgeEngine(
        model, task.tokens, task.attention_mask, batch_size=max(config.batch_size, 64)
    )
    n_rows = task.tokens.shape[0]
    pool = torch.arange(n_rows) if config.pool is None else torch.as_tensor(config.pool).long()
    if config.n_examples > n_rows:
        raise ValueError(f"n_examples={config.n_examples} but the task has only {n_rows} rows")
    gen = torch.Generator().manual_seed(config.seed)
    refs = torch.randperm(n_rows, generator=gen)[: config.n_examples]
    variants: list[tuple[tuple[str, ...] | None, Hypothesis]] = [(None, hypothesis)]
    if config.per_claim:
        paths = [p for p, c in hypothesis.claims() if c.feature is not None]
        variants += [(p, hypothesis.only(p)) for p in paths] + [((), hypothesis.only(None))]
    groups: dict[str, FeatureGroups] = {}
    scrubbers = [(path, _Scrubber(engine, h, config, pool, groups)) for path, h in variants]
    main = scrubbers[0][1]
    n_batches = math.ceil(config.n_examples / config.batch_size)
    orig = torch.empty(config.n_examples)
    rand = torch.empty(config.n_seeds, config.n_examples)
    scrubbed = torch.empty(len(scrubbers), config.n_seeds, config.n_examples)
    before = engine.stats.clean_examples, engine.stats.node_evaluations
    for b in range(n_batches):
        sl = slice(b * config.batch_size, min(config.n_examples, (b + 1) * config.batch_size))
        x = refs[sl]
        engine.clear_cache()
        orig[sl] = _per_example(engine, task, Spec(x), x)
        for seed in range(config.n_seeds):
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + seed * 10_007 + b)
            rand[seed, sl] = _per_example(engine, task, Spec(main._random(x.numel(), g)), x)
            main.n_specs_baseline += x.numel()
            for i, (_, s) in enumerate(scrubbers):
                # common random numbers: the root's random input is the baseline's, so the empty hypothesis
                # reproduces the baseline exactly and differences between variants have less noise
                gi = torch.Generator().manual_seed(config.seed * 1_000_003 + seed * 10_007 + b)
                scrubbed[i, seed, sl] = _per_example(engine, task, s.node_spec(s.root, x, gi), x)
        if progress is not None:
            progress(b + 1, n_batches)
    engine.clear_cache()
    l_orig, l_rand = Estimate.of(orig[None]), Estimate.of(rand)
    rows = []
    for i, (path, _) in enumerate(scrubbers):
        est = Estimate.of(scrubbed[i])
        rows.append(
            ClaimRow(
                claim="/".join(path) if path else ("structure" if path == () else "hypothesis"),
                loss=est,
                recovered=_recovered(scrubbed[i], orig, rand),
            )
        )
    warnings = []
    for group in groups.values():
        single = group.singletons(refs)
        if single:
            warnings.append(
                f"claim {group.where}: {len(single)} value(s) of feature {group.feature.name!r} have a single "
                f"input in the pool, e.g. {single[0]!r}: resampling cannot change those"
            )
    per_class = _per_class(task, refs, orig, rand, scrubbed[0])
    # a naive implementation runs one whole forward per input of the treeified model per example
    naive = sum(s.n_specs for _, s in scrubbers) - main.n_specs_baseline
    return ScrubResult(
        hypothesis=hypothesis.name,
        description=hypothesis.describe(),
        task=task.name,
        n_examples=config.n_examples,
        n_seeds=config.n_seeds,
        loss_original=l_orig,
        loss_random=l_rand,
        loss_scrubbed=rows[0].loss,
        recovered=rows[0].recovered,
        per_claim=rows[1:],
        per_class=per_class,
        warnings=warnings,
        forwards={
            "clean_example_forwards": engine.stats.clean_examples - before[0],
            "node_evaluations": engine.stats.node_evaluations - before[1],
            "naive_example_forwards": naive + config.n_examples * (1 + config.n_seeds),
            "n_nodes": len(engine.graph.nodes),
        },
    )


def _recovered(scrubbed: Tensor, orig: Tensor, rand: Tensor) -> Estimate:
    """Fraction of loss recovered: mean over seeds, 95% interval over resampling and references (every row
    of a scrub is bootstrapped on the same resamples of its references: `interplab.scrub.estimate`)."""
    return recovered_fraction(orig, rand, scrubbed)


def _per_class(
    task: ScrubTask, refs: Tensor, orig: Tensor, rand: Tensor, scrubbed: Tensor
) -> dict[str, dict]:
    if task.classes is None:
        return {}
    labels = task.classes(task.tokens[refs])
    members: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        for name in (label,) if isinstance(label, str) else label:
            members.setdefault(name, []).append(i)
    out = {}
    for name, idx in members.items():
        ix = torch.tensor(idx)
        out[name] = {
            "n": len(idx),
            "original": Estimate.of(orig[ix][None]),
            "random": Estimate.of(rand[:, ix]),
            "scrubbed": Estimate.of(scrubbed[:, ix]),
        }
    return out
