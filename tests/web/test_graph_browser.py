"""The attribution-graph viewer in real headless Chromium: the layout draws every node and link of the graph
(layers bottom to top, positions left to right, tokens along the bottom, logits on top, links coloured by sign),
hover shows a node's details, click opens a feature's page, shift-click pins, pinned nodes group into a
supernode that is saved into graph.json and is there again after a reload, the subgraph view merges it, and a
hostile graph runs no script of its own."""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.graphs.test_store import planted_graph
from tests.web.conftest import live_server
from tests.web.test_browser import browser, page  # noqa: F401  (fixtures)
from tests.web.test_graph_page import (
    EXAMPLE,
    HOSTILE,
    N_LINKS,
    N_NODES,
    TOKENS,
    hostile_graph,
    make_graph,
    write_graph,
)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def graph_server(tmp_path_factory, web_setup):
    from interplab.web.app import create_app

    root = tmp_path_factory.mktemp("graphbrowser") / "runs"
    write_graph(root / "induction", make_graph(feature_db=str(web_setup["db"])))
    write_graph(root / "example", EXAMPLE.read_text())
    write_graph(root / "hostile", hostile_graph())
    planted_graph().save(root / "planted")
    dense = make_graph()  # more links than are drawn at first
    ids = [n["node_id"] for n in dense["nodes"]]
    dense["links"] = [
        {
            "source": ids[k % len(ids)],
            "target": ids[(k * 7 + 3) % len(ids)],
            "weight": (k % 13 - 6) / 3 or 0.1,
        }
        for k in range(4500)
    ]
    write_graph(root / "dense", dense)
    write_graph(root / "docs", make_graph(feature_db=os.path.relpath(web_setup["db"], root / "docs")))
    with live_server(create_app([web_setup["db"]], runs=[root])) as (host, port):
        yield {"url": f"http://{host}:{port}", "root": root}


def _open(page, server, name: str) -> None:  # noqa: F811
    page.goto(server["url"] + "/")
    page.click(f"a.run-link >> text='runs/{name}'")
    page.wait_for_selector("#graph-svg")


def _xy(page, node_id: str) -> tuple[float, float]:  # noqa: F811
    t = page.locator(f'#graph-svg [data-id="{node_id}"]').get_attribute("transform")
    x, y = re.fullmatch(r"translate\(([-\d.e]+),([-\d.e]+)\)", t).groups()
    return float(x), float(y)


def test_layout_draws_every_node_and_link(page, graph_server, artifacts_dir):  # noqa: F811
    _open(page, graph_server, "induction")
    assert page.locator("#graph-svg .graph-node").count() == N_NODES
    assert page.locator("#graph-svg .graph-edge").count() == N_LINKS
    weights = [e["weight"] for e in make_graph()["links"]]
    assert page.locator('#graph-svg .graph-edge[stroke="#2a7ab8"]').count() == sum(w >= 0 for w in weights)
    assert page.locator('#graph-svg .graph-edge[stroke="#b83a2a"]').count() == sum(w < 0 for w in weights)
    widths = {
        float(w)
        for w in page.eval_on_selector_all(".graph-edge", "es => es.map(e => e.getAttribute('stroke-width'))")
    }
    assert max(widths) == 4.4 and min(widths) > 0.4  # the strongest link is the widest
    assert (
        page.locator("#graph-svg .graph-token").all_text_contents() == ["<bos>", "A", "B", "C", "A"] == TOKENS
    )
    # rows: embeddings at the bottom, layer 0, layer 1, logits on top; columns: positions left to right
    y_emb, y0, y1, y_logit = (_xy(page, i)[1] for i in ("E_3_1", "0_4_1", "1_5_2", "3_5_4"))
    assert y_emb > y0 > y1 > y_logit
    assert _xy(page, "0_4_1")[0] < _xy(page, "1_5_2")[0] < _xy(page, "0_2_3")[0] < _xy(page, "1_1_4")[0]
    assert _xy(page, "0_2_4")[1] == _xy(page, "0_-1_4")[1] == y0  # an error node sits in its layer's row
    assert page.locator("#graph-svg .graph-logit-label").all_text_contents() == ['" B"', '" C"']
    page.hover('#graph-svg [data-id="1_3_4"]')
    tip = page.locator("#graph-tooltip")
    assert tip.is_visible()
    text = tip.inner_text()
    assert (
        "kind: feature" in text and "layer: 1" in text and "position: 4 (A)" in text and "feature: 3" in text
    )
    assert "activation: 6.5" in text and "influence: 0.35" in text
    assert (
        page.locator("#graph-svg .graph-edge.hl").count() == 1 + 4 + 2
    )  # its embedding, 4 features, 2 logits
    page.screenshot(path=str(artifacts_dir / "browser_graph.png"), full_page=True)


