"""Explanation clusters (`interplab.features.clusters`): TF-IDF against scikit-learn, k-means on planted
blobs, and clusters named by their top words with either embedding."""

import pytest
import torch

from interplab.features.clusters import (
    MINILM,
    TFIDF,
    cluster_explanations,
    default_k,
    kmeans,
    terms,
    tfidf,
)

TEXTS = ["the keyword def", "keyword def or class", "keyword class", "keyword return", "string literal",
         "quoted string literal", "string in quotes", "number digit", "integer number", "digit of a number"]  # fmt: skip
THEME = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_terms_keep_quoted_tokens_and_drop_stop_words_and_plurals():
    assert terms("fires on 'def', ' (' and \"class\"") == ["def", " (", "class"]
    assert terms("Quoted strings in classes") == ["quoted", "string", "classe"]
    assert terms("the class") == ["class"]  # a double s is no plural


def test_tfidf_equals_scikit_learn():
    text = pytest.importorskip("sklearn.feature_extraction.text")
    x, vocab = tfidf(TEXTS)
    ref = text.TfidfVectorizer(analyzer=terms)
    want = ref.fit_transform(TEXTS).toarray()
    assert vocab == list(ref.get_feature_names_out())
    torch.testing.assert_close(x, torch.from_numpy(want), atol=1e-12, rtol=0)


def test_kmeans_recovers_planted_blobs_numbered_by_size():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [5, 12, 8]
    x = torch.cat([c + 0.3 * torch.randn(n, 2, generator=g) for c, n in zip(centres, sizes, strict=True)])
    truth = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    got = kmeans(x, 3, seed=0)
    # by size: the 12-point blob is cluster 0, the 8-point one 1, the 5-point one 2
    assert got.tolist() == torch.tensor([2, 0, 1])[truth].tolist()
    assert torch.equal(kmeans(x, 3, seed=0), got)  # seeded: the same every time
    with pytest.raises(ValueError, match="k=26 must be in 1..25"):
        kmeans(x, 26)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tfidf_clusters_are_the_themes_named_by_their_words(seed):
    c = cluster_explanations(TEXTS, seed=seed)
    assert c.method == TFIDF and len(c.names) == default_k(len(TEXTS)) == 3
    assert c.labels == THEME and c.sizes == [4, 3, 3]
    assert [n.split(", ")[0] for n in c.names] == ["keyword", "string", "number"]


def test_embedding_clusters_follow_the_embedding_and_keep_tfidf_names():
    """An embedding that puts texts 0-4 together and 5-9 together (whatever their words) decides the clusters;
    the names still come from the words."""

    def embed(texts):
        return torch.tensor([[1.0, 0.01 * i] if i < 5 else [0.01 * i, 1.0] for i in range(len(texts))])

    c = cluster_explanations(TEXTS, k=2, embed=embed)
    assert c.method == MINILM and c.labels == [0] * 5 + [1] * 5
    assert c.names[0].split(", ")[0] == "keyword" and "number" in c.names[1]


def test_no_texts_and_one_text():
    assert cluster_explanations([]).labels == []
    one = cluster_explanations(["fires on 'def'"])
    assert one.labels == [0] and one.names == ["def"]
