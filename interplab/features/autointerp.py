"""The autointerp score of an SAE, as one more metric of `interplab.sae.bench` (SAEBench's autointerp, re-derived
on interplab's own explainers and scorers).

For one SAE: build a small feature database on the bench tokens (no loss effects, no co-occurrence), draw a
seeded sample of ``n_features`` features that fire, explain each and score the explanation; the metric is the
mean score over the sample (a NaN score, e.g. no contexts, is left out). Which explainer and scorers run
depends on the backend:

- no LLM backend (the default, offline): the built-in baseline explainer (`TokenEnrichmentExplainer`) scored by
  `BaselineScorer` (its token-list simulation correlated with the true activations, chance 0); the metric is
  named ``autointerp_baseline`` so a table never passes the baseline off as an LLM judge's score;
- an LLM backend: `LLMExplainer` scored by `DetectionScorer` and `FuzzingScorer` (balanced accuracies, chance
  0.5): metrics ``autointerp_detection`` and ``autointerp_fuzzing``.

Each SAE's database is kept (``<workdir>/<name>.db``): its explanations can be browsed, and the LLM's replies are
cached in it, so a rerun of the bench costs no call twice.

>>> metric = autointerp_metric(model, tokens, workdir="bench-autointerp", cfg=AutointerpConfig(n_features=8))
>>> sorted(metric("sae", sae))
['autointerp_baseline']
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from interplab.features.build import build_feature_db
from interplab.features.collect import TokenSource
from interplab.features.config import FeatureBuildConfig
from interplab.features.explain import (
    Explainer,
    LLMExplainer,
    TokenEnrichmentExplainer,
    explain_features,
    explainer_backend,
    explainer_name,
)
from interplab.features.llm import Backend, CachedBackend
from interplab.features.scorers import BaselineScorer, DetectionScorer, FuzzingScorer, Scorer, score_features
from interplab.features.writer import FeatureWriter
from interplab.model import Transformer
from interplab.sae import SAE

#: the metric the offline baseline reports (its name says it is the baseline)
BASELINE_METRIC = "autointerp_baseline"


@dataclass(frozen=True, kw_only=True)
class AutointerpConfig:
    """What the autointerp metric of `sae bench` explains and scores."""

    n_features: int = 64
    """features explained and scored per SAE (a seeded sample of those that fire; all of them if fewer)"""
    seed: int = 0
    """seed of the feature sample and of the contexts the scorers draw"""
    build: FeatureBuildConfig = field(
        default_factory=lambda: FeatureBuildConfig(loss_effect=False, cooccurrence=False)
    )
    """the feature-database build the explanations are made from"""

    def __post_init__(self) -> None:
        if not isinstance(self.n_features, int) or self.n_features < 1:
            raise ValueError(f"n_features must be a positive int, got {self.n_features!r}")


def _metric_name(scorer: Scorer) -> str:
    return BASELINE_METRIC if isinstance(scorer, BaselineScorer) else f"autointerp_{scorer.name}"


def autointerp_score(
    db_path: str | Path,
    model: Transformer,
    sae: SAE,
    tokens: TokenSource,
    *,
    backend: Backend | None = None,
    cfg: AutointerpConfig = AutointerpConfig(),
) -> dict[str, float]:
    """{metric: mean score over the sampled features} of one SAE (see the module docstring); the feature
    database is built at (or resumed from) ``db_path``."""
    build_feature_db(db_path, model, sae, tokens, cfg.build)
    with FeatureWriter(db_path) as writer:
        cached = CachedBackend(backend, writer) if backend is not None else None
        explainer: Explainer = LLMExplainer(cached) if cached is not None else TokenEnrichmentExplainer()
        scorers: list[Scorer] = (
            [DetectionScorer(cached), FuzzingScorer(cached)] if cached is not None else [BaselineScorer()]
        )
        with writer.reader() as reader:
            alive = [r["feature"] for r in reader.list_features(limit=10**9) if (r["density"] or 0) > 0]
        sample = sorted(random.Random(cfg.seed).sample(alive, min(cfg.n_features, len(alive))))
        explain_features(writer, explainer, features=sample, progress=False)
        score_features(writer, scorers, features=sample, seed=cfg.seed)
        name = explainer_name(explainer)
        backend_name = explainer_backend(explainer)
        values: dict[str, list[float]] = {_metric_name(s): [] for s in scorers}
        with writer.reader() as reader:
            for f in sample:
                for e in reader.explanations(f):
                    if e["explainer"] != name or e["backend"] != backend_name:
                        continue
                    for s in reader.scores(e["id"]):
                        for scorer in scorers:
                            if (s["scorer"], s["backend"], s["prompt_version"], s["seed"]) == (
                                scorer.name,
                                scorer.backend_name,
                                scorer.prompt_version,
                                cfg.seed,
                            ) and not math.isnan(s["value"]):
                                values[_metric_name(scorer)].append(s["value"])
    return {m: statistics.fmean(v) if v else float("nan") for m, v in values.items()}


def autointerp_metric(
    model: Transformer,
    tokens: TokenSource,
    *,
    workdir: str | Path,
    backend: Backend | None = None,
    cfg: AutointerpConfig = AutointerpConfig(),
) -> Callable[[str, SAE], dict[str, float]]:
    """An extra metric for `interplab.sae.bench.bench_saes` (``extra={"autointerp": ...}``): each SAE's
    `autointerp_score`, its feature database at ``<workdir>/<SAE name>.db``."""
    workdir = Path(workdir)

    def metric(name: str, sae: SAE) -> dict[str, float]:
        workdir.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        return autointerp_score(workdir / f"{safe}.db", model, sae, tokens, backend=backend, cfg=cfg)

    return metric
