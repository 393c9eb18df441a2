"""A feature database split by SAE (or layer) into several databases, on either backend, served by one app:
each under its own name (its file's stem, a URL's database name), so equal feature indices never collide, and
one search over all of them; the CLI takes URLs wherever it takes a database."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from interplab.cli.main import app as cli
from interplab.features import FeatureBuildConfig
from interplab.features.build import build_feature_db
from interplab.features.reader import FeatureReader
from interplab.features.writer import FeatureWriter
from interplab.web.app import create_app
from tests.features.planted import planted_sae, tiny_model

CFG = FeatureBuildConfig(top_k=4, n_samples=4, window_left=3, window_right=1, batch_size=8)


def test_one_app_serves_databases_split_by_sae_on_both_backends(tmp_path, postgres_server):
    model = tiny_model()
    tokens = torch.randint(0, 40, (16, 16), generator=torch.Generator().manual_seed(2))
    first = tmp_path / "layer0.db"
    second = postgres_server.new_db(name="layer1")
    build_feature_db(first, model, planted_sae(model, 6), tokens, CFG)
    shifted, big = planted_sae(model, 6), planted_sae(model, 16)
    with torch.no_grad():  # feature j of the second SAE fires on token j + 10
        shifted.W_enc.copy_(big.W_enc[:, 10:])
        shifted.b_enc.copy_(big.b_enc[10:])
    build_feature_db(second, model, shifted, tokens, CFG)
    FeatureWriter(first).set_label(3, "token three of layer 0")
    FeatureWriter(second).set_label(3, "token thirteen of layer 1")
    client = TestClient(create_app([first, second]), base_url="http://127.0.0.1")
    home = client.get("/").text
    assert 'href="/db/layer0/"' in home and 'href="/db/layer1/"' in home and 'id="search-all"' in home
    a, b = client.get("/api/db/layer0/feature/3").json(), client.get("/api/db/layer1/feature/3").json()
    assert a["top_token"] == 3 and b["top_token"] == 13  # the same index, two features
    assert a["label"]["explanation"] == "token three of layer 0"
    assert b["label"]["explanation"] == "token thirteen of layer 1"
    page = client.get("/search", params={"q": "token"}).text
    assert 'href="/db/layer0/feature/3">layer0/3<' in page and 'href="/db/layer1/feature/3">layer1/3<' in page
    page = client.get("/search", params={"q": "thirteen"}).text
    assert "layer1/3" in page and "layer0/3" not in page
    assert client.post("/api/db/layer1/feature/4/label", json={"explanation": "edited"}).status_code == 200
    assert (
        FeatureReader(second).labels()[4]["explanation"] == "edited"
        and 4 not in FeatureReader(first).labels()
    )
    assert "nothing matches" in client.get("/search", params={"q": "zzz"}).text


def test_the_cli_builds_copies_and_serves_by_url(tmp_path, postgres_server, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    model = tiny_model()
    model.save(tmp_path / "model")
    planted_sae(model, 4).save(tmp_path / "sae")
    tokens = torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(1))
    save_file({"tokens": tokens}, str(tmp_path / "tokens.safetensors"))
    url = postgres_server.new_db()
    runner = CliRunner()
    args = ["features", "build", "--model", "model", "--sae", "sae", "--tokens", "tokens.safetensors"]
    r = runner.invoke(cli, [*args, "--db", url, "--top-k", "3"])
    assert r.exit_code == 0, r.output
    assert f"serve --db {url}" in r.output.replace("\n", "")
    assert FeatureReader(url).n_features() == 4
    r = runner.invoke(cli, ["features", "copy", url, "copy.db"])
    assert r.exit_code == 0 and "copied 4 features" in r.output, r.output
    assert FeatureReader(tmp_path / "copy.db").dump() == FeatureReader(url).dump()
    r = runner.invoke(cli, ["features", "copy", "copy.db", url])  # a target that holds one already
    assert r.exit_code != 0 and "already holds a feature database" in r.output and "--overwrite" in r.output
    host = postgres_server.url.split("@", 1)[1].rsplit("/", 1)[0]
    r = runner.invoke(cli, ["serve", "--db", f"postgresql://postgres:hunter2@{host}/missing"])
    assert r.exit_code != 0 and "cannot open the feature database postgresql://postgres:***@" in r.output
    assert "hunter2" not in r.output and "missing" in r.output
