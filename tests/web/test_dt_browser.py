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


@pytest.fixture(scope="module")
def feature_server(tmp_path_factory):
    from interplab import runs as run_names
    from interplab.web.app import create_app
    from tests.web.test_dt_features import _write_dt_runs

    root = tmp_path_factory.mktemp("dtfeatures-browser") / "runs"
    _, _, _, steps = _write_dt_runs(root)
    with live_server(create_app([root / "sae" / run_names.FEATURE_DB], runs=[root])) as (host, port):
        yield f"http://{host}:{port}", root, steps


def test_feature_page_draws_the_top_states(page, feature_server, artifacts_dir):  # noqa: F811
    from interplab.features.reader import FeatureReader
    from tests.web.test_dt_features import _fired_feature

    server, root, _ = feature_server
    f = _fired_feature(root)
    n = min(FeatureReader(root / "sae" / "features.db").feature(f)["n_fires"], 20)
    page.goto(f"{server}/db/features/feature/{f}")
    page.wait_for_selector("#dt-contexts")
    assert page.locator("#dt-contexts .dt-card img").count() == n
    page.wait_for_function(
        "[...document.querySelectorAll('#dt-contexts .dt-card img')].every(i => i.complete && i.naturalWidth === 84)"
    )
    assert page.locator("#steer").count() == 0
    page.screenshot(path=str(artifacts_dir / "browser_dt_feature.png"), full_page=True)


def test_player_read_outs_follow_the_step(page, feature_server, artifacts_dir):  # noqa: F811
    server, _, steps = feature_server
    _open(page, server, "sae")
    page.select_option("#dt-episode", "2")
    page.locator("#dt-step").fill("1")
    want = steps["2"][1]
    assert page.locator("#dt-features a.dt-feature").count() == len(want)
    if want:
        first = page.locator("#dt-features a.dt-feature").first
        assert first.inner_text() == f"{want[0][0]} ({want[0][1]:.2f})"
        assert first.get_attribute("href") == f"/db/features/feature/{want[0][0]}"
    assert page.locator("#dt-probes").is_visible()
    row = page.locator("#dt-probes tbody tr")
    assert row.count() == 1 and row.first.inner_text().split() == ["direction", "south", "0.60", "east"]
    assert row.first.get_attribute("class") == "wrong"
    page.locator("#dt-step").fill("2")
    assert page.locator("#dt-probes tbody tr").first.inner_text().split() == [
        "direction",
        "north",
        "0.80",
        "north",
    ]
    page.select_option("#dt-episode", "0")  # no probe predictions recorded for episode 0: the table hides
    assert not page.locator("#dt-probes").is_visible()
    page.screenshot(path=str(artifacts_dir / "browser_dt_player_readouts.png"), full_page=True)
