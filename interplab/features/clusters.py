"""Clusters of feature explanations, for colouring the feature map by meaning rather than by density.

Each explanation becomes a vector, either its all-MiniLM-L6-v2 sentence embedding (when the optional ``judge``
extra is installed; pass ``embed``) or its TF-IDF vector over the explanation's words and quoted tokens (no
model at all); vectors are unit-normalised and clustered by k-means (k-means++ seeding from a seeded
generator, so the same texts give the same clusters). Each cluster is named by its top words: the terms with
the largest mean TF-IDF weight inside the cluster minus that outside it, whichever vectors were clustered.

>>> c = cluster_explanations(["fires on 'def'", "'def' and 'class'", "string literals", "quoted strings"], k=2)
>>> c.method, c.labels, c.names
('tfidf', [0, 0, 1, 1], ['def, class', 'string, literal, quoted'])
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

TFIDF = "tfidf"
MINILM = "all-MiniLM-L6-v2"
"""the two ways explanations are embedded (`ExplanationClusters.method`)"""
STOP_WORDS = frozenset(
    "a an and are as at be by for from in into is it its of on or that the this to with fires fire firing "
    "feature activates active tokens token mostly often when where which after before".split()
)
"""words too common in explanations to name a cluster"""
_TERM = re.compile(r"'((?:[^'\\]|\\.)+)'|\"((?:[^\"\\]|\\.)+)\"|([A-Za-z][A-Za-z0-9_]+)")

Embed = Callable[[list[str]], Tensor]
"""texts -> [n, d] embeddings (e.g. a sentence model's ``encode``)"""


def terms(text: str) -> list[str]:
    """The terms of one explanation: each quoted token as written (``'def'`` -> ``def``, ``' ('`` kept with
    its space) and every other word, lower-cased, a plural ``s`` dropped (not ``ss``), stop words left out."""
    out = []
    for quoted, dquoted, word in _TERM.findall(text):
        if quoted or dquoted:
            out.append(quoted or dquoted)
        elif (w := word.lower()) not in STOP_WORDS:
            out.append(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def tfidf(texts: Sequence[str]) -> tuple[Tensor, list[str]]:
    """[n, vocab] TF-IDF of ``texts`` (term frequency times log((1 + n) / (1 + df)) + 1, rows unit-normalised,
    as scikit-learn's smooth default) and the vocabulary (sorted)."""
    docs = [Counter(terms(t)) for t in texts]
    vocab = sorted({w for d in docs for w in d})
    index = {w: i for i, w in enumerate(vocab)}
    x = torch.zeros(len(texts), len(vocab), dtype=torch.float64)
    for r, d in enumerate(docs):
        for w, c in d.items():
            x[r, index[w]] = c
    df = (x > 0).sum(0).double()
    x = x * (torch.log((1 + len(texts)) / (1 + df)) + 1)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12), vocab


def kmeans(x: Tensor, k: int, *, seed: int = 0, iters: int = 50, n_init: int = 8) -> Tensor:
    """[n] cluster of each row of ``x`` [n, d] by Lloyd's k-means from k-means++ seeds: ``n_init`` seeded
    starts, the one of least within-cluster squared distance kept (a single start often stops in a poor local
    minimum); an emptied cluster is re-seeded with the point farthest from its centre. Clusters are numbered by
    size (largest first, ties by the smallest member)."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in 1..{n} (the number of points)")
    x = x.double()
    best: tuple[float, Tensor] | None = None
    for start in range(n_init):
        labels, inertia = _lloyd(x, k, torch.Generator().manual_seed(seed * 1000 + start), iters)
        if best is None or inertia < best[0] - 1e-12:
            best = (inertia, labels)
    assert best is not None
    labels = best[1]
    sizes = torch.bincount(labels, minlength=k)
    first = torch.tensor([int((labels == j).nonzero()[0]) for j in range(k)])
    order = sorted(range(k), key=lambda j: (-int(sizes[j]), int(first[j])))
    remap = torch.empty(k, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(k)
    return remap[labels]


def _lloyd(x: Tensor, k: int, g: torch.Generator, iters: int) -> tuple[Tensor, float]:
    n = x.shape[0]
    centres = [x[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(1).values.pow(2)
        if float(d2.sum()) == 0:
            idx = int(torch.randint(n, (1,), generator=g))
        else:
            idx = int(torch.multinomial(d2 / d2.sum(), 1, generator=g))
        centres.append(x[idx])
    c = torch.stack(centres)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, c)
        new = dist.argmin(1)
        for j in range(k):
            if not bool((new == j).any()):
                far = int(dist.gather(1, new[:, None]).squeeze(1).argmax())
                new[far] = j
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.stack([x[labels == j].mean(0) for j in range(k)])
    inertia = float((x - c[labels]).pow(2).sum())
    return labels, inertia


def default_k(n: int) -> int:
    """Clusters for ``n`` explanations: about sqrt(n), between 2 and 12 (1 for a single text)."""
    return 1 if n < 2 else max(2, min(12, round(math.sqrt(n)), n))


@dataclass(frozen=True)
class ExplanationClusters:
    """The cluster of each explanation and each cluster's name."""

    labels: list[int]
    """cluster of each text, in the order given (0 = the largest cluster)"""
    names: list[str]
    """each cluster's top words, e.g. ``"def, class, return"``"""
    sizes: list[int]
    """texts per cluster"""
    method: str
    """what was clustered: `TFIDF` or the sentence model's name (`MINILM`)"""


def cluster_explanations(
    texts: Sequence[str],
    *,
    k: int | None = None,
    embed: Embed | None = None,
    method: str | None = None,
    seed: int = 0,
    top_words: int = 3,
) -> ExplanationClusters:
    """Cluster ``texts`` (see the module docstring): by ``embed``'s vectors when given (``method`` names it,
    default `MINILM`), else by TF-IDF; ``k`` clusters (default `default_k`)."""
    if not texts:
        return ExplanationClusters([], [], [], method or (MINILM if embed else TFIDF))
    k = default_k(len(texts)) if k is None else k
    weights, vocab = tfidf(texts)
    if embed is not None:
        x = torch.as_tensor(embed(list(texts))).double()
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        method = method or MINILM
    else:
        x, method = weights, TFIDF
    labels = kmeans(x, min(k, len(texts)), seed=seed)
    names, sizes = [], []
    for j in range(int(labels.max()) + 1):
        inside = labels == j
        sizes.append(int(inside.sum()))
        if not vocab:
            names.append(f"cluster {j}")
            continue
        outside = weights[~inside].mean(0) if bool((~inside).any()) else torch.zeros(len(vocab))
        lift = weights[inside].mean(0) - outside
        best = [int(i) for i in torch.argsort(-lift, stable=True)[:top_words] if float(lift[i]) > 0]
        names.append(", ".join(vocab[i] for i in best) or f"cluster {j}")
    return ExplanationClusters(labels.tolist(), names, sizes, method)
