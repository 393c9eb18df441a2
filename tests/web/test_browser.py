"""The feature explorer in real headless Chromium (Debian's chromium, driven by Playwright).

Skipped with a clear message when chromium or playwright is missing (scripts/test.sh installs chromium where
it may: scripts/browser-deps.sh).
Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.web.conftest import HOSTILE_TOKENS, live_server

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(server_addr):
    host, port = server_addr
    return f"http://{host}:{port}"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip(
            "chromium is not installed (scripts/test.sh installs it where it may: scripts/browser-deps.sh)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip('the playwright Python package is not installed (pip install -e ".[test]" installs it)')
    with sync_playwright() as p:
        # evil.test resolves to this machine, as a rebinding attacker's name would
        args = [*FLAGS, "--host-resolver-rules=MAP evil.test 127.0.0.1"]
        b = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # no request may leave the machine: everything the pages need is served locally
    outside: list[str] = []
    pg.on(
        "request",
        lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:")) else None,
    )
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors: {errors}"
    assert not outside, f"requests outside the loopback server: {outside}"


def test_home_to_feature_with_contexts_and_charts(page, server, artifacts_dir):
    page.goto(server + "/")
    page.screenshot(path=str(artifacts_dir / "browser_home.png"), full_page=True)
    page.click("a.db-link")
    page.wait_for_selector("#feature-list")
    page.click("#feature-list a >> text='3'")
    page.wait_for_url("**/feature/3")
    assert page.locator("#title").inner_text().startswith("Feature 3")
    # highlighted contexts: every top context has a shaded peak token with its activation on hover
    peaks = page.locator("#top-contexts .tok.peak")
    assert peaks.count() >= 1
    assert "rgba(255, 110, 0" in (peaks.first.get_attribute("style") or "").replace(",", ", ").replace(
        ",  ", ", "
    )
    assert float(peaks.first.get_attribute("data-act")) > 0
    assert "#3" in peaks.first.get_attribute("title")
    # the charts rendered (Plotly draws SVG bars)
    page.wait_for_selector("#hist-chart .main-svg")
    page.wait_for_selector("#logit-chart .main-svg")
    assert page.locator("#hist-chart g.point").count() >= 1
    assert page.locator("#logit-chart g.point").count() >= 2
    page.screenshot(path=str(artifacts_dir / "browser_feature.png"), full_page=True)
    page.click("#next")
    page.wait_for_url("**/feature/4")


def test_search_by_token_and_text(page, server, artifacts_dir):
    page.goto(server + "/db/tiny/search")
    page.fill("#search-token", "#7")
    page.click("#search-form button")
    page.wait_for_selector("#token-hits a")
    assert page.locator("#token-hits a").first.inner_text() == "feature 7"
    page.screenshot(path=str(artifacts_dir / "browser_search.png"), full_page=True)
    page.locator("#token-hits a").first.click()
    page.wait_for_url("**/feature/7")


def test_edit_label_and_find_it_after_reload(page, writable_server, artifacts_dir):
    server = "http://{}:{}".format(*writable_server)
    page.goto(server + "/db/tiny/feature/9")
    page.fill("#label-input", "fires on token nine")
    page.click("#label-save")
    page.wait_for_function("document.getElementById('label-status').textContent === 'saved'")
    page.reload()
    assert page.locator("#label-text").inner_text() == "fires on token nine"
    assert page.locator("#label-input").input_value() == "fires on token nine"
    page.screenshot(path=str(artifacts_dir / "browser_label.png"), full_page=True)
    page.goto(server + "/db/tiny/search?q=token+nine")
    assert page.locator("#text-hits a").first.inner_text() == "feature 9"


def test_steering_and_attention_views(page, server, artifacts_dir):
    page.goto(server + "/db/tiny/feature/2")
    max_act = json.loads(page.evaluate("fetch('/api/db/tiny/feature/2').then(r => r.text())"))["max_act"]
    page.fill("#steer-prompt", "1 2 3")
    page.fill("#steer-strength", "3")  # the form shows what the strength means in activation units
    assert abs(float(page.locator("#steer-scale").inner_text()) - 3 * max_act) < 0.01 * 3 * max_act
    page.fill("#steer-n", "3")
    page.click("#steer-form button")
    page.wait_for_selector("#steer-out .steer-row")
    assert page.locator("#steer-out .steer-row").count() == 2
    assert "add 3x max activation" in page.locator("#steer-out").inner_text()
    page.goto(server + "/attention")
    page.fill("#attn-prompt", "5 6 7 8 9")
    page.click("#attn-form button")
    page.wait_for_selector("#attn-chart .main-svg")
    assert page.locator("#attn-status").inner_text() == "5 tokens"
    page.screenshot(path=str(artifacts_dir / "browser_attention.png"), full_page=True)


def test_404_page_and_run_page(page, server, artifacts_dir):
    resp = page.goto(server + "/db/tiny/feature/12345")
    assert resp.status == 404
    assert "feature 12345 is not in database" in page.locator("#error").inner_text()
    page.goto(server + "/")
    page.click("text=train-tiny")
    # one view: training curves, formation curves (from formation/), the SAE's curves, the attribution
    for chart in ("#curves", "#formation-curves-0", "#sub-curves-0", "#attr-curves-0"):
        page.wait_for_selector(f"{chart} .main-svg")
    assert "0.2295" in page.locator("#sae-table").inner_text()
    assert "22,121" in page.locator("#results").inner_text()
    # formation on one step axis: loss, scores, LLC total and per head stacked, the window and step marked
    page.wait_for_selector("#timeline-chart .main-svg")
    chart = page.evaluate(
        "(() => { const g = document.getElementById('timeline-chart'); return {"
        " names: g.data.map(t => t.name), axes: [...new Set(g.data.map(t => t.yaxis))],"
        " shapes: g.layout.shapes.map(s => [s.type, s.x0, s.x1]) }; })()"
    )
    assert {"loss", "all", "L0H1"} <= set(chart["names"]) and len(chart["axes"]) == 4, chart
    assert ["rect", 50, 100] in chart["shapes"] and ["line", 50, 50] in chart["shapes"], chart
    assert "negotiate about output" in page.locator("#timeline-top").inner_text()
    # the LLC point whose chains did not mix (total, step 50: R-hat 1.052) hollow and crossed, its R-hat and ESS
    # in the hover; L0H1's first point (diagnostics unknown) plain
    llc = page.evaluate(
        "(() => { const g = document.getElementById('timeline-chart');"
        " const pick = n => g.data.find(t => t.name === n);"
        " return ['all', 'L0H1'].map(n => ({ symbol: pick(n).marker.symbol, text: pick(n).text })); })()"
    )
    assert llc[0]["symbol"] == ["circle", "circle-x-open", "circle"], llc
    assert llc[0]["text"][1] == "R-hat 1.052 \u2265 1.01: NOT mixed<br>ESS bulk 41 / tail 66", llc
    assert llc[0]["text"][0].startswith("R-hat 1.004 (mixed)"), llc
    assert llc[1]["symbol"] == ["circle"] * 3 and llc[1]["text"][0].startswith("R-hat n/a<br>"), llc
    page.locator("#timeline-chart").scroll_into_view_if_needed()
    hollow = page.locator("#timeline-chart .scatterlayer .trace .points path").count()
    assert hollow >= 6, hollow  # every LLC point drawn
    assert "1 not mixed" in page.locator("#timeline").inner_text()
    page.screenshot(path=str(artifacts_dir / "browser_run.png"), full_page=True)


def _page_works_after_hostile_tokens(page, *, live: bool) -> None:
    """The page's scripts ran to the end: charts drawn from the embedded JSON, the DOM after the tokens
    intact, the token strings shown as text."""
    page.wait_for_selector("#hist-chart .main-svg")
    page.wait_for_selector("#logit-chart .main-svg")
    labels = page.locator("#logit-chart .ytick text").all_text_contents()
    assert labels and all(t.startswith("<!--<script>") for t in labels), labels
    assert any("&amp;<b>" in t for t in labels), labels  # shown as text, not read as Plotly markup
    data = json.loads(page.locator("#feature-data").text_content())
    names = [p[0] for side in ("pos", "neg") for p in data["logits"][side]]
    assert all(n.startswith("<!--<script>") for n in names) and any("</script>" in n for n in names)
    assert page.locator("#cooc").count() == 1 and page.locator("#feature-data").count() == 1
    assert page.evaluate("document.querySelectorAll('script:not([src])').length") >= 2
    assert page.evaluate("typeof window.interplab.featurePage") == "function"
    text = page.locator("#top-contexts").inner_text()
    assert any(t in text for t in HOSTILE_TOKENS)
    if live:
        assert page.locator("#steer-form").count() == 1


def test_hostile_tokens_do_not_break_the_feature_page(browser, hostile_db, web_setup, artifacts_dir):
    from interplab.web.app import create_app

    app = create_app([hostile_db], model=web_setup["model"], sae=web_setup["sae"])
    with live_server(app) as (host, port):
        ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: errors.append("a dialog opened: " + d.message))
        page.goto(f"http://{host}:{port}/db/hostile/feature/3")
        _page_works_after_hostile_tokens(page, live=True)
        assert page.locator("#label-text").inner_text() == "<!--<script>alert(1)</script> & </script>"
        page.fill("#label-input", "still <!-- works")  # labels and steering after the tokens still work
        page.click("#label-save")
        page.wait_for_function("document.getElementById('label-status').textContent === 'saved'")
        page.fill("#steer-prompt", "1 2 3")
        page.fill("#steer-n", "2")
        page.click("#steer-form button")
        page.wait_for_selector("#steer-out .steer-row")
        page.screenshot(path=str(artifacts_dir / "browser_hostile_tokens.png"), full_page=True)
        ctx.close()
    assert not errors, errors


def test_hostile_tokens_do_not_break_the_static_export(browser, hostile_db, tmp_path):
    from interplab.web.export import export_html

    export_html(hostile_db, tmp_path / "site")
    ctx = browser.new_context()
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((tmp_path / "site" / "feature" / "3.html").as_uri())
    _page_works_after_hostile_tokens(page, live=False)
    ctx.close()
    assert not errors, errors


def test_a_rebound_name_and_another_origin_get_nothing(browser, server_addr, web_setup):
    """DNS rebinding (evil.test resolves to 127.0.0.1) and a cross-origin page posting a label."""
    host, port = server_addr
    ctx = browser.new_context()
    page = ctx.new_page()
    resp = page.goto(f"http://evil.test:{port}/db/tiny/feature/1")
    assert resp.status == 421 and "not served" in page.content()
    status = page.evaluate(  # the rebound page's own-origin requests: refused too
        """fetch('/api/db/tiny/feature/1/label', {method: 'POST', headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({explanation: 'pwned'})}).then(r => r.status)"""
    )
    assert status == 421
    before = page.evaluate(
        f"fetch('http://127.0.0.1:{port}/api/db/tiny/feature/1', {{mode: 'no-cors'}}).then(() => 1)"
    )
    assert before == 1  # reachable, but a cross-origin page cannot read it (no CORS headers) ...
    page.evaluate(  # ... and cannot write: a simple cross-origin POST, sent by the browser with Origin
        f"""fetch('http://127.0.0.1:{port}/api/db/tiny/feature/1/label', {{method: 'POST', mode: 'no-cors',
            headers: {{'Content-Type': 'text/plain'}}, body: JSON.stringify({{explanation: 'pwned'}})}})
            .catch(() => 0)"""
    )
    ctx.close()
    from interplab.features.reader import FeatureReader

    label = FeatureReader(web_setup["db"]).feature(1)["label"]
    assert label is None or label["explanation"] != "pwned"


@pytest.fixture(scope="module")
def scrub_server(tmp_path_factory, web_setup):
    from interplab.web.app import create_app
    from tests.web.conftest import write_scrub_run

    root = tmp_path_factory.mktemp("scrub-browser") / "runs"
    write_scrub_run(root / "scrub")
    with live_server(create_app([web_setup["db"]], runs=[root])) as (host, port):
        yield f"http://{host}:{port}", root / "scrub"


def test_scrub_reports_from_the_run_page_and_from_the_file_system(
    page, browser, scrub_server, web_setup, artifacts_dir
):
    """The run page lists both hypotheses with their sampled inputs; each report opens from it (sandboxed,
    its chart drawn by the app's plotly.js) and from the file system (the run's one shared plotly.min.js)."""
    server, run = scrub_server
    page.goto(server + "/run/0")
    assert page.locator("#scrub-table tr").count() == 3
    assert page.locator("details.scrub").count() == 2 and page.locator("tr.sample-line").count() == 20
    page.screenshot(path=str(artifacts_dir / "browser_scrub_run.png"), full_page=True)
    page.click("#scrub-table a.report-link >> nth=1")
    page.wait_for_selector(".js-plotly-plot .main-svg")
    assert "alert(1)" in page.title()  # the hostile name is the title's text, not a script
    assert page.locator("table.samples tr[data-row]").count() == 10
    # the sandbox: the page's origin is opaque, and it may not send the app anything (a label here)
    assert page.evaluate("window.origin") == "null"
    sent = page.evaluate(
        """fetch('/api/db/tiny/feature/2/label', {method: 'POST', headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({explanation: 'from a report'})}).then(r => r.status, () => 'blocked')"""
    )
    assert sent in ("blocked", 403)
    page.screenshot(path=str(artifacts_dir / "browser_scrub_report.png"), full_page=True)
    ctx = browser.new_context()  # offline, from the disk: file:// pages load ../plotly.min.js beside them
    disk = ctx.new_page()
    errors: list[str] = []
    disk.on("pageerror", lambda e: errors.append(str(e)))
    reports = sorted(run.glob("*/report.html"))
    assert len(reports) == 2
    for report in reports:
        disk.goto(report.as_uri())
        disk.wait_for_selector(".js-plotly-plot .main-svg")
    ctx.close()
    assert not errors, errors
    from interplab.features.reader import FeatureReader

    label = FeatureReader(web_setup["db"]).feature(2)["label"]
    assert label is None or label["explanation"] != "from a report"
