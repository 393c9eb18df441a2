"""The decision-transformer run pages in real headless Chromium: the calibration curve is drawn, and the
trajectory player's slider and episode choice move the grid picture, the action shown and the attention bars."""

from __future__ import annotations

import pytest

from tests.web.conftest import live_server
from tests.web.test_browser import browser, page  # noqa: F401  (fixtures)
from tests.web.test_dt_pages import _trajectories, dt_runs  # noqa: F401  (fixture)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def dt_server(dt_runs):  # noqa: F811
    from interplab.web.app import create_app

    with live_server(create_app(runs=[dt_runs])) as (host, port):
        yield f"http://{host}:{port}"


def _open(page, server: str, name: str) -> None:  # noqa: F811
    page.goto(server + "/")
    page.click(f"a.run-link >> text='runs/{name}'")
    page.wait_for_selector("#dt")
    page.wait_for_load_state("load")


def test_calibration_curve_and_player(page, dt_server, artifacts_dir):  # noqa: F811
    pytest.importorskip("minigrid")
    _open(page, dt_server, "eval")
    page.wait_for_selector("#dt-calibration .main-svg")
    assert page.locator("#dt-calibration .scatterlayer .trace").count() == 2  # y = x and the points
    assert page.locator("#dt-action").inner_text() == "forward"
    page.wait_for_function("document.getElementById('dt-frame').naturalWidth > 0")
    assert page.locator("#dt-step-label").inner_text() == "0 / 2"
    page.select_option("#dt-episode", "2")
    assert page.locator("#dt-step-label").inner_text() == "0 / 3"
    assert page.locator("#dt-action").inner_text() == "right"
    page.locator("#dt-step").fill("3")
    assert page.locator("#dt-action").inner_text() == "forward"
    assert page.locator("#dt-reward").inner_text() == "0.300"
    assert page.get_attribute("#dt-frame", "src").endswith("/dt/frame/2/3.png")
    page.wait_for_function("document.getElementById('dt-frame').naturalWidth === 84")  # 7 cells x 12 px
    page.screenshot(path=str(artifacts_dir / "browser_dt_eval.png"), full_page=True)


def test_attention_of_the_decision_token(page, dt_server):  # noqa: F811
    _open(page, dt_server, "analysis")
    assert "no attention recorded" in page.locator("#dt-attention-note").inner_text()
    page.select_option("#dt-episode", "1")
    page.wait_for_selector("#dt-attention .main-svg")
    assert page.locator("#dt-attention .bars .point").count() == 6
    assert "decision (state) token" in page.locator("#dt-attention-note").inner_text()
