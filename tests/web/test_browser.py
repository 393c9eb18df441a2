"""The feature explorer in real headless Chromium (Debian's chromium, driven by Playwright).

Skipped with a clear message when chromium or playwright is missing (scripts/test.sh installs chromium where
it may: scripts/browser-deps.sh).
Screenshots go to test-artifacts/."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(web_app):
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(web_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("the test server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


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
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
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


def test_edit_label_and_find_it_after_reload(page, server, artifacts_dir):
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
    page.fill("#steer-prompt", "1 2 3")
    page.fill("#steer-value", "0")
    page.fill("#steer-n", "3")
    page.click("#steer-form button")
    page.wait_for_selector("#steer-out .steer-row")
    assert page.locator("#steer-out .steer-row").count() == 2
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
    page.wait_for_selector("#curves .main-svg")
    page.wait_for_selector("#report-curves .main-svg")
    page.screenshot(path=str(artifacts_dir / "browser_run.png"), full_page=True)
