"""The web app through its HTTP interface (no browser): pages, 404s, API, search, labels, steering, export."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from interplab.runs import Kind, Report


@pytest.fixture(scope="module")
def client(backend_web_app):
    return TestClient(backend_web_app, base_url="http://127.0.0.1")


def test_home_lists_databases_runs_and_models(client):
    r = client.get("/")
    assert r.status_code == 200
    assert 'href="/db/tiny/"' in r.text
    assert "train-tiny" in r.text and "tokens/s <b>22,121</b>" in r.text and "22120" not in r.text
    assert "3 checkpoints · final model · formation · 1 SAE · 1 attribution" in r.text
    assert "checkpoints/step_" not in r.text and "train-tiny/final" not in r.text  # parts of the run
    assert 'id="models"' in r.text and ">runs/model<" in r.text  # a model folder on its own is listed


def test_feature_page_has_every_panel(client):
    r = client.get("/db/tiny/feature/3")
    assert r.status_code == 200
    for panel in ("hist-chart", "logit-chart", "top-contexts", "samples", "cooc", "steer", "label-form"):
        assert f'id="{panel}"' in r.text
    assert r.text.count('class="tok peak') >= 6  # each context marks its peak token
    assert "/static-vendor/plotly.min.js" in r.text and "cdn" not in r.text.lower()
    assert client.get("/static-vendor/plotly.min.js").status_code == 200


def test_out_of_range_feature_is_a_404_page(client):
    r = client.get("/db/tiny/feature/999")
    assert r.status_code == 404
    assert "feature 999 is not in database" in r.text and "Traceback" not in r.text
    assert client.get("/db/nope/feature/1").status_code == 404
    assert client.get("/api/db/tiny/feature/999").json()["error"].startswith("feature 999")
    assert client.get("/db/tiny/feature/abc").status_code == 422


def test_search_by_token_and_text(client):
    r = client.get("/db/tiny/search", params={"token": "#7"})
    assert r.status_code == 200 and 'href="/db/tiny/feature/7"' in r.text
    client.post("/api/db/tiny/feature/12/label", json={"explanation": "a random direction"})
    r = client.get("/db/tiny/search", params={"q": "random direction"})
    assert 'href="/db/tiny/feature/12"' in r.text
    assert "no token" in client.get("/db/tiny/search", params={"token": "zzz"}).text


def test_label_round_trip_and_navigation(client):
    assert client.post("/api/db/tiny/feature/5/label", json={"explanation": "token five"}).status_code == 200
    assert client.get("/api/db/tiny/feature/5").json()["label"]["explanation"] == "token five"
    assert "token five" in client.get("/db/tiny/feature/5").text
    page = client.get("/db/tiny/feature/5").text
    assert 'href="/db/tiny/feature/4"' in page and 'href="/db/tiny/feature/6"' in page
    r = client.get("/db/tiny/random", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/db/tiny/feature/")
    assert client.post("/api/db/tiny/feature/99/label", json={"explanation": "x"}).status_code == 404


def test_steering_and_attention_api(client, web_setup):
    r = client.post(
        "/api/db/tiny/feature/2/steer", json={"prompt": "1 2 3", "value": 0.0, "max_new_tokens": 4}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["baseline"] == out["steered"] and len(out["steered"]) == 4
    bad = client.post("/api/db/tiny/feature/2/steer", json={"prompt": "hello", "value": 1.0})
    assert bad.status_code == 422 and "token ids" in bad.json()["error"]
    bad = client.post("/api/db/tiny/feature/2/steer", json={"prompt": "1 2", "mode": "multiply"})
    assert bad.status_code == 422 and "unknown mode" in bad.json()["error"]
    r = client.post("/api/attention", json={"prompt": "4 5 6 7"})
    pat = r.json()["patterns"]
    assert len(pat) == 1 and len(pat[0]) == 2 and len(pat[0][0]) == 4
    assert all(abs(sum(row) - 1) < 1e-3 for row in pat[0][0])


def test_run_page_shows_curves(client):
    r = client.get("/run/0")
    assert r.status_code == 200 and '"loss"' in r.text
    assert '"induction_score"' in r.text and '"prev_token (max)"' in r.text  # formation/formation.json
    assert "induction heads form at step <b>50</b>" in r.text
    assert '"blocks_0_hook_resid_pre/fvu"' in r.text  # the SAE's training curves (sae/log.jsonl)
    assert "blocks_0_hook_resid_pre/l0 <b>16</b>" in r.text  # a constant is named, not drawn
    assert "0.2295" in r.text and "no series in report.json" not in r.text
    assert "3 checkpoints at steps 0, 50, 100" in r.text
    assert client.get("/run/99").status_code == 404


def test_run_page_shows_training_data_attribution(client):
    text = client.get("/run/0").text
    assert "Which training sequences built induction:0.1?" in text
    assert "NAOP = bytes([9]) # negotiate about output" in text and "<code>negotiate</code>" in text


def test_missing_database_is_refused(tmp_path):
    from interplab.web.app import create_app

    with pytest.raises(FileNotFoundError, match="no feature database"):
        create_app([tmp_path / "nothing.db"])


def test_static_export_is_self_contained(web_setup, tmp_path):
    import re

    from interplab.web.export import export_html

    report = export_html(web_setup["db"], tmp_path / "site")
    site = tmp_path / "site"
    assert report.n_pages == 17
    report.save(tmp_path / "export.json")
    assert Report.open(tmp_path / "export.json", Kind.FEATURE_EXPORT).data["n_pages"] == 17
    assert (site / "static" / "plotly.min.js").stat().st_size > 1_000_000
    page = (site / "feature" / "3.html").read_text()
    assert 'class="tok peak' in page and "../static/plotly.min.js" in page
    assert 'href="../feature/4.html"' in page and 'id="label-form"' not in page
    # every local link and asset of every page exists; nothing points at the network
    for html in site.rglob("*.html"):
        text = html.read_text()
        assert "http://" not in text and "https://" not in text
        for ref in re.findall(r'(?:href|src)="([^"#?]+)"', text):
            assert (html.parent / ref).resolve().exists(), (html, ref)


def test_odd_database_names_serve_and_read_only_databases_refuse_labels(web_setup, tmp_path):
    import shutil

    from interplab.web.app import create_app

    odd = tmp_path / "odd?mode=ro#1.db"
    shutil.copy(web_setup["db"], odd)
    before = odd.read_bytes()
    client = TestClient(create_app([odd], read_only=True), base_url="http://127.0.0.1")
    home = client.get("/").text
    assert 'href="/db/odd_mode_ro_1/"' in home
    assert client.get("/db/odd_mode_ro_1/feature/3").status_code == 200
    r = client.post("/api/db/odd_mode_ro_1/feature/3/label", json={"explanation": "x"})
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    assert odd.read_bytes() == before


def test_run_page_puts_formation_on_one_time_axis(client, web_setup):
    """Training loss, mechanism scores, LLC total and per component from the run's own files, stacked on one
    step axis with the attribution's window and top sequences."""
    import json
    import re

    text = client.get("/run/0").text
    data = json.loads(re.search(r'id="run-data">(.*?)</script>', text, re.S).group(1))
    t = data["timeline"]
    assert [p["title"] for p in t["panels"]] == [
        "training loss",
        "mechanism scores",
        "LLC (all parameters)",
        "LLC per component",
    ]
    total = t["panels"][2]["series"][0]
    assert total == {
        "name": "all",
        "x": [0, 50, 100],
        "y": [1.5, 6.0, 9.25],
        "err": [0.1, 0.3, None],
        "rhat": [1.004, 1.052, 1.008],
        "ess_bulk": [610.0, 41.0, 450.0],
        "ess_tail": [580.0, 66.0, 400.0],
        "mixed": [True, False, True],  # R-hat 1.052 >= 1.01 at step 50
    }
    head = t["panels"][3]["series"][0]
    assert head["name"] == "L0H1" and head["mixed"] == [None, True, True]  # unknown at step 0
    assert t["rhat_threshold"] == 1.01
    assert "1 not mixed</b> (R-hat &ge; 1.01)" in text
    assert {s["name"] for s in t["panels"][1]["series"]} == {"induction_score", "prev_token (max)"}
    assert t["window"] == [50, 100] and t["formation_step"] == 50
    assert t["top"][0]["sequence"] == 17 and "induction:0.1 (50..100) shaded" in text
    assert "peak 9.25 at step 100" in text
