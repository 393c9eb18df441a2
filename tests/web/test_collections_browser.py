"""The map, feature lists, expandable contexts with loss effects on hover, and the sweep comparison in real
headless Chromium (skipped without chromium/playwright, as tests/web/test_browser.py). Screenshots go to
test-artifacts/ (the reviewed ones are in docs/images/)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from interplab.web.app import create_app
from tests.web.collections_setup import sweep_dbs
from tests.web.conftest import live_server
from tests.web.test_browser import browser, page  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(web_setup, tmp_path_factory):
    dbs = sweep_dbs(web_setup, tmp_path_factory.mktemp("sweep-browser"))
    app = create_app(list(dbs), runs=[web_setup["runs"]], model=web_setup["model"], sae=web_setup["sae"])
    with live_server(app) as (host, port):
        yield f"http://{host}:{port}"


def test_map_points_open_their_feature(page, server, artifacts_dir):  # noqa: F811
    page.goto(server + "/db/sweep_a/map")
    page.wait_for_selector("#map-chart .plot-container")
    page.screenshot(path=str(artifacts_dir / "browser_map.png"), full_page=True)
    # the pixel of feature 3's point, from Plotly's own axes, then a real click there
    xy = page.evaluate(
        """() => { const el = document.getElementById('map-chart'), L = el._fullLayout;
        const d = JSON.parse(document.getElementById('map-data').textContent).points.find(p => p[0] === 3);
        const r = el.getBoundingClientRect();
        return [r.left + L.xaxis._offset + L.xaxis.l2p(d[1]), r.top + L.yaxis._offset + L.yaxis.l2p(d[2])]; }"""
    )
    page.mouse.move(xy[0], xy[1])
    page.wait_for_timeout(200)
    page.mouse.click(xy[0], xy[1])
    page.wait_for_url("**/db/sweep_a/feature/*")
    assert page.locator("#title").inner_text().startswith("Feature ")


@pytest.fixture(scope="module")
def themed_server(web_setup, tmp_path_factory):
    """A database whose explanations fall into three planted themes (`test_collections.THEMES`), clustered by
    TF-IDF (the sentence model made unavailable, so the clusters are the same on every machine)."""
    from interplab.features.scorers import ScorerError
    from interplab.features.writer import FeatureWriter
    from interplab.web import collections_page
    from tests.web.conftest import copy_db
    from tests.web.test_collections import THEMES

    def missing(*a, **k):
        raise ScorerError("no sentence model")

    db = copy_db(web_setup["db"], tmp_path_factory.mktemp("themes") / "themes.db")
    with FeatureWriter(db) as w:
        texts = [t for ts in THEMES.values() for t in ts]
        for f, t in enumerate(texts):
            w.set_label(f, t, source="human")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(collections_page, "sentence_model", missing)
        app = create_app([db], runs=[web_setup["runs"]], model=web_setup["model"], sae=web_setup["sae"])
        with live_server(app) as (host, port):
            yield f"http://{host}:{port}"


def test_map_colours_by_density_or_explanation_cluster(page, themed_server, artifacts_dir):  # noqa: F811
    page.goto(themed_server + "/db/themes/map")
    page.wait_for_selector("#map-chart .plot-container")
    names = "() => document.getElementById('map-chart').data.map(t => t.name)"
    assert page.evaluate(names) == ["fired", "never fired"]
    with page.expect_navigation():  # the clusters are computed on the server when first asked for
        page.check("#colour-cluster")
    page.wait_for_selector("#map-chart .plot-container")
    page.wait_for_function("document.getElementById('map-chart').dataset.colour === 'cluster'")
    legend = page.evaluate(names)
    assert [n.split(",")[0] for n in legend[:3]] == ["keyword", "string", "number"]
    assert legend[0].endswith("(4)") and legend[3] == "no explanation"
    assert page.locator(".legend .traces").count() == 4  # drawn in the legend, not only in the data
    assert "colour=cluster" in page.url  # the colouring is in the address, so it can be shared
    assert "TF-IDF" in page.locator("#cluster-method").inner_text()
    page.screenshot(path=str(artifacts_dir / "browser_map_clusters.png"), full_page=True)
    # every point of the "keyword" cluster is a feature explained by a keyword theme
    feats = page.evaluate("() => document.getElementById('map-chart').data[0].customdata")
    assert sorted(feats) == [0, 1, 2, 3]
    page.check("#colour-density")
    page.wait_for_function("document.getElementById('map-chart').dataset.colour === 'density'")
    page.reload()
    page.wait_for_selector("#map-chart .plot-container")
    assert page.evaluate(names) == ["fired", "never fired"]


def test_contexts_expand_and_show_activation_and_loss_effect(page, server, artifacts_dir):  # noqa: F811
    page.goto(server + "/db/sweep_a/feature/3")
    ctx = page.locator("#top-contexts .ctx").first
    peak = ctx.locator(".tok.peak")
    assert peak.get_attribute("data-loss") is not None or ctx.locator(".tok[data-loss]").count() > 0
    tok = ctx.locator(".tok[data-loss]:not([data-loss='+0'])").first  # after the peak: the feature matters
    tok.hover()
    tip = page.locator("#tok-tip")
    tip.wait_for(state="visible")
    text = tip.inner_text()
    assert f"activation {tok.get_attribute('data-act')}" in text
    assert f"loss effect {tok.get_attribute('data-loss')} nats" in text
    page.screenshot(path=str(artifacts_dir / "browser_loss_hover.png"), clip=_clip(page, "#top-contexts"))
    # windows of 4 + 1 + 2 tokens fit in the collapsed view; nothing to expand in this tiny database
    far = page.locator("#top-contexts .tok.far")
    assert far.count() == 0 or not far.first.is_visible()


def test_lists_from_feature_pages_reorder_and_export(page, server, artifacts_dir):  # noqa: F811
    for f, note in ((5, "five"), (2, "two")):
        page.goto(server + f"/db/sweep_a/feature/{f}")
        if f == 5:  # no list yet: the form asks for a name
            assert page.locator("#list-select").input_value() == "new"
            page.fill("#list-new-name", "my list")
        page.fill("#list-note", note)
        page.click("#list-add")
        page.wait_for_function("document.getElementById('list-status').textContent.startsWith('added')")
    page.goto(server + "/db/sweep_a/lists")
    page.click("a.list-link >> text='my list'")
    page.wait_for_selector("#list-items")

    def feats() -> list[int]:
        return [int(x) for x in page.locator("tr.item").evaluate_all("rs => rs.map(r => r.dataset.feature)")]

    assert feats() == [5, 2]
    with page.expect_navigation():
        page.locator("tr.item[data-feature='2'] .item-up").click()
    assert feats() == [2, 5]
    page.locator("tr.item[data-feature='5'] .item-note").fill("five, edited")
    page.locator("tr.item[data-feature='5'] .item-save").click()
    page.wait_for_function("document.getElementById('list-status').textContent === 'note saved'")
    page.screenshot(path=str(artifacts_dir / "browser_list.png"), full_page=True)
    exported = json.loads(
        page.request.get(server + page.locator("#export-json").get_attribute("href")).text()
    )
    assert [(i["feature"], i["note"]) for i in exported["items"]] == [(2, "two"), (5, "five, edited")]
    rows = list(
        csv.reader(
            io.StringIO(page.request.get(server + page.locator("#export-csv").get_attribute("href")).text())
        )
    )
    assert rows[1][:3] == ["0", "2", "two"] and rows[2][:3] == ["1", "5", "five, edited"]
    with page.expect_navigation():
        page.locator("tr.item[data-feature='2'] .item-remove").click()
    assert feats() == [5]


def test_compare_page(page, server, artifacts_dir):  # noqa: F811
    page.goto(server + "/db/sweep_a/feature/3")
    page.click("#compare-link")
    page.wait_for_url("**/compare/3")
    assert page.locator(".compare-col").count() == 2
    page.screenshot(path=str(artifacts_dir / "browser_compare.png"), full_page=True)
    page.click(".compare-col[data-db='sweep_a'] a.sae-report")
    page.wait_for_url("**/run/*")


def _clip(pg, selector: str) -> dict:
    box = pg.locator(selector).bounding_box()
    return {"x": box["x"], "y": box["y"], "width": box["width"], "height": min(box["height"] + 60, 900)}
