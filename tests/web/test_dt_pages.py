"""The decision-transformer run pages: a trajectory data set, a training run, an evaluation (calibration
curve + the episodes it played) and an analysis (attention of the decision token) each get their section,
the player's frames are served as PNG pictures of the grid, and damaged or hostile files show as missing."""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from interplab import runs
from interplab.plots import png_bytes as png
from interplab.rl.trajectories import Trajectories
from interplab.runs import Kind
from interplab.web.app import create_app
from interplab.web.dt_page import calibration_points

ENV = "MiniGrid-Empty-5x5-v0"


def _trajectories() -> Trajectories:
    """Three hand-made episodes (lengths 3, 2, 4): a goal (object 8) in view, actions forward/left/right."""
    obs = torch.ones(9, 7, 7, 3, dtype=torch.uint8)
    obs[:, 3, 3, 0] = 8
    return Trajectories(
        env=ENV,
        obs=obs,
        actions=torch.tensor([2, 2, 2, 0, 2, 1, 1, 2, 2]),
        rewards=torch.tensor([0, 0, 0.9, 0, 0.5, 0, 0, 0, 0.3]),
        dones=torch.tensor([0, 0, 1, 0, 1, 0, 0, 0, 1], dtype=torch.bool),
        episode_starts=torch.tensor([0, 3, 5, 9]),
        seeds=torch.tensor([10, 11, 12]),
        source="hand-made",
    )


@pytest.fixture(scope="module")
def dt_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtweb") / "runs"
    _trajectories().save(root / "data")
    train = root / "train"
    runs.write_json(train / runs.CONFIG, Kind.DT_TRAIN, {"model": {"env": ENV}, "train": {"steps": 10}})
    (train / runs.LOG).write_text(
        "".join(json.dumps({"step": s, "loss": 2.0 - s / 10}) + "\n" for s in range(5))
    )
    runs.write_json(
        train / runs.FINAL / runs.CONFIG, Kind.DT_MODEL, {"env": ENV, "d_model": 16, "n_layers": 1}
    )
    (train / runs.FINAL / runs.MODEL_WEIGHTS).write_bytes(b"")
    ev = root / "eval"
    _trajectories().save(ev / runs.ROLLOUTS)
    runs.write_json(
        ev / runs.CALIBRATION_JSON,
        Kind.DT_EVAL,
        {
            "env": ENV,
            "max_return": 1.0,
            "data_range": [0.3, 0.9],
            "targets": [0.0, 0.5, 1.0],
            "counts": [1, 1, 1],
            "mean_returns": [0.9, 0.5, 0.3],
            "ci_low": [None, 0.4, 0.25],
            "ci_high": [None, 0.6, 0.35],
            "slope": {
                "estimate": -0.6,
                "ci_low": -0.9,
                "ci_high": -0.3,
                "stderr": 0.1,
                "intercept": 0.9,
                "n": 3,
            },
            "episodes": {
                "target": [0.0, 0.5, 1.0],
                "return": [0.9, 0.5, 0.3],
                "length": [3, 2, 4],
                "seed": [0, 1, 2],
            },
        },
    )
    an = root / "analysis"
    attention = {"site": "blocks.0.attn.hook_pattern", "tokens": ["R-1", "s-1", "a-1", "R0", "s0", "a0"],
                 "episodes": {"1": [[0, 0, 0, 0.25, 0.75, 0], [0.1, 0.2, 0.3, 0.1, 0.3, 0]]}}  # fmt: skip
    runs.write_json(
        an / runs.REPORT, Kind.DT_ANALYSIS, {"probe_best": 0.97, "data": "../data", "attention": attention}
    )
    bad = root / "bad-eval"  # a calibration of the wrong shape: shown as missing, never an error
    runs.write_json(bad / runs.CALIBRATION_JSON, Kind.DT_EVAL, {"targets": "x", "mean_returns": [1, "<b>"]})
    return root


@pytest.fixture(scope="module")
def client(dt_runs):
    return TestClient(create_app(runs=[dt_runs]), base_url="http://127.0.0.1")


def _index(client, name: str) -> int:
    home = client.get("/").text
    links = home.split('class="run-link" href="/run/')[1:]
    for part in links:
        i, rest = part.split('"', 1)
        if rest.split("</a>")[0].endswith("/" + name):
            return int(i)
    raise AssertionError(f"{name} is not listed: {home}")


def test_home_lists_every_dt_run(client):
    for name in ("data", "train", "eval", "analysis", "bad-eval"):
        _index(client, name)
    home = client.get("/").text
    assert (
        home.count('class="run-link"') == 5
    )  # the train run's final/ and the eval's episodes belong to them


