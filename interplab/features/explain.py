"""Automatic interpretation: explain a feature from its top contexts, score the explanation by how well it
predicts the feature's activations on held-out contexts (the uniformly sampled firings).

Explainers and simulators are pluggable (any object with ``explain`` / ``simulate``). Built in, needing no
network: `TokenEnrichmentExplainer` (the tokens most over-represented where the feature peaks, against
their corpus frequency; the *baseline*, recorded as explainer ``baseline:token-enrichment``) and
`TokenListSimulator`. `LLMExplainer` asks an LLM backend (`interplab.features.llm`: an OpenAI-compatible
endpoint or a local Hugging Face model) with a prompt built from the top and uniformly sampled contexts, the
activating tokens marked with their activations (``contrastive=True`` adds weakly and non-activating text).
`PromptExplainer` wraps any text-completion function.

`explain_features` stores explanations in the feature database (`FeatureWriter.add_explanation`, one per
feature, explainer, backend and prompt version; resumable) and labels the features (``auto:<explainer>``; human
labels are kept); `auto_interp` is the older one-call explain-and-score that writes labels only.

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
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from interplab.features.reader import check_features_exist
from interplab.runs import Kind, write_json

if TYPE_CHECKING:  # explanations need no database code of their own (`auto_interp` is handed one)
    from interplab.features.llm import Backend
    from interplab.features.reader import FeatureReader
    from interplab.features.writer import FeatureWriter

PROMPT_VERSION = "explain-v1"
"""the version of `LLMExplainer`'s prompt (stored with every explanation; change it when the prompt changes, so
`explain_features` explains again instead of skipping)"""
BASELINE_PROMPT_VERSION = "token-enrichment-v1"
"""the version of the baseline explainer's rule"""


