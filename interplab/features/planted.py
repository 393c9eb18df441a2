"""Planted features for validating scorers: a feature database whose features fire exactly on known token
classes of a real corpus (the Python standard library, tokenised by the project's byte-level BPE), with the
explanation that states each rule (the oracle) and a shuffled one (another feature's rule).

The database is written by the real build (`interplab.features.build.write_feature_db` with the streaming
statistics), fed with activations computed from the rules, so every statistic (top-k, samples, density,
histograms) is the build's own. `RuleJudge` is a judge that follows the explanation's stated rule literally:
offline, it stands in for an LLM, so a scorer that works must give the oracle a score near 1 and the shuffled
explanation one near chance.

>>> db = build_planted_db("planted.db")
>>> db.oracle[0], db.features[0].explanation
(1, 'the keyword "def"')
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interplab.data.corpus import open_corpus
from interplab.data.tokenizer import Tokenizer, train_bpe
from interplab.features.build import BuildReport, write_feature_db
from interplab.features.config import FeatureBuildConfig
from interplab.features.scorers import HIGHLIGHT, MAX_LEVEL
from interplab.features.stream import FeatureStats, StreamingFeatureStats
from interplab.features.writer import FeatureWriter
from interplab.sae import SAEConfig, create_sae
from interplab.sae.config import Architecture

ORACLE = "oracle"
SHUFFLED = "shuffled"
"""the explainers of the planted explanations (`schema.explanations.explainer`)"""


@dataclass(frozen=True)
class PlantedFeature:
    """A feature that fires (activation ``1 + (token id mod 4) / 4``) on exactly the tokens whose text
    ``token_pattern`` matches in full, and (``whole_word``) that are not part of a longer word (the token
    before ends in no word character, unless this one starts with a space; the next starts with none);
    ``text_pattern`` is what a reader of ``explanation`` looks for in text."""

    explanation: str
    token_pattern: str
    text_pattern: str
    whole_word: bool = True

    def fires_on(self, token_text: str) -> bool:
        return re.fullmatch(self.token_pattern, token_text) is not None

    def in_text(self, text: str) -> bool:
        return re.search(self.text_pattern, text) is not None


PLANTED = (
    PlantedFeature('the keyword "def"', r" ?def", r"\bdef\b"),
    PlantedFeature('the word "self"', r" ?self", r"\bself\b"),
    PlantedFeature('the keyword "return"', r" ?return", r"\breturn\b"),
    PlantedFeature('the keyword "import"', r" ?import", r"\bimport\b"),
    PlantedFeature('the constant "None"', r" ?None", r"\bNone\b"),
    PlantedFeature('the keyword "class"', r" ?class", r"\bclass\b"),
    PlantedFeature('the keyword "if"', r" ?if", r"\bif\b"),
    PlantedFeature('the keyword "for"', r" ?for", r"\bfor\b"),
    PlantedFeature('a comment sign "#"', r"\s*#+", r"#", whole_word=False),
    PlantedFeature('the keyword "raise"', r" ?raise", r"\braise\b"),
)
"""the planted features, in feature order"""
SHUFFLE = (5, 4, 9, 7, 2, 0, 8, 3, 1, 6)
"""feature i's shuffled explanation is that of feature SHUFFLE[i] (a derangement)"""


@dataclass(frozen=True)
class PlantedDB:
    """A built planted database: its path, features, the tokens and the stored explanations' ids."""

    path: Path
    features: tuple[PlantedFeature, ...]
    tokens: torch.Tensor
    vocab: tuple[str, ...]
    report: BuildReport
    oracle: dict[int, int] = field(default_factory=dict)
    """feature -> id of its oracle explanation"""
    shuffled: dict[int, int] = field(default_factory=dict)
    """feature -> id of its shuffled explanation"""

    def activations(self) -> torch.Tensor:
        """The planted activations [n_seq pos feature] (the exact truth the database was built from)."""
        return planted_activations(self.tokens, self.vocab, self.features)