def test_evaluation_page_draws_the_calibration_and_plays_its_episodes(client):
    i = _index(client, "eval")
    page = client.get(f"/run/{i}").text
    assert 'id="dt-calibration"' in page and "interplab.dtPage()" in page
    table = page.split('id="dt-calibration-table"')[1].split("</table>")[0]
    assert table.count("<tr>") == 4 and "<td>0.4 to 0.6</td>" in table and "<b>0.9</b>" in table
    assert "<td>0.25 to 0.35</td>" in table and table.count("–") == 1  # one episode: no interval
    assert "slope of achieved on target return <b>-0.6</b>" in page and "[95% CI -0.9, -0.3]" in page
    assert "training data returns 0.3 to 0.9" in page
    data = json.loads(page.split('<script type="application/json" id="dt-data">')[1].split("</script>")[0])
    assert data["index"] == i
    assert [p["target"] for p in data["calibration"]["points"]] == [0.0, 0.5, 1.0]
    eps = data["player"]["episodes"]
    assert [e["length"] for e in eps] == [3, 2, 4] and [e["target"] for e in eps] == [0.0, 0.5, 1.0]
    assert eps[0]["actions"] == ["forward", "forward", "forward"] and eps[2]["actions"][0] == "right"
    torch.testing.assert_close(eps[0]["rtg"], [0.9, 0.9, 0.9])
    torch.testing.assert_close(eps[2]["rewards"], [0.0, 0.0, 0.0, 0.3], atol=1e-6, rtol=0)
    assert [e["seed"] for e in eps] == [10, 11, 12]


def _decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_png_round_trips():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode_png(png(rgb)), rgb)
    with pytest.raises(ValueError, match="uint8 \\[H, W, 3\\]"):
        png(rgb.astype(np.float32))


def test_player_frames_are_the_rendered_grid(client):
    pytest.importorskip("minigrid")
    from interplab.rl import render_obs
    from interplab.web.dt_page import FRAME_TILE

    i = _index(client, "eval")
    r = client.get(f"/run/{i}/dt/frame/2/3.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    expected = render_obs(_trajectories().obs[8], tile_size=FRAME_TILE)
    np.testing.assert_array_equal(_decode_png(r.content), expected)
    assert client.get(f"/run/{i}/dt/frame/2/4.png").status_code == 404  # episode 2 has 4 steps
    assert client.get(f"/run/{i}/dt/frame/3/0.png").status_code == 404
    assert client.get(f"/run/{_index(client, 'train')}/dt/frame/0/0.png").status_code == 404


def test_analysis_page_shows_the_decision_tokens_attention(client):
    page = client.get(f"/run/{_index(client, 'analysis')}").text
    assert 'id="dt-analysis"' in page and "0.97" in page
    data = json.loads(page.split('id="dt-data">')[1].split("</script>")[0])
    pl = data["player"]
    assert pl["attention_tokens"][-2] == "s0" and pl["attention_site"] == "blocks.0.attn.hook_pattern"
    eps = pl["episodes"]
    assert "attention" not in eps[0] and eps[1]["attention"][0] == [0, 0, 0, 0.25, 0.75, 0]


def test_training_and_data_pages(client):
    page = client.get(f"/run/{_index(client, 'train')}").text
    assert 'id="dt-model"' in page and "d model" in page and 'id="formation"' not in page
    assert "interplab dt eval" in page and 'id="curves"' in page
    page = client.get(f"/run/{_index(client, 'data')}").text
    assert "hand-made" in page and 'id="dt-player"' in page


def test_a_damaged_calibration_shows_as_missing(client):
    r = client.get(f"/run/{_index(client, 'bad-eval')}")
    assert r.status_code == 200
    assert "no calibration points in calibration.json" in r.text and "no trajectories to play here" in r.text
    assert calibration_points({"targets": [0.5, math.nan, 1], "mean_returns": [0.2, 0.1], "counts": 3}) == []
    assert calibration_points({"targets": [0.5, 1], "mean_returns": [0.2, None]}) == [
        {"target": 0.5, "episodes": None, "mean": 0.2, "ci_low": None, "ci_high": None}
    ]


def test_a_player_folder_outside_the_runs_is_not_read(tmp_path):
    root = tmp_path / "runs"
    _trajectories().save(tmp_path / "outside")
    an = root / "analysis"
    runs.write_json(an / runs.REPORT, Kind.DT_ANALYSIS, {"data": str(tmp_path / "outside")})
    client = TestClient(create_app(runs=[root]), base_url="http://127.0.0.1")
    page = client.get("/run/0").text
    assert "no trajectories to play here" in page
    assert client.get("/run/0/dt/frame/0/0.png").status_code == 404
