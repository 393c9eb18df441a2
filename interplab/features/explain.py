"""Automatic interpretation: explain a feature from its top contexts, score the explanation by how well it
predicts the feature's activations on held-out contexts (the uniformly sampled firings).

Explainers and simulators are pluggable (any object with ``explain`` / ``simulate``). Built in, needing no
network: `TokenEnrichmentExplainer` (the tokens most over-represented where the feature peaks, against
their corpus frequency) and `TokenListSimulator`. `PromptExplainer` wraps any text-completion function
(an LLM client) with a prompt built from the top contexts.

>>> from interplab.features.writer import FeatureWriter
>>> result = auto_interp(FeatureWriter("features.db"), TokenEnrichmentExplainer())
>>> 0.0 <= result.scores[12] <= 1.0
True
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from interplab.runs import Kind, write_json

if TYPE_CHECKING:  # explanations need no database code of their own (`auto_interp` is handed one)
    from interplab.features.reader import FeatureReader
    from interplab.features.writer import FeatureWriter


@dataclass(frozen=True)
class Explanation:
    """A natural-language explanation, with the tokens it names when the explainer knows them."""

    text: str
    tokens: tuple[int, ...] = ()


class Explainer(Protocol):
    name: str

    def explain(
        self, record: dict[str, Any], vocab: dict[int, str], counts: dict[int, int]
    ) -> Explanation: ...


class Simulator(Protocol):
    def simulate(self, explanation: Explanation, tokens: list[int], vocab: dict[int, str]) -> list[float]: ...


@dataclass
class TokenEnrichmentExplainer:
    """Names the ``k`` tokens whose share among the feature's peak tokens most exceeds their corpus share."""

    k: int = 3
    min_ratio: float = 2.0
    name: str = "token-enrichment"

    def explain(self, record, vocab, counts) -> Explanation:
        center = record.get("window_left", 0)
        peaks = Counter(c["tokens"][center] for c in record["top"])
        total = sum(counts.values()) or 1
        n = sum(peaks.values()) or 1
        scored = []
        for tok, c in peaks.items():
            p_corpus = max(counts.get(tok, 0), 1) / total
            ratio = (c / n) / p_corpus
            if ratio >= self.min_ratio:
                scored.append((c * math.log(ratio), tok))
        best = [tok for _, tok in sorted(scored, key=lambda x: (-x[0], x[1]))[: self.k]]
        if not best:
            return Explanation("no token stands out in the top contexts")
        names = ", ".join(repr(vocab.get(t, f"#{t}")) for t in best)
        return Explanation(f"fires on {names}", tuple(best))


@dataclass
class PromptExplainer:
    """Explains with any ``complete(prompt) -> str`` function (e.g. an LLM client); no network by itself."""

    complete: Callable[[str], str]
    name: str = "prompt"
    n_contexts: int = 10

    def prompt(self, record, vocab) -> str:
        center = record.get("window_left", 0)
        lines = []
        for c in record["top"][: self.n_contexts]:
            parts = [vocab.get(t, f"#{t}") for t in c["tokens"] if t >= 0]
            k = center - sum(1 for t in c["tokens"][:center] if t < 0)
            parts[k] = f"<<{parts[k]}>>"
            lines.append(f"({c['act']:.2f}) " + "".join(parts))
        return (
            "Below are text snippets where a neuron of a language model fires; the token it fires most on is "
            "marked <<like this>>, with the activation in brackets. In one short phrase, what does the neuron "
            "detect?\n\n" + "\n".join(lines) + "\n\nExplanation:"
        )

    def explain(self, record, vocab, counts) -> Explanation:
        return Explanation(self.complete(self.prompt(record, vocab)).strip())


@dataclass
class TokenListSimulator:
    """Predicts activation 1 on the tokens an explanation names (quoted in its text or given as ids)."""

    def simulate(self, explanation, tokens, vocab) -> list[float]:
        named = set(explanation.tokens)
        if not named:
            quoted = set(re.findall(r"'((?:[^'\\]|\\.)*)'", explanation.text))
            named = {t for t, s in vocab.items() if s in quoted}
        return [1.0 if t in named else 0.0 for t in tokens]


def correlation(a: list[float], b: list[float]) -> float:
    n = len(a)
    if n == 0:
        return 0.0
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else 0.0


def score_explanation(
    explanation: Explanation, simulator: Simulator, contexts: list[dict], vocab: dict[int, str]
) -> float:
    """Correlation between simulated and true activations over every token of the held-out ``contexts``."""
    sim, true = [], []
    for c in contexts:
        keep = [i for i, t in enumerate(c["tokens"]) if t >= 0]
        toks = [c["tokens"][i] for i in keep]
        sim += simulator.simulate(explanation, toks, vocab)
        true += [c["acts"][i] for i in keep]
    return correlation(sim, true)


@dataclass(frozen=True)
class AutoInterpResult:
    """Explanations and their scores per feature."""

    explanations: dict[int, str]
    scores: dict[int, float]
    explainer: str
    skipped_human: list[int] = field(default_factory=list)

    def plot(self):
        import plotly.graph_objects as go

        fig = go.Figure(go.Histogram(x=list(self.scores.values()), nbinsx=20))
        fig.update_layout(title=f"explanation scores ({self.explainer})", xaxis_title="correlation")
        return fig

    def save(self, path: str | Path) -> None:
        write_json(
            path,
            Kind.AUTO_INTERP,
            {
                "explainer": self.explainer,
                "explanations": self.explanations,
                "scores": self.scores,
                "skipped_human": self.skipped_human,
            },
        )


def auto_interp(
    db: FeatureWriter,
    explainer: Explainer,
    simulator: Simulator | None = None,
    *,
    features: Iterable[int] | None = None,
    overwrite_human: bool = False,
) -> AutoInterpResult:
    """Explain and score ``features`` (default: all that fire) of the feature database open in ``db`` and
    store the labels as ``auto:<name>`` (human labels are kept unless ``overwrite_human``)."""
    with db.reader() as store:
        return _explain_all(
            store, db, explainer, simulator or TokenListSimulator(), features, overwrite_human
        )


def _explain_all(
    store: FeatureReader,
    writer: FeatureWriter,
    explainer: Explainer,
    simulator: Simulator,
    features: Iterable[int] | None,
    overwrite_human: bool,
) -> AutoInterpResult:
    vocab, counts = store.vocab(), store.token_counts()
    window_left = store.meta().get("window_left", 0)
    human = store.labels(source="human")
    feats = (
        list(features) if features is not None else [r["feature"] for r in store.list_features(limit=10**9)]
    )
    explanations, scores, skipped = {}, {}, []
    for f in feats:
        record = {**store.feature(f), "window_left": window_left}
        if record["n_fires"] == 0:
            continue
        if f in human and not overwrite_human:
            skipped.append(f)
            continue
        expl = explainer.explain(record, vocab, counts)
        score = score_explanation(expl, simulator, record["samples"], vocab)
        writer.set_label(f, expl.text, source=f"auto:{explainer.name}", score=score)
        explanations[f], scores[f] = expl.text, score
    return AutoInterpResult(
        explanations=explanations, scores=scores, explainer=explainer.name, skipped_human=skipped
    )