def stdlib_tokens(
    n_seqs: int, seq_len: int, vocab_size: int, *, n_files: int = 120
) -> tuple[Tokenizer, torch.Tensor]:
    """A BPE tokenizer trained on the first ``n_files`` standard-library files (sorted by path) and the first
    ``n_seqs`` sequences of ``seq_len`` tokens of those files (the same on every machine with this Python)."""
    corpus = open_corpus("python-stdlib")
    docs = []
    for unit in corpus.units[:n_files]:
        docs.append(Path(unit).read_text(encoding="utf-8", errors="replace"))
    tok = train_bpe(docs, vocab_size)
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d)
        if len(ids) >= n_seqs * seq_len:
            break
    if len(ids) < n_seqs * seq_len:
        raise ValueError(
            f"{n_files} standard-library files give {len(ids)} tokens, fewer than {n_seqs} x {seq_len}"
        )
    return tok, torch.tensor(ids[: n_seqs * seq_len]).view(n_seqs, seq_len)


def planted_activations(
    tokens: torch.Tensor, vocab: Sequence[str], features: Sequence[PlantedFeature] = PLANTED
) -> torch.Tensor:
    """[n_seq pos feature]: feature f's activation on each token (0 where its rule does not match)."""
    table = torch.zeros(len(vocab), len(features))
    for t, s in enumerate(vocab):
        for f, feat in enumerate(features):
            if feat.fires_on(s):
                table[t, f] = 1.0 + (t % 4) / 4
    acts = table[tokens]
    word_end = torch.tensor([bool(re.search(r"\w$", s)) for s in vocab])[tokens]  # ends in a word character
    word_start = torch.tensor([bool(re.match(r"\w", s)) for s in vocab])[tokens]  # starts with one
    glued_before = torch.zeros_like(word_end)
    glued_before[:, 1:] = word_end[:, :-1] & word_start[:, 1:]
    glued_after = torch.zeros_like(word_end)
    glued_after[:, :-1] = word_start[:, 1:]
    inside = glued_before | glued_after
    whole = torch.tensor([f.whole_word for f in features])
    return torch.where(inside[..., None] & whole, 0.0, acts)


def build_planted_db(
    path: str | Path,
    *,
    n_seqs: int = 192,
    seq_len: int = 64,
    vocab_size: int = 1024,
    cfg: FeatureBuildConfig | None = None,
    features: Sequence[PlantedFeature] = PLANTED,
    shuffle: Sequence[int] = SHUFFLE,
) -> PlantedDB:
    """Build the planted feature database at ``path`` (replacing what was there) with oracle and shuffled
    explanations stored (explainers `ORACLE` and `SHUFFLED`, backend "none")."""
    if sorted(shuffle) != list(range(len(features))) or any(i == s for i, s in enumerate(shuffle)):
        raise ValueError(f"shuffle must be a derangement of 0..{len(features) - 1}, got {list(shuffle)}")
    cfg = cfg or FeatureBuildConfig(loss_effect=False, top_k=20, n_samples=24)
    tok, tokens = stdlib_tokens(n_seqs, seq_len, vocab_size)
    vocab = tuple(tok.decode([i]) for i in range(tok.vocab_size))
    acts = planted_activations(tokens, vocab, features)
    missing = [features[f].explanation for f in range(len(features)) if not (acts[..., f] > 0).any()]
    if missing:
        raise ValueError(f"planted features that never fire in the corpus: {missing}")
    # the build needs an SAE only for its site and width
    sae = create_sae(
        SAEConfig(d_in=1, d_sae=len(features), architecture=Architecture.RELU, hook_name="hook_embed")
    )

    def collect(feats: torch.Tensor, state: StreamingFeatureStats, checkpoint, report) -> FeatureStats:
        for lo in range(state.batches * cfg.batch_size, len(tokens), cfg.batch_size):
            state.update(tokens[lo : lo + cfg.batch_size], acts[lo : lo + cfg.batch_size][..., feats])
            report(state.batches, math.ceil(len(tokens) / cfg.batch_size))
        return state.result()

    counts = torch.bincount(tokens.flatten(), minlength=len(vocab)).tolist()
    report = write_feature_db(
        path,
        sae,
        cfg,
        fingerprint={"planted": [f.explanation for f in features], "n_seqs": n_seqs, "seq_len": seq_len},
        meta={"seq_len": seq_len, "planted": True},
        vocab=list(vocab),
        counts=counts,
        collect=collect,
        overwrite=True,
    )
    oracle, shuffled = {}, {}
    with FeatureWriter(path) as w:
        for f, feat in enumerate(features):
            oracle[f] = w.add_explanation(
                f, feat.explanation, explainer=ORACLE, backend="none", prompt_version="planted-1"
            )
            shuffled[f] = w.add_explanation(
                f,
                features[shuffle[f]].explanation,
                explainer=SHUFFLED,
                backend="none",
                prompt_version="planted-1",
            )
    return PlantedDB(Path(path), tuple(features), tokens, vocab, report, oracle, shuffled)