def test_a_graph_interplab_built_is_drawn_whole(page, graph_server):  # noqa: F811
    doc = json.loads((graph_server["root"] / "planted" / "graph.json").read_text())
    _open(page, graph_server, "planted")
    assert page.locator("#graph-svg .graph-node").count() == len(doc["nodes"])
    assert page.locator("#graph-svg .graph-edge").count() == len(doc["links"])
    assert page.locator("#graph-svg .graph-token").count() == len(doc["metadata"]["prompt_tokens"])
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert page.locator('#graph-svg .graph-node[data-kind="logit"]').count() == len(logits)


def test_the_strongest_links_are_drawn_first_and_all_on_demand(page, graph_server):  # noqa: F811
    _open(page, graph_server, "dense")
    assert page.locator("#graph-svg .graph-edge").count() == 4000
    assert page.locator("#graph-links-note").inner_text() == "drawing the 4,000 strongest of 4,500 links"
    drawn = page.eval_on_selector_all(
        ".graph-edge", "es => es.map(e => Math.abs(+e.getAttribute('data-weight')))"
    )
    assert min(drawn) >= 1 / 3  # the 500 left out are the weakest (|w| = 0.1 and 1/3)
    page.click("#graph-links-all")
    assert page.locator("#graph-svg .graph-edge").count() == 4500
    assert page.locator("#graph-links-note").inner_text() == ""


def test_pin_group_save_and_reload_keeps_the_supernode(page, graph_server, artifacts_dir):  # noqa: F811
    _open(page, graph_server, "induction")
    for node_id in ("0_2_3", "1_3_4", "1_1_4"):
        page.locator(f'#graph-svg [data-id="{node_id}"]').click(modifiers=["Shift"])
    assert page.locator("#graph-svg .graph-node.pinned").count() == 3
    assert page.locator("#graph-pin-count").inner_text() == "3"
    assert page.locator("#graph-save-status").inner_text() == "unsaved changes"
    page.check('#graph-pin-list input[value="1_3_4"]')
    page.check('#graph-pin-list input[value="1_1_4"]')
    page.fill("#graph-group-label", "say B")
    page.click("#graph-group")
    assert page.locator("#graph-group-count").inner_text() == "1"
    page.click("#graph-save")
    page.wait_for_function("document.getElementById('graph-save-status').textContent.startsWith('saved')")
    assert page.locator("#graph-save-status").inner_text() == "saved: 3 pinned, 1 supernodes"
    saved = json.loads((graph_server["root"] / "induction" / "graph.json").read_text())["qParams"]
    assert saved["pinnedIds"] == ["0_2_3", "1_3_4", "1_1_4"]
    assert saved["supernodes"] == [["say B", "1_3_4", "1_1_4"]]
    assert saved["linkType"] == "both"

    page.reload()
    page.wait_for_selector("#graph-svg")
    assert page.locator("#graph-pin-count").inner_text() == "3"
    assert page.locator("#graph-group-list input.graph-label-edit").input_value() == "say B"
    assert page.locator("#graph-svg .graph-node.pinned").count() == 3
    page.click("#graph-show-sub")  # the subgraph: the supernode as one node, its links summed
    assert page.locator("#graph-svg").get_attribute("data-view") == "sub"
    assert page.locator("#graph-svg .graph-node").count() == 2
    assert page.locator('#graph-svg .graph-node[data-kind="group"]').get_attribute("data-label") == "say B"
    assert page.locator("#graph-svg .graph-group-label").all_text_contents() == ["say B", "L0 #2 @3"]
    links = {(e["source"], e["target"]): e["weight"] for e in make_graph()["links"]}
    edges = page.locator("#graph-svg .graph-edge")
    assert edges.count() == 1
    assert float(edges.get_attribute("data-weight")) == pytest.approx(
        links[("0_2_3", "1_3_4")] + links[("0_2_3", "1_1_4")], abs=1e-12
    )
    page.screenshot(path=str(artifacts_dir / "browser_graph_subgraph.png"), full_page=True)

    page.fill("#graph-group-list input.graph-label-edit", "say B (induction)")  # rename, then ungroup one
    page.press("#graph-group-list input.graph-label-edit", "Enter")
    assert (
        page.locator('#graph-svg .graph-node[data-kind="group"]').get_attribute("data-label")
        == "say B (induction)"
    )
    page.click("#graph-show-full")
    page.locator('#graph-svg [data-id="1_1_4"]').click()
    page.click("#graph-pin-selected")  # unpinning a member takes it out of its supernode
    assert page.locator("#graph-pin-count").inner_text() == "2"
    page.click("#graph-save")
    page.wait_for_function("document.getElementById('graph-save-status').textContent.startsWith('saved')")
    saved = json.loads((graph_server["root"] / "induction" / "graph.json").read_text())["qParams"]
    assert saved["supernodes"] == [["say B (induction)", "1_3_4"]] and saved["pinnedIds"] == [
        "0_2_3",
        "1_3_4",
    ]


