"""Feature pages of a crosscoder's latents: a planted crosscoder on two tiny models, where latent 0 reads a
direction that only model B writes (at token 5), latent 1 token 7 in both models and latent 2 token 9 in model A
only. The database's statistics equal a direct computation, each latent's side label is what was planted
(B-only, shared, A-only), and the feature page says so."""

from __future__ import annotations

import copy

import pytest
import torch

from interplab.features import FeatureBuildConfig
from interplab.features.crosscoder_db import build_crosscoder_db, crosscoder_acts, side_labels
from interplab.features.reader import FeatureReader
from interplab.sae.crosscoder import Crosscoder, CrosscoderConfig
from tests.features.planted import tiny_model
from tests.web.conftest import artifacts_dir  # noqa: F401  (fixture)
from tests.web.test_browser import browser, page  # noqa: F401  (fixtures)

SITE = "blocks.0.hook_resid_pre"  # = W_E[token] under rotary positions


def _threshold(proj: torch.Tensor, own: int) -> torch.Tensor:
    """Halfway between token ``own``'s projection and the largest other token's."""
    other = torch.cat([proj[:own], proj[own + 1 :]]).max()
    assert proj[own] > other
    return (proj[own] + other) / 2


def planted_pair():
    """(model A, model B, crosscoder): B is A with 3 v added to token 5's embedding."""
    a = tiny_model()
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(7)
    v = torch.randn(32, generator=g)
    v = v / v.norm()
    with torch.no_grad():
        b.W_E[5] += 3 * v
    cc = Crosscoder(CrosscoderConfig(d_in=32, d_sae=3, k=1, sources=(f"a:{SITE}", f"b:{SITE}")))
    ea, eb = a.W_E.detach(), b.W_E.detach()
    d7, d9 = ea[7] / ea[7].norm(), ea[9] / ea[9].norm()
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_dec.zero_()
        cc.b_dec.zero_()
        cc.W_enc[1, :, 0] = v  # latent 0: v, which only model B has (at token 5)
        cc.b_enc[0] = -_threshold(eb @ v, 5)
        cc.W_dec[0, 1] = 3 * v
        cc.W_enc[0, :, 1] = d7  # latent 1: token 7 (read from A), written into both
        cc.b_enc[1] = -_threshold(ea @ d7, 7)
        cc.W_dec[1, 0], cc.W_dec[1, 1] = ea[7], eb[7]
        cc.W_enc[0, :, 2] = d9  # latent 2: token 9 of model A only
        cc.b_enc[2] = -_threshold(ea @ d9, 9)
        cc.W_dec[2, 0] = ea[9]
    return a, b, cc


@pytest.fixture(scope="module")
def crosscoder_db(tmp_path_factory):
    a, b, cc = planted_pair()
    tokens = torch.randint(0, 40, (24, 16), generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("cc") / "features.db"
    cfg = FeatureBuildConfig(top_k=6, n_samples=4, window_left=3, window_right=1, batch_size=8)
    build_crosscoder_db(path, [a, b], cc, tokens, cfg, side_names=["step 100", "step 1000"])
    return path, [a, b], cc, tokens


def test_planted_sides_and_statistics(crosscoder_db):
    path, models, cc, tokens = crosscoder_db
    assert side_labels(cc) == ["B-only", "shared", "A-only"]
    acts = crosscoder_acts(models, cc, tokens)
    for latent, token in enumerate((5, 7, 9)):  # each fires exactly on its token
        torch.testing.assert_close(acts[..., latent] > 0, tokens == token)
    with FeatureReader(path) as r:
        meta = r.meta()["crosscoder"]
        assert meta["labels"] == ["B-only", "shared", "A-only"]
        torch.testing.assert_close(torch.tensor(meta["shares"][0]), torch.tensor([0.0, 1.0]))
        assert meta["shares"][1][0] == pytest.approx(0.5, abs=0.05)
        for latent, token in enumerate((5, 7, 9)):
            rec = r.feature(latent)
            assert rec["n_fires"] == int((tokens == token).sum())
            assert rec["max_act"] == pytest.approx(float(acts[..., latent].max()), abs=1e-5)
            assert {c["tokens"][3] for c in rec["top"]} == {token}  # the window centre (window_left=3)


def test_feature_page_says_b_only(crosscoder_db):
    from fastapi.testclient import TestClient

    from interplab.web.app import create_app

    path = crosscoder_db[0]
    client = TestClient(create_app([path]), base_url="http://127.0.0.1")
    resp = client.get("/db/features/feature/0")
    assert resp.status_code == 200
    html = resp.text
    assert '<b id="crosscoder-label">B-only</b>' in html
    assert "step 1000" in html and 'id="steer"' not in html
    assert '<b id="crosscoder-label">A-only</b>' in client.get("/db/features/feature/2").text
    assert '<b id="crosscoder-label">shared</b>' in client.get("/db/features/feature/1").text


def _diff_run(root, db):
    """A training run folder whose diffs/ holds the planted crosscoder's diff and its feature database."""
    import shutil

    from interplab.sae.diffing import DiffResult

    cc = planted_pair()[2]
    from tests.web.conftest import write_training_run

    run = root / "runs" / "train"
    write_training_run(run, tiny_model(), n_checkpoints=1)
    folder = run / "diffs" / "step_000100-step_001000"
    folder.mkdir(parents=True)
    DiffResult.from_crosscoder(cc).save(folder)
    shutil.copy(db, folder / "features.db")
    return run, folder / "features.db"


def test_run_page_links_the_diff_to_its_latent_pages(crosscoder_db, tmp_path):
    from fastapi.testclient import TestClient

    from interplab.web.app import create_app

    run, db = _diff_run(tmp_path, crosscoder_db[0])
    served = TestClient(create_app([db], runs=[run.parent]), base_url="http://127.0.0.1")
    home = served.get("/").text
    index = home.split('class="run-link" href="/run/')[1].split('"')[0]
    run_html = served.get(f"/run/{index}").text
    assert 'class="latent-page" href="/db/features/feature/0"' in run_html  # latent 0 (B-only) leans new
    assert 'href="/db/features/"' in run_html
    unserved = TestClient(create_app(runs=[run.parent]), base_url="http://127.0.0.1").get(f"/run/{index}")
    assert "latent-page" not in unserved.text and "with <code>--db</code>" in unserved.text


@pytest.mark.browser
def test_latent_page_in_chromium(crosscoder_db, tmp_path, artifacts_dir, page):  # noqa: F811
    """From the run page's diff to the B-only latent's page, in real headless Chromium."""
    from interplab.web.app import create_app
    from tests.web.conftest import live_server

    run, db = _diff_run(tmp_path, crosscoder_db[0])
    with live_server(create_app([db], runs=[run.parent])) as (host, port):
        page.goto(f"http://{host}:{port}/")
        page.locator("a.run-link", has_text="train").first.click()
        page.click("a.latent-page >> text='0'")
        page.wait_for_url("**/feature/0")
        assert page.locator("#crosscoder-label").inner_text() == "B-only"
        shares = page.locator("#crosscoder-sides .share").all_inner_texts()
        assert [float(s) for s in shares] == [0.0, 1.0]
        assert page.locator("#top-contexts .ctx").count() == 6
        page.screenshot(path=str(artifacts_dir / "browser_crosscoder_latent.png"), full_page=True)