# ---- a judge that follows the stated rule --------------------------------------------------------------------
_EXPLANATION = re.compile(r'^Explanation: (".*")$', re.M)
_TEXT = re.compile(r'^Text (\d+): (".*")$', re.M)
_MARKED = re.compile(re.escape(HIGHLIGHT[0]) + "(.*?)" + re.escape(HIGHLIGHT[1]), re.S)


@dataclass
class RuleJudge:
    """Answers the scorers' prompts (`interplab.features.scorers`) by applying the rule of the planted feature
    the explanation states: detection (does the text contain it), fuzzing (is every highlighted token of the
    class), intruder (the first text without it, else text 1), simulation (level 10 on tokens of the class).
    An explanation that is no planted rule matches nothing. A reply function for any chat backend."""

    features: Sequence[PlantedFeature] = PLANTED

    def rule(self, explanation: str) -> PlantedFeature | None:
        return next((f for f in self.features if f.explanation == explanation), None)

    def __call__(self, messages: list[dict[str, str]]) -> str:
        user = messages[-1]["content"]
        m = _EXPLANATION.search(user)
        rule = self.rule(json.loads(m.group(1))) if m else None
        texts = [json.loads(t) for _, t in _TEXT.findall(user)]
        if "highlighted" in user:
            return json.dumps([int(rule is not None and self._highlight_ok(rule, t)) for t in texts])
        if "does not belong" in user:
            for i, t in enumerate(texts):
                if rule is not None and not rule.in_text(t):
                    return str(i + 1)
            return "1"
        if "one integer per line" in user:
            lines = user.split("\n\n", 2)[-1].split("\n")
            return "\n".join(str(MAX_LEVEL if rule and rule.fires_on(json.loads(s)) else 0) for s in lines)
        return json.dumps([int(rule is not None and rule.in_text(t)) for t in texts])

    @staticmethod
    def _highlight_ok(rule: PlantedFeature, text: str) -> bool:
        marked = _MARKED.findall(text)
        return bool(marked) and all(rule.fires_on(s) for s in marked)


def level_logprobs(text: str, confidence: float = 0.9) -> list[dict[str, float]]:
    """Log-probs for a reply of one level per line: per line, ``confidence`` on the level written and the rest
    spread evenly over the other levels (the level written first), then the newline."""
    rest = math.log((1 - confidence) / MAX_LEVEL)
    out: list[dict[str, float]] = []
    for line in text.split("\n"):
        level = int(line)
        top = {str(level): math.log(confidence)}
        top.update({str(k): rest for k in range(MAX_LEVEL + 1) if k != level})
        out += [top, {"\n": 0.0}]
    return out[:-1]


def server_reply(judge: RuleJudge | None = None, confidence: float = 0.9):
    """`RuleJudge` as the reply function of the loopback test server (``tests/features/llm_server.py``):
    ``(messages, body) -> text``, or ``(text, top_logprobs)`` when the request asks for log-probs."""
    judge = judge or RuleJudge()

    def reply(messages: list[dict[str, str]], body: dict):
        text = judge(messages)
        return (text, level_logprobs(text, confidence)) if body.get("logprobs") else text

    return reply


@dataclass
class RuleJudgeBackend:
    """`RuleJudge` as an in-process backend (the `interplab.features.scorers.Judge` protocol), with log-probs
    from `level_logprobs` when asked; tokens counted as whitespace-separated words."""

    judge: RuleJudge = field(default_factory=RuleJudge)
    confidence: float = 0.9
    name: str = "rule-judge"

    def complete(self, messages, *, max_tokens: int = 256, temperature: float = 0.0, top_logprobs: int = 0):
        text = self.judge(messages)
        return _Reply(
            text,
            sum(len(m["content"].split()) for m in messages),
            len(text.split()),
            level_logprobs(text, self.confidence) if top_logprobs else None,
        )


@dataclass(frozen=True)
class _Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, float]] | None