def test_clicking_a_feature_opens_its_feature_page(page, graph_server):  # noqa: F811
    _open(page, graph_server, "induction")
    page.locator('#graph-svg [data-id="1_3_4"]').click()
    assert page.locator("#graph-svg .graph-node.selected").get_attribute("data-id") == "1_3_4"
    assert page.locator("#graph-feature-frame").get_attribute("src") == "/db/tiny/feature/3"
    frame = page.frame_locator("#graph-feature-frame")
    assert frame.locator("#title").inner_text().startswith("Feature 3")
    assert page.locator("#graph-feature-link").get_attribute("href") == "/db/tiny/feature/3"
    page.locator('#graph-svg [data-id="E_3_1"]').click()  # not a feature: details only
    assert page.locator("#graph-feature-frame").count() == 0
    assert "token embedding" in page.locator("#graph-details").inner_text()
    _open(page, graph_server, "example")  # circuit-tracer's own file, no feature database linked
    assert page.locator("#graph-svg .graph-node").count() == 12
    assert page.locator("#graph-svg .graph-edge").count() == 28
    page.locator('#graph-svg [data-id="0_5_4"]').click()
    cells = page.locator("#graph-details td").all_text_contents()
    rows = dict(zip(cells[::2], cells[1::2], strict=True))
    assert rows["kind"] == "feature" and rows["feature"] == "5" and rows["layer"] == "0"
    assert page.locator("#graph-feature-frame").count() == 0


def test_a_hostile_graph_is_shown_as_text(page, graph_server):  # noqa: F811
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    _open(page, graph_server, "hostile")
    assert page.locator("#graph-prompt").inner_text() == HOSTILE
    assert page.locator("#graph-svg .graph-token-box title").first.text_content() == HOSTILE + " (position 0)"
    page.hover('#graph-svg [data-id="0_4_1"]')
    assert HOSTILE in page.locator("#graph-tooltip").inner_text()
    page.click("#graph-show-sub")
    assert page.locator('#graph-svg .graph-node[data-kind="group"]').get_attribute("data-label") == HOSTILE
    served = page.request.get(page.url).text()
    assert page.locator("script").count() == served.count("<script") == 6  # the page's own, none added
    assert page.locator("img, iframe").count() == 0
    page.wait_for_timeout(200)
    assert dialogs == []


def test_docs_screenshot(page, graph_server, artifacts_dir):  # noqa: F811
    """The picture of docs/graphs.md (copied there by hand when the page changes): two nodes pinned, one
    selected (its feature page beside the graph), another hovered."""
    _open(page, graph_server, "docs")
    page.set_viewport_size({"width": 1280, "height": 820})
    page.locator('#graph-svg [data-id="1_3_4"]').click(modifiers=["Shift"])
    page.locator('#graph-svg [data-id="0_2_3"]').click(modifiers=["Shift"])
    page.locator('#graph-svg [data-id="1_3_4"]').click()
    page.hover('#graph-svg [data-id="0_2_3"]')
    page.screenshot(
        path=str(artifacts_dir / "graph-viewer.png"),
        full_page=True,
        clip=page.locator("#graph").bounding_box(),
    )
    assert page.locator("#graph-tooltip").is_visible()
    assert page.locator("#graph-svg .graph-node.pinned").count() == 2
    page.locator('#graph-svg [data-id="1_1_4"]').click(modifiers=["Shift"])
    page.locator('#graph-svg [data-id="E_3_4"]').click(modifiers=["Shift"])
    page.check('#graph-pin-list input[value="1_3_4"]')
    page.check('#graph-pin-list input[value="1_1_4"]')
    page.fill("#graph-group-label", "say B")
    page.click("#graph-group")
    page.click("#graph-show-sub")
    page.mouse.move(0, 0)
    page.locator("#graph").screenshot(path=str(artifacts_dir / "graph-subgraph.png"))
    assert page.locator("#graph-svg .graph-node").count() == 3
