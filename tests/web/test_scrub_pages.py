"""The scrub run page: every hypothesis' report listed and shown (numbers, positioned claims, per class,
sampled inputs coloured by row), and the report files served sandboxed, with the app's own plotly.js."""

from __future__ import annotations

import os
import re

import pytest
from fastapi.testclient import TestClient

from interplab.cli.scrub import hypothesis_folders
from interplab.plots import PLOTLY_JS, plotly_js_source
from interplab.web.app import REPORT_POLICY, create_app
from tests.web.conftest import SCRUB_HYPOTHESES, write_scrub_run


@pytest.fixture(scope="module")
def scrub_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scrubweb") / "runs"
    write_scrub_run(root / "scrub")
    return root


@pytest.fixture(scope="module")
def client(scrub_runs):
    return TestClient(create_app(runs=[scrub_runs]), base_url="http://127.0.0.1")


def test_home_lists_the_scrub_run_with_its_hypotheses(client):
    home = client.get("/").text
    assert home.count('class="run-link"') == 1 and "2 scrubbed hypotheses" in home


def test_run_page_shows_every_hypothesis(client):
    page = client.get("/run/0").text
    table = page.split('id="scrub-table"')[1].split("</table>")[0]
    assert "1a (count)" in table and "&lt;script&gt;alert(1)&lt;/script&gt;" in table
    assert "<script>alert" not in page
    assert table.count("88.0%") == 2 and "[86.0, 90.0]" in table  # recovered with its 95% interval
    for folder in hypothesis_folders(SCRUB_HYPOTHESES):
        assert f'href="/run/0/files/{folder}/report.html"' in table
    assert page.count("<code>logits/a2.1/a2.1.in@[5..40]</code>") == 2  # positioned claims, per hypothesis
    assert page.count('class="grid per-class"') == 2 and "1,089" in page
    lines = re.findall(r'<tr class="sample-line" style="background:(#[0-9a-f]{6})" data-row="(\d+)"', page)
    assert len(lines) == 2 * 10
    colour_of: dict[str, set[str]] = {}
    for colour, row in lines:
        colour_of.setdefault(row, set()).add(colour)
    assert all(len(c) == 1 for c in colour_of.values()) and len(colour_of) == 6  # same row, same colour


def test_report_files_are_served_sandboxed_with_the_apps_plotly(client, scrub_runs):
    folder = hypothesis_folders(SCRUB_HYPOTHESES)[0]
    r = client.get(f"/run/0/files/{folder}/report.html")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == REPORT_POLICY and "sandbox" in REPORT_POLICY
    assert r.headers["x-content-type-options"] == "nosniff"
    assert f'src="../{PLOTLY_JS}"' in r.text and "a2.1.in@[5..40]" in r.text
    # the run's copy is replaced by something else: the app still serves its own bundle
    (scrub_runs / "scrub" / PLOTLY_JS).write_text("alert('not plotly')")
    for path in (PLOTLY_JS, f"{folder}/{PLOTLY_JS}"):
        js = client.get(f"/run/0/files/{path}")
        assert js.status_code == 200 and js.content == plotly_js_source().read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "report.json",  # not a page or a picture
        "config.json",
        "log.jsonl",
        "nothere.html",
        "..%2F..%2Foutside.html",
        "%2e%2e/%2e%2e/outside.html",
        "link/outside.html",
        "a%00b.html",
    ],
)
def test_other_files_are_not_served(client, scrub_runs, path):
    outside = scrub_runs.parent / "outside.html"
    outside.write_text("<p>outside</p>")
    link = scrub_runs / "scrub" / "link"
    if not link.exists():
        os.symlink(scrub_runs.parent, link)
    r = client.get(f"/run/0/files/{path}")
    assert r.status_code == 404 and "<p>outside</p>" not in r.text
    assert client.get("/run/7/files/report.html").status_code == 404


def test_an_older_scrub_report_still_shows(tmp_path):
    """A report written before the intervals over references and the sampled inputs existed."""
    import json

    old = tmp_path / "runs" / "scrub"
    (old / "h").mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"command": "scrub", "n_examples": 10}))
    est = {"mean": 0.5, "se": 0.1, "ci_low": 0.4, "ci_high": 0.6}
    report = {
        "kind": "scrub",
        "hypothesis": "old one",
        "recovered": est,
        "loss_scrubbed": est,
        "per_claim": 3,
    }
    (old / "h" / "report.json").write_text(json.dumps(report))
    c = TestClient(create_app(runs=[tmp_path / "runs"]), base_url="http://127.0.0.1")
    page = c.get("/run/0")
    assert page.status_code == 200 and "old one" in page.text and "50.0%" in page.text


ODD = [
    {"samples": "x", "inputs": [], "per_claim": {"a": 1}, "per_class": [], "warnings": "w"},
    {"samples": [1, None, {"logits": "7", "logits/a1.0": True, "logits/a1.0/x": 3}], "inputs": {"3": 5}},
    {"samples": [{"logits (others)": 4}, {}], "recovered": {"mean": "high", "ci_low": None}},
    {"per_claim": [{"claim": None, "loss": [], "recovered": {"mean": float("inf")}}, 7]},
    {"per_class": {"a": {"n": "many", "original": 1}, "b": None}, "hypothesis": 3, "n_examples": -1},
    {"samples": [{"/".join(["logits"] + ["a0.0"] * k): k for k in range(1, 60)}]},  # deep
]


@pytest.mark.parametrize("report", ODD)
def test_odd_scrub_reports_render(tmp_path, report):
    import json

    folder = tmp_path / "runs" / "scrub" / "h"
    folder.mkdir(parents=True)
    (folder.parent / "config.json").write_text(json.dumps({"kind": "scrub", "version": 1}))
    (folder / "report.json").write_text(json.dumps({"kind": "scrub", **report}))
    c = TestClient(create_app(runs=[tmp_path / "runs"]), base_url="http://127.0.0.1")
    page = c.get("/run/0")
    assert page.status_code == 200 and 'id="scrub-table"' in page.text
