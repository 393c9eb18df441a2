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
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.engine import EdgeEngine, Spec
from interplab.model.transformer import Transformer
from interplab.scrub.compile import compile_hypothesis
from interplab.scrub.estimate import recovered_fraction
from interplab.scrub.hypothesis import Hypothesis
from interplab.scrub.result import ClaimRow, Estimate, ScrubResult, sample_inputs
from interplab.scrub.sampling import FeatureGroups

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
    """``decode(row tokens, padding left out)`` -> the row as text, for the sampled inputs of reports (default:
    the token ids)"""


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
    n_show: int = 5
    """record the rows each claim ran on for this many references (seed 0): `ScrubResult.samples`"""
    cache_rows: int = 4096
    """most data-set rows whose clean activations are cached at once (memory: rows x nodes x pos x d_model
    floats); a hypothesis drawing many data per reference (per-position claims) runs smaller batches"""

    def __post_init__(self) -> None:
        if not isinstance(self.n_show, int) or self.n_show < 0:
            raise ValueError(f"ScrubConfig.n_show must be an int >= 0, got {self.n_show!r}")
        for name in ("n_examples", "n_seeds", "batch_size", "cache_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ScrubConfig.{name} must be a positive int, got {value!r}")


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
    groups: dict[str, Any] = {}
    compiled = [
        (
            path,
            compile_hypothesis(engine, h, pool=pool, random_per_path=config.random_per_path, groups=groups),
        )
        for path, h in variants
    ]
    # references per batch: every datum a reference draws is a cached clean forward
    per_ref = max(c.rows_per_reference() for _, c in compiled)
    batch = max(1, min(config.batch_size, config.cache_rows // per_ref))
    n_batches = math.ceil(config.n_examples / batch)
    orig = torch.empty(config.n_examples)
    rand = torch.empty(config.n_seeds, config.n_examples)
    scrubbed = torch.empty(len(compiled), config.n_seeds, config.n_examples)
    samples: list[dict[str, int]] = []
    n_forwards = 0  # example-inputs the treeified models run on (what a naive implementation would run)
    before = engine.stats.clean_examples, engine.stats.node_evaluations
    for b in range(n_batches):
        sl = slice(b * batch, min(config.n_examples, (b + 1) * batch))
        x = refs[sl]
        engine.clear_cache()
        cached_since = engine.stats.clean_examples
        orig[sl] = _per_example(engine, task, Spec(x), x)
        for seed in range(config.n_seeds):
            g = torch.Generator().manual_seed(_stream(config.seed, seed, b))
            pool_rows = pool[torch.randint(0, pool.numel(), x.shape, generator=g)]
            rand[seed, sl] = _per_example(engine, task, Spec(pool_rows), x)
            for i, (_, c) in enumerate(compiled):
                # common random numbers: the root's random input is the baseline's, so the empty hypothesis
                # reproduces the baseline exactly and differences between variants have less noise
                gi = torch.Generator().manual_seed(_stream(config.seed, seed, b))
                record: dict[str, Tensor] | None = (
                    {} if i == 0 and seed == 0 and sl.start < config.n_show else None
                )
                builder = c.builder(x, gi, record=record)
                spec = builder.root()
                engine.ensure_clean(torch.cat(builder.rows))  # in large batches, before the small look-ups
                scrubbed[i, seed, sl] = _per_example(engine, task, spec, x)
                n_forwards += builder.n_forwards
                if record is not None:
                    for j in range(min(x.numel(), config.n_show - sl.start)):
                        samples.append({k: int(v[j]) for k, v in record.items()})
                if engine.stats.clean_examples - cached_since > config.cache_rows:
                    engine.clear_cache()
                    cached_since = engine.stats.clean_examples
        if progress is not None:
            progress(b + 1, n_batches)
    engine.clear_cache()
    l_orig, l_rand = Estimate.of(orig[None]), Estimate.of(rand)
    rows = []
    for i, (path, _) in enumerate(compiled):
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
        if not isinstance(group, FeatureGroups):
            continue
        single = group.singletons(refs)
        if single:
            warnings.append(
                f"claim {group.where}: {len(single)} value(s) of feature {group.feature.name!r} have a single "
                f"input in the pool, e.g. {single[0]!r}: resampling cannot change those"
            )
        if group.near_ties:
            a, b = group.near_ties[0]
            warnings.append(
                f"claim {group.where}: feature {group.feature.name!r} has distinct values {a!r} and {b!r} that "
                f"differ only by rounding ({len(group.near_ties)} such pair(s)); values are grouped by exact "
                "equality: compute it with integers or fractions.Fraction"
            )
    per_class = _per_class(task, refs, orig, rand, scrubbed[0])
    # a naive implementation runs one whole forward per input of the treeified model per example
    naive = n_forwards
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
        samples=samples,
        inputs=sample_inputs(samples, task.tokens, task.decode, task.attention_mask),
        forwards={
            "clean_example_forwards": engine.stats.clean_examples - before[0],
            "node_evaluations": engine.stats.node_evaluations - before[1],
            "naive_example_forwards": naive + config.n_examples * (1 + config.n_seeds),
            "n_nodes": len(engine.graph.nodes),
        },
    )


_RESAMPLING = 0x9E3779B9
"""offset of the resampling streams, so that none of them is the references' stream (``manual_seed(config.seed)``)
whose first draws it would repeat (with seed 0 the first batch's first random input was its first reference).
CPU generators keep 32 bits of a seed, so the offset is below 2**32 (1 << 40 would be seed 0 again)."""


def _stream(seed: int, resampling: int, batch: int) -> int:
    """The seed of the random numbers resampling ``resampling`` draws for ``batch``."""
    return _RESAMPLING + seed * 1_000_003 + resampling * 10_007 + batch


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