@dataclass(frozen=True)
class Explanation:
    """A natural-language explanation, with the tokens it names when the explainer knows them."""

    text: str
    tokens: tuple[int, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


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
    backend: ClassVar[str] = "none"
    prompt_version: ClassVar[str] = BASELINE_PROMPT_VERSION
    baseline: ClassVar[bool] = True

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


SYSTEM_PROMPT = (
    "You are a meticulous interpretability researcher. You look at text where one feature (a direction in a "
    "language model's activations) fires and explain in one short phrase what it detects: a token, a class of "
    "tokens, a pattern or a context. Name concrete tokens in single quotes when the feature fires on them."
)


def highlight(
    tokens: list[int], acts: list[float], vocab: dict[int, str], threshold: float
) -> tuple[str, list]:
    """The text of a context window with every token whose activation is >= ``threshold`` marked ``<<tok>>``,
    and the marked tokens with their activations (positions outside the sequence, id -1, are dropped)."""
    parts, marked = [], []
    for t, a in zip(tokens, acts, strict=True):
        if t < 0:
            continue
        s = vocab.get(t, f"#{t}")
        if threshold > 0 and a >= threshold:
            parts.append(f"<<{s}>>")
            marked.append((s, round(float(a), 2)))
        else:
            parts.append(s)
    return "".join(parts), marked


@dataclass
class LLMExplainer:
    """Explains a feature with an LLM (`interplab.features.llm.Backend`): ``n_top`` top-activating contexts
    and ``n_sampled`` uniformly sampled firings, tokens at >= ``mark_fraction`` of the feature's max activation
    marked ``<<like this>>`` and listed with their activations. ``contrastive=True`` adds ``n_sampled`` weakly
    activating firings (the lowest sampled) and as many snippets where the feature is zero throughout (the
    stretches of its windows before it fires), so the explanation must say what sets the firings apart."""

    backend: Backend
    n_top: int = 10
    n_sampled: int = 5
    contrastive: bool = False
    mark_fraction: float = 0.3
    max_tokens: int = 80
    prompt_version: str = PROMPT_VERSION
    name: str = field(default="", init=False)
    """``llm``, or ``llm-contrastive``"""
    baseline: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.name = "llm-contrastive" if self.contrastive else "llm"
        if self.n_top < 1 or self.n_sampled < 0 or not 0 < self.mark_fraction <= 1:
            raise ValueError(
                f"n_top must be >= 1, n_sampled >= 0 and 0 < mark_fraction <= 1; got {self.n_top}, "
                f"{self.n_sampled}, {self.mark_fraction}"
            )

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def messages(self, record: dict[str, Any], vocab: dict[int, str]) -> list[dict[str, str]]:
        """The chat messages for one feature (``record`` as `FeatureReader.feature` returns it)."""
        threshold = self.mark_fraction * float(record["max_act"])
        samples = record["samples"]
        sampled = (
            samples[:: max(1, len(samples) // self.n_sampled)][: self.n_sampled] if self.n_sampled else []
        )
        sections = [
            ("Top-activating examples", record["top"][: self.n_top]),
            ("Randomly sampled activating examples", sampled),
        ]
        lines = [
            f"Marked tokens are those at >= {self.mark_fraction:.0%} of the feature's maximum activation "
            f"({float(record['max_act']):.2f}); activations follow each example."
        ]
        for title, ctxs in sections:
            if ctxs:
                lines.append(f"\n{title}:")
                lines += self._examples(ctxs, vocab, threshold)
        if self.contrastive:
            weak = sorted(samples, key=lambda c: c["act"])[: self.n_sampled]
            weak = [c for c in weak if c["act"] < threshold]
            if weak:
                lines.append("\nWeakly activating examples (tokens marked at any activation above 0):")
                lines += self._examples(weak, vocab, 1e-9)
            quiet = _silent_snippets(record["top"] + samples, vocab, self.n_sampled)
            if quiet:
                lines.append("\nText where the feature does not fire at all:")
                lines += [f"{i}. {t}" for i, t in enumerate(quiet, 1)]
        lines.append(
            "\nIn one short phrase (at most 15 words), what does this feature detect? Reply with the phrase only."
        )
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]

    @staticmethod
    def _examples(ctxs: list[dict], vocab: dict[int, str], threshold: float) -> list[str]:
        out = []
        for i, c in enumerate(ctxs, 1):
            text, marked = highlight(c["tokens"], c["acts"], vocab, threshold)
            acts = ", ".join(f"{s!r} {a:g}" for s, a in marked)
            out.append(f"{i}. {text!r}\n   activations: {acts or 'none above the mark'}")
        return out

    def explain(self, record, vocab, counts) -> Explanation:
        done = self.backend.complete(self.messages(record, vocab), max_tokens=self.max_tokens)
        text = done.text.strip().strip('"').strip()
        if text.lower().startswith("explanation:"):
            text = text[len("explanation:") :].strip()
        if not text:
            raise ValueError(f"{self.backend.name} gave an empty explanation for feature {record['feature']}")
        return Explanation(
            text,
            meta={"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
        )


def _silent_snippets(contexts: list[dict], vocab: dict[int, str], n: int, min_tokens: int = 4) -> list[str]:
    """Up to ``n`` distinct stretches of context windows where the feature's activation is 0 at every token."""
    out: list[str] = []
    for c in contexts:
        run: list[str] = []
        best: list[str] = []
        for t, a in zip(c["tokens"], c["acts"], strict=True):
            if t >= 0 and a <= 0:
                run.append(vocab.get(t, f"#{t}"))
                best = run if len(run) > len(best) else best
            else:
                run = []
        text = repr("".join(best))
        if len(best) >= min_tokens and text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


def explainer_name(explainer: Explainer) -> str:
    """The name an explanation is recorded under: ``baseline:<name>`` for the built-in baseline."""
    return f"baseline:{explainer.name}" if getattr(explainer, "baseline", False) else explainer.name


def explainer_backend(explainer: Explainer) -> str:
    """The backend an explanation is recorded under: the explainer's ``backend_name`` (an LLM explainer's
    backend), else its ``backend``, else ``"none"`` (the built-in baseline)."""
    return getattr(explainer, "backend_name", None) or str(getattr(explainer, "backend", "none"))


def explain_features(
    writer: FeatureWriter,
    explainer: Explainer,
    *,
    features: Iterable[int] | None = None,
    progress: bool | Callable[[int, int], None] = True,
    overwrite_human: bool = False,
    simulator: Simulator | None = None,
) -> dict[int, int]:
    """Explain ``features`` (default: every feature that fires) and store each explanation
    (`FeatureWriter.add_explanation`) with the explainer's name (`explainer_name`), backend and prompt version,
    and as the feature's label ``auto:<name>`` (human labels kept unless ``overwrite_human``). Resumable: a
    feature that already has an explanation of this explainer, backend and prompt version is skipped; each
    explanation is committed when made, so an error (a lost key, a dead server) loses none already stored.
    ``progress``: a callable gets (done, total) after every feature (the library prints nothing). With a
    ``simulator`` (e.g. `TokenListSimulator`), the label's score is its correlation on the held-out sampled
    contexts, as `auto_interp` scores (also kept in the explanation's meta as ``simulation_correlation``; the
    scorers of `interplab.features.scorers` store theirs separately). Returns feature -> explanation id for the
    features explained now."""
    name = explainer_name(explainer)
    backend = explainer_backend(explainer)
    version = str(getattr(explainer, "prompt_version", "") or "none")
    with writer.reader() as store:
        vocab, counts = store.vocab(), store.token_counts()
        window_left = store.meta().get("window_left", 0)
        human = set(store.labels(source="human"))
        done = store.explained(explainer=name, backend=backend, prompt_version=version)
        if features is None:
            todo = [r["feature"] for r in store.list_features(limit=10**9)]
        else:
            todo = check_features_exist(store, features)
        todo = [f for f in todo if f not in done]
        out: dict[int, int] = {}
        report = progress if callable(progress) else None
        for i, f in enumerate(todo, 1):
            record = {**store.feature(f), "window_left": window_left}
            if record["n_fires"] > 0:
                expl = explainer.explain(record, vocab, counts)
                meta = {**expl.meta, "tokens": list(expl.tokens)} if expl.tokens else dict(expl.meta)
                score = None
                if simulator is not None:
                    score = score_explanation(expl, simulator, record["samples"], vocab)
                    meta["simulation_correlation"] = score
                out[f] = writer.add_explanation(
                    f, expl.text, explainer=name, backend=backend, prompt_version=version, meta=meta
                )
                if f not in human or overwrite_human:
                    writer.set_label(f, expl.text, source=f"auto:{name}", score=score)
            if report is not None:
                report(i, len(todo))
    return out


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
