"""A decision transformer's feature database and SAE run in the web app (`interplab.web.dt_page`): the feature
page draws each top activation's state as a grid (the right episode and step, its action and return-to-go),
the trajectory player shows per-step probe predictions and SAE features, and bad input (a language model's
database, a missing trajectory folder, steering a DT database) gives a clear message, the page still renders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from interplab import runs
from interplab.features.reader import FeatureReader
from interplab.plots import png_bytes as png
from interplab.rl.envs import ACTION_NAMES
from interplab.rl.features import (
    build_dt_feature_db,
    dt_activations,
    encode_rows,
    step_features,
    train_dt_sae,
)
from interplab.rl.model import DecisionTransformer, DTConfig, save_dt
from interplab.runs import Kind
from interplab.web.app import create_app
from interplab.web.dt_page import FRAME_TILE
from interplab.web.views import format_number
from tests.web.test_dt_pages import ENV, _decode_png, _index, _trajectories


def _grid(obs) -> np.ndarray:
    from interplab.rl import render_obs
    from interplab.rl.analysis import palette_obs

    try:
        return np.asarray(render_obs(obs, tile_size=FRAME_TILE), dtype=np.uint8)
    except ImportError:
        return np.asarray(palette_obs(obs, tile_size=FRAME_TILE), dtype=np.uint8)


def _varied_trajectories():
    """`_trajectories` with every step's view made different (a wall cell moved along), so pictures differ."""
    t = _trajectories()
    obs = t.obs.clone()
    for i in range(obs.shape[0]):
        obs[i, i % 7, 1 + i // 7, 0] = 2
    return type(t)(**{**t.__dict__, "obs": obs})


def _write_dt_runs(root):
    """data/, model/, sae/ (an SAE run of `dt sae`: features.db, player.json) and analysis/ (with per-step probe
    predictions) for one random DT on the hand-made episodes."""
    trajs = _varied_trajectories()
    trajs.save(root / "data")
    torch.manual_seed(0)
    model = DecisionTransformer(
        DTConfig(env=ENV, context=3, max_timestep=50, d_model=16, n_layers=1, n_heads=2)
    )
    save_dt(model, root / "model")
    acts = dt_activations(model, trajs, loss_grad=True)
    record = {"model": str((root / "model").resolve()), "trajectories": str((root / "data").resolve()),
              "env": ENV, "site": acts.site, "kinds": ["state"], "episodes": 3, "rows": acts.n_rows}  # fmt: skip
    result = train_dt_sae(
        acts, d_sae=8, k=2, steps=20, batch_size=4, run_dir=root / "sae", data={"dt": record}
    )
    sae = result.saes["sae"]
    build_dt_feature_db(root / "sae" / runs.FEATURE_DB, model, sae, acts, trajs, data_path=root / "data")
    steps = step_features(encode_rows(sae, acts.x), acts, range(3))
    runs.write_json(root / "sae" / "player.json", Kind.DT_FEATURES, {"db": runs.FEATURE_DB, "steps": steps})
    labels = [{"label": "key_in_view", "feature": 3, "auroc": 0.75, "positives": 0.5, "density": 0.25}]
    runs.write_json(
        root / "sae" / runs.REPORT, Kind.DT_FEATURES, {**record, "fvu": 0.1, "l0": 2.0, "labels": labels}
    )
    probe_steps = {
        "labels": {"direction": {"site": "blocks.0.hook_resid_post", "classes": ["east", "south", "west", "north"],
                                 "held_out_accuracy": 0.9}},
        "episodes": {"2": {"direction": [[0, 0.9, 0], [1, 0.6, 0], [3, 0.8, 3], [2, 0.99, 2]]}},
    }  # fmt: skip
    runs.write_json(
        root / "analysis" / runs.REPORT,
        Kind.DT_ANALYSIS,
        {"model": str(root / "model"), "data": str((root / "data").resolve()), "probe_steps": probe_steps},
    )
    return trajs, acts, sae, steps


@pytest.fixture(scope="module")
def dt_feature_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtfeatures") / "runs"
    trajs, acts, sae, steps = _write_dt_runs(root)
    return root, trajs, acts, steps


@pytest.fixture(scope="module")
def fclient(dt_feature_runs):
    root = dt_feature_runs[0]
    return TestClient(create_app([root / "sae" / runs.FEATURE_DB], runs=[root]), base_url="http://127.0.0.1")


def _cards(page: str) -> list[tuple[int, int, str]]:
    out = []
    for part in page.split('<figure class="dt-card"')[1:]:
        e = int(part.split('data-episode="')[1].split('"')[0])
        s = int(part.split('data-step="')[1].split('"')[0])
        src = part.split('src="')[1].split('"')[0] if "<img" in part.split("</figure>")[0] else ""
        out.append((e, s, src))
    return out


def _fired_feature(root) -> int:
    store = FeatureReader(root / "sae" / runs.FEATURE_DB)
    return next(f for f in range(8) if store.feature(f)["n_fires"] > 0)


def test_feature_page_draws_each_top_state_for_its_episode_and_step(fclient, dt_feature_runs):
    root, trajs, acts, _ = dt_feature_runs
    f = _fired_feature(root)
    rec = FeatureReader(root / "sae" / runs.FEATURE_DB).feature(f)
    r = fclient.get(f"/db/features/feature/{f}")
    assert r.status_code == 200 and 'id="dt-contexts"' in r.text
    assert "Steer the model" not in r.text  # no prompt to steer a DT with
    cards = _cards(r.text)
    starts = trajs.episode_starts.tolist()
    want = []
    for c in rec["top"]:  # state rows only: the row is the flat step
        flat = int(c["token_index"])
        e = max(i for i in range(3) if starts[i] <= flat)
        want.append((e, flat - starts[e], f"/db/features/dt/frame/{e}/{flat - starts[e]}.png"))
    assert cards == want and len(cards) == min(rec["n_fires"], 20)
    for e, s, src in cards:
        flat = starts[e] + s
        img = fclient.get(src)
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(_decode_png(img.content), _grid(trajs.obs[flat]))
        block = r.text.split(f'data-episode="{e}" data-step="{s}"')[1].split("</figure>")[0]
        assert f'class="dt-card-action">{ACTION_NAMES[int(trajs.actions[flat])]}</b>' in block
        assert f"RTG {format_number(float(trajs.rtg[flat]), 3)}" in block
    assert fclient.get("/db/features/dt/frame/0/3.png").status_code == 404  # episode 0 has 3 steps
    assert fclient.get("/db/features/dt/frame/9/0.png").status_code == 404


def test_player_shows_probe_predictions_and_sae_features_per_step(fclient, dt_feature_runs):
    root, trajs, acts, steps = dt_feature_runs
    index = {run: _index(fclient, run) for run in ("analysis", "sae")}
    for run in ("analysis", "sae"):  # each finds the other: same model, same data
        page = fclient.get(f"/run/{index[run]}").text
        data = json.loads(page.split('id="dt-data">')[1].split("</script>")[0])
        pl = data["player"]
        eps = pl["episodes"]
        assert pl["features_db"] == "features" and pl["features_run"].endswith("sae")
        for ep in eps:
            assert ep["features"] == steps[str(ep["episode"])]
        assert "probes" not in eps[0]
        assert eps[2]["probes"][0] == [["direction", "east", 0.9, "east"]]
        assert eps[2]["probes"][1] == [["direction", "south", 0.6, "east"]]
        assert eps[2]["probes"][3] == [["direction", "west", 0.99, "west"]]
        assert 'id="dt-probes"' in page and 'id="dt-features"' in page
    sae_page = fclient.get(f"/run/{index['sae']}").text
    assert 'id="dt-labels"' in sae_page and '<a href="/db/features/feature/3">3</a>' in sae_page


def test_steering_a_dt_database_is_refused(fclient):
    r = fclient.post(
        "/api/db/features/feature/0/steer", json={"prompt": "hi"}, headers={"origin": "http://127.0.0.1"}
    )
    assert r.status_code == 422 and "decision transformer's features" in r.json()["error"]


def test_a_missing_trajectory_folder_gives_a_note_and_the_page_still_renders(tmp_path):
    root = tmp_path / "runs"
    _write_dt_runs(root)
    shutil.rmtree(root / "data")
    client = TestClient(
        create_app([root / "sae" / runs.FEATURE_DB], runs=[root]), base_url="http://127.0.0.1"
    )
    f = _fired_feature(root)
    r = client.get(f"/db/features/feature/{f}")
    assert r.status_code == 200 and 'id="dt-no-pictures"' in r.text
    assert "is missing or lies outside the --runs folders" in r.text
    cards = _cards(r.text)
    assert cards and all(src == "" for _, _, src in cards)  # episode and step still shown, no pictures
    assert "action <b" in r.text and "RTG" in r.text
    assert client.get("/db/features/dt/frame/0/0.png").status_code == 404
    # served without --runs: the same (files are read only inside --runs folders)
    alone = TestClient(create_app([root / "sae" / runs.FEATURE_DB]), base_url="http://127.0.0.1")
    assert 'id="dt-no-pictures"' in alone.get(f"/db/features/feature/{f}").text
    sae_page = client.get(f"/run/{_index(client, 'sae')}").text  # without its data: no player, no error
    assert "no trajectories to play here" in sae_page


def test_a_language_model_database_gets_no_dt_parts(tmp_path):
    from interplab.features.build import build_feature_db
    from tests.features.planted import planted_sae, tiny_model

    lm = tiny_model()
    build_feature_db(tmp_path / "lm.db", lm, planted_sae(lm, 4), torch.randint(0, 40, (4, 16)))
    client = TestClient(create_app([tmp_path / "lm.db"]), base_url="http://127.0.0.1")
    page = client.get("/db/lm/feature/1").text
    assert 'id="dt-contexts"' not in page and "Steer the model" in page
    assert client.get("/db/lm/dt/frame/0/0.png").status_code == 404


def test_damaged_readouts_show_as_missing(tmp_path):
    root = tmp_path / "runs"
    _write_dt_runs(root)
    runs.write_json(
        root / "sae" / "player.json", Kind.DT_FEATURES, {"steps": {"0": "<b>", "1": [[["x", 1]]]}}
    )
    runs.write_json(
        root / "analysis" / runs.REPORT,
        Kind.DT_ANALYSIS,
        {"model": str(root / "model"), "data": str((root / "data").resolve()),
         "probe_steps": {"labels": {"direction": {"classes": ["east"]}}, "episodes": {"0": {"direction": [[5, 1, 0]] * 3}}}},
    )  # fmt: skip
    client = TestClient(create_app(runs=[root]), base_url="http://127.0.0.1")
    for i in range(4):
        assert client.get(f"/run/{i}").status_code == 200
    page = client.get(f"/run/{_index(client, 'analysis')}").text
    eps = json.loads(page.split('id="dt-data">')[1].split("</script>")[0])["player"]["episodes"]
    assert "features" not in eps[0] and "features" not in eps[1] and "probes" not in eps[0]
    assert png(np.zeros((2, 2, 3), dtype=np.uint8))[:4] == b"\x89PNG"
