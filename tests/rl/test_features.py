"""Features of a decision transformer (`interplab.rl.features`): cached rows against a loop over windows, a
planted "key in view" direction found by a hand-set and by a trained SAE, the feature database's statistics
against a direct computation on the cached activations, and bad input."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from interplab.features import schema as S
from interplab.features.build import build_feature_db
from interplab.features.collect import decoder_directions, decoder_logit_effects
from interplab.features.config import FeatureBuildConfig
from interplab.features.reader import FeatureReader
from interplab.features.writer import FeatureWriter
from interplab.rl.envs import ACTION_NAMES
from interplab.rl.features import (
    ROW_VOCAB,
    build_dt_feature_db,
    default_site,
    dt_activations,
    dt_feature_meta,
    encode_rows,
    feature_aurocs,
    label_scores,
    step_features,
    train_dt_sae,
)
from interplab.rl.model import TOKEN_KINDS, DecisionTransformer, DTConfig
from interplab.rl.trajectories import Trajectories
from interplab.rl.windows import KEY, token_position, windows
from interplab.sae import SAEConfig, create_sae

ENV = "MiniGrid-Empty-5x5-v0"
BALL = 6


def _trajs(lengths=(9, 4, 14, 7, 11), seed=0) -> Trajectories:
    """Hand-made episodes: empty/wall cells, a key in about a third of the views (one cell each, anywhere), a
    ball in another third; random actions and rewards."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    obs = torch.zeros(n, 7, 7, 3, dtype=torch.uint8)
    obs[..., 0] = torch.randint(1, 3, (n, 7, 7), generator=g).to(torch.uint8)
    for i in range(n):
        for obj, p in ((KEY, 0.35), (BALL, 0.35)):
            if float(torch.rand((), generator=g)) < p:
                c = int(torch.randint(0, 49, (), generator=g))
                obs[i, c // 7, c % 7, 0] = obj
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    dones = torch.zeros(n, dtype=torch.bool)
    dones[starts[1:] - 1] = True
    return Trajectories(
        env=ENV,
        obs=obs,
        actions=torch.randint(0, 3, (n,), generator=g),
        rewards=torch.rand(n, generator=g) * dones,
        dones=dones,
        episode_starts=starts,
        seeds=torch.arange(len(lengths)),
        source="hand-made",
    )


def _key_in_view(trajs: Trajectories) -> torch.Tensor:
    return (trajs.obs[..., 0] == KEY).flatten(1).any(1)


def _random_dt(context: int = 4) -> DecisionTransformer:
    torch.manual_seed(0)
    return DecisionTransformer(
        DTConfig(
            env=ENV, context=context, max_timestep=100, d_model=16, n_layers=2, n_heads=2, init_range=0.3
        )
    )


def _planted_dt() -> DecisionTransformer:
    """One attention-only layer that writes nothing (W_O = 0), no norm: the residual stream at a state token is
    its embedding, ``(1 + c / 49) e0`` for a key at cell c of the view and ``e1`` for a ball, nothing else."""
    model = DecisionTransformer(
        DTConfig(env=ENV, context=3, max_timestep=100, d_model=8, n_layers=1, n_heads=1, attn_only=True,
                 normalization="none")
    )  # fmt: skip
    values = sum(model.cfg.obs_values)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        table = model.state_embed.weight  # [cells * values, d_model]
        for c in range(49):
            table[c * values + KEY, 0] = 1 + c / 49  # channel 0 (object) comes first in each cell's one-hot
            table[c * values + BALL, 1] = 1.0
    return model


def _key_sae(site: str):
    """Feature 0 reads e0 (fires on a key in view, by its coefficient), feature 1 reads e1 (a ball)."""
    sae = create_sae(SAEConfig(d_in=8, d_sae=2, architecture="relu", hook_name=site))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 0] = sae.W_enc[1, 1] = 1.0
        sae.b_enc.fill_(-0.5)
        sae.W_dec.zero_()
        sae.W_dec[0, 0] = sae.W_dec[1, 1] = 1.0
        sae.b_dec.zero_()
    return sae


# ---- the cache ---------------------------------------------------------------------------------------
def test_cached_rows_equal_a_loop_over_windows():
    model, trajs = _random_dt(), _trajs()
    site = "blocks.0.hook_resid_post"
    acts = dt_activations(model, trajs, site, kinds=("action", "rtg", "state"), loss_grad=True, batch_size=7)
    assert acts.kinds == TOKEN_KINDS  # sequence order, whatever order they were asked in
    k = model.cfg.context
    rows, xs, grads = [], [], []
    starts = trajs.episode_starts.tolist()
    for flat in range(trajs.n_steps):
        e = max(i for i in range(len(starts) - 1) if starts[i] <= flat)
        win = windows(trajs, k, ends=[flat])
        x = {}

        def leaf(a, _s, x=x):
            x["a"] = a.detach().requires_grad_(True)
            return x["a"]

        with model.transformer.hooks(fwd_hooks=[(site, leaf)]):
            logits = model(*win.inputs())[:, -1]
            loss = torch.nn.functional.cross_entropy(logits, win.actions[:, -1])
            (g,) = torch.autograd.grad(loss, x["a"])
        a = int(trajs.actions[flat])
        for kind in TOKEN_KINDS:
            token = {"rtg": 14, "state": 7 + a, "action": a}[kind]
            rows.append(
                (e, flat - starts[e], flat, TOKEN_KINDS.index(kind), token, a, float(trajs.rtg[flat]))
            )
            xs.append(x["a"][0, token_position(k - 1, kind)].detach())
            grads.append(g[0, token_position(k - 1, kind)])
    c = acts.cache
    got = list(
        zip(c.episode.tolist(), c.step.tolist(), c.flat_step.tolist(), c.kind.tolist(), acts.tokens.tolist(),
            acts.action.tolist(), acts.rtg.tolist(), strict=True)
    )  # fmt: skip
    assert got == rows
    torch.testing.assert_close(acts.x, torch.stack(xs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acts.loss_grad, torch.stack(grads), atol=1e-5, rtol=1e-4)
    assert acts.row_starts.tolist() == [3 * s for s in starts]
    a0 = ACTION_NAMES[int(trajs.actions[0])]
    assert [ROW_VOCAB[t] for t in acts.tokens[:3].tolist()] == ["R ", f"s→{a0} ", f"a:{a0} "]


def test_default_site_and_bad_kinds():
    model = _random_dt()
    assert (
        default_site(model) == "blocks.1.hook_resid_post"
        and default_site(model, 0) == "blocks.0.hook_resid_post"
    )
    with pytest.raises(ValueError, match=r"layer 2 out of range: the model has layers 0..1"):
        default_site(model, 2)
    with pytest.raises(ValueError, match="kinds must be a non-empty subset"):
        dt_activations(model, _trajs(), kinds=("states",))


# ---- planted: a key-in-view direction -------------------------------------------------------------------
def test_a_planted_key_direction_gives_a_feature_whose_top_states_are_the_key_states(tmp_path):
    model, trajs = _planted_dt(), _trajs()
    acts = dt_activations(model, trajs)
    key = _key_in_view(trajs)
    sae = _key_sae(acts.site)
    cfg_top = int(key.sum()) + 5  # room for every key state, and more
    cfg = FeatureBuildConfig(top_k=cfg_top, window_left=2, window_right=1, loss_effect=False)
    build_dt_feature_db(tmp_path / "f.db", model, sae, acts, trajs, cfg, data_path=tmp_path)
    store = FeatureReader(tmp_path / "f.db")
    rec = store.feature(0)
    assert rec["n_fires"] == int(key.sum())
    top_rows = {c["token_index"] for c in rec["top"]}
    assert top_rows == set(key.nonzero()[:, 0].tolist())  # state rows only: row index = flat step
    where = store.dt_rows(top_rows)
    assert all(bool(key[where[i]["flat_step"]]) for i in top_rows)
    # strongest first: the key furthest along the view (largest coefficient) on top
    coef = [
        1 + int((trajs.obs[i, ..., 0] == KEY).flatten().nonzero()[0]) / 49
        for i in (c["token_index"] for c in rec["top"])
    ]
    assert coef == sorted(coef, reverse=True)
    # the direct statistic agrees: AUROC 1 for feature 0 on the key, feature 1 on the ball
    fa = encode_rows(sae, acts.x)
    scores = {
        s.label: s
        for s in label_scores(fa, acts, {"key": key, "ball": (trajs.obs[..., 0] == BALL).flatten(1).any(1)})
    }
    assert (scores["key"].feature, scores["key"].auroc) == (0, 1.0)
    assert (scores["ball"].feature, scores["ball"].auroc) == (1, 1.0)


def test_a_trained_sae_finds_the_key_direction():
    model, trajs = _planted_dt(), _trajs(lengths=(40,) * 12, seed=1)
    acts = dt_activations(model, trajs)
    key = _key_in_view(trajs)
    result = train_dt_sae(acts, d_sae=6, k=2, steps=400, batch_size=64, lr=3e-3)
    assert result.final("sae")["fvu"] < 0.05
    fa = encode_rows(result.saes["sae"], acts.x)
    best = label_scores(fa, acts, {"key": key})[0]
    assert best.auroc > 0.99
    top = fa[:, best.feature].topk(30).indices
    assert bool(key[top].all())  # the feature's 30 strongest states all show the key


def test_auroc_is_the_mann_whitney_statistic():
    acts = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [3.0, 0.0], [1.0, 1.0]])
    label = torch.tensor([True, True, False, False, True])
    # feature 0: positives 0, 0, 1 vs negatives 1, 3: pairs > 0, ties 1 -> 0.5 / 6
    # feature 1: positives 1, 2, 1 vs negatives 0, 0: all 6 pairs greater -> 1
    torch.testing.assert_close(feature_aurocs(acts, label), torch.tensor([0.5 / 6, 1.0]))
    assert bool(feature_aurocs(acts, torch.ones(5, dtype=torch.bool)).isnan().all())


# ---- the feature database --------------------------------------------------------------------------
def _direct_top(values: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """(row, activation) of the k strongest firings, ties to the earlier row."""
    fired = [(i, float(v)) for i, v in enumerate(values.tolist()) if v > 0]
    fired.sort(key=lambda t: (-t[1], t[0]))
    return fired[:k]


def test_feature_database_statistics_equal_a_direct_computation(tmp_path):
    model, trajs = _random_dt(), _trajs()
    acts = dt_activations(model, trajs, kinds=("rtg", "state"), loss_grad=True)
    sae = create_sae(SAEConfig(d_in=16, d_sae=12, architecture="relu", hook_name=acts.site), seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
    report = build_dt_feature_db(tmp_path / "f.db", model, sae, acts, trajs, data_path=tmp_path / "data")
    assert report.n_features == 12 and report.n_tokens == acts.n_rows
    store = FeatureReader(tmp_path / "f.db")
    meta = store.meta()
    dt = dt_feature_meta(meta)
    assert (
        dt["site"] == acts.site
        and dt["kinds"] == ["rtg", "state"]
        and dt["trajectories"] == str(tmp_path / "data")
    )
    assert meta["window_left"] == 2 * (model.cfg.context - 1) and meta["window_right"] == 2
    assert meta["model_path"] is None  # no language model to steer with
    assert store.vocab() == dict(enumerate(ROW_VOCAB))
    fa = encode_rows(sae, acts.x).double()
    directions = decoder_directions(sae).double()
    effects = decoder_logit_effects(model.transformer, sae)
    wl, wr = meta["window_left"], meta["window_right"]
    episode_of_row = acts.cache.episode
    k_top = 20
    n_fired = 0
    for f in range(12):
        rec = store.feature(f)
        v = fa[:, f]
        fired = v > 0
        n_fired += int(fired.any())
        assert rec["n_fires"] == int(fired.sum())
        assert rec["density"] == pytest.approx(float(fired.double().mean()))
        if not fired.any():
            continue
        assert rec["mean_act"] == pytest.approx(float(v[fired].mean()), abs=1e-6)
        assert rec["max_act"] == pytest.approx(float(v.max()), abs=1e-6)
        grad_proj = acts.loss_grad.double() @ directions[f]
        loss = float((-v * grad_proj)[fired].mean())
        assert rec["loss_effect"] == pytest.approx(loss, abs=1e-5, rel=1e-3)
        want = _direct_top(v.float(), k_top)
        assert [(c["token_index"], c["act"]) for c in rec["top"]] == [
            (i, pytest.approx(a, abs=1e-6)) for i, a in want
        ]
        for c in rec["top"]:  # the window: the rows around it within its episode, -1 outside
            i = c["token_index"]
            exp_tokens, exp_acts = [], []
            for j in range(i - wl, i + wr + 1):
                inside = 0 <= j < acts.n_rows and int(episode_of_row[j]) == int(episode_of_row[i])
                exp_tokens.append(int(acts.tokens[j]) if inside else -1)
                exp_acts.append(round(float(fa[j, f]), 4) if inside else 0.0)
            assert c["tokens"] == exp_tokens
            assert c["acts"] == pytest.approx(exp_acts, abs=2e-4)
        pos = sorted(effects[f].tolist(), reverse=True)[:3]  # the 3 most promoted actions
        assert [v for _, v in rec["logits"]["pos"]] == pytest.approx([round(p, 4) for p in pos], abs=1e-4)
        assert {t for t, _ in rec["logits"]["pos"]} <= set(range(7))  # action ids = ROW_VOCAB's a:... tokens
    assert n_fired >= 6
    rows = store.dt_rows(range(acts.n_rows))
    c = acts.cache
    assert [(r["episode"], r["step"], r["flat_step"], r["token_kind"], r["action"]) for _, r in sorted(rows.items())] == [
        (e, s, fl, TOKEN_KINDS[k], a)
        for e, s, fl, k, a in zip(c.episode.tolist(), c.step.tolist(), c.flat_step.tolist(), c.kind.tolist(),
                                  acts.action.tolist(), strict=True)
    ]  # fmt: skip
    # building again resumes nothing and changes nothing
    before = store.dump()
    again = build_dt_feature_db(tmp_path / "f.db", model, sae, acts, trajs, data_path=tmp_path / "data")
    assert again.passes_skipped == 1 and FeatureReader(tmp_path / "f.db").dump() == before


def test_step_features_are_the_strongest_firings_of_each_step():
    model, trajs = _random_dt(), _trajs()
    acts = dt_activations(model, trajs, kinds=("rtg", "state"))
    sae = create_sae(SAEConfig(d_in=16, d_sae=12, architecture="relu", hook_name=acts.site), seed=3)
    fa = encode_rows(sae, acts.x)
    got = step_features(fa, acts, [1, 3], k=3)
    assert list(got) == ["1", "3"]
    lo = int(trajs.episode_starts[3])
    for t, top in enumerate(got["3"]):
        row = fa[2 * (lo + t) + 1]  # the state row of the step
        want = [(int(i), float(row[i])) for i in row.argsort(descending=True)[:3] if row[i] > 0]
        assert [f for f, _ in top] == [f for f, _ in want]
        assert [a for _, a in top] == pytest.approx([round(a, 4) for _, a in want], abs=1e-4)
    assert len(got["1"]) == int(trajs.lengths[1])


# ---- bad input and backward compatibility ------------------------------------------------------------
def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    from tests.features.planted import planted_sae, tiny_model

    model, trajs = _random_dt(), _trajs()
    acts = dt_activations(model, trajs)
    lm = tiny_model()
    build_feature_db(tmp_path / "lm.db", lm, planted_sae(lm, 4), torch.randint(0, 40, (4, 16)))
    with pytest.raises(ValueError, match="holds a language model's features .*interplab dt sae"):
        dt_feature_meta(FeatureReader(tmp_path / "lm.db").meta(), "lm.db")
    assert FeatureReader(tmp_path / "lm.db").dt_rows([0, 1]) == {}  # no rows table: nothing to draw
    wide = create_sae(SAEConfig(d_in=32, d_sae=4, architecture="relu", hook_name=acts.site))
    with pytest.raises(ValueError, match="d_in=32.*width 16: an SAE of another model or site"):
        build_dt_feature_db(tmp_path / "f.db", model, wide, acts, trajs)
    other = create_sae(SAEConfig(d_in=16, d_sae=4, architecture="relu", hook_name="blocks.0.hook_resid_post"))
    with pytest.raises(ValueError, match="the SAE reads 'blocks.0.hook_resid_post'"):
        build_dt_feature_db(tmp_path / "f.db", model, other, acts, trajs)
    plain = create_sae(SAEConfig(d_in=16, d_sae=4, architecture="relu", hook_name=acts.site))
    with pytest.raises(ValueError, match="loss_effect needs the action-loss gradients"):
        build_dt_feature_db(
            tmp_path / "f.db", model, plain, acts, trajs, FeatureBuildConfig(loss_effect=True)
        )
    # a DT database where a language model's is rebuilt: the fingerprint differs, refused
    sae = create_sae(SAEConfig(d_in=16, d_sae=4, architecture="relu", hook_name=acts.site))
    with pytest.raises(ValueError, match="built with other settings"):
        build_dt_feature_db(tmp_path / "lm.db", model, sae, acts, trajs)


def test_a_language_model_database_opens_unchanged(tmp_path):
    """The schema change is one optional table that only DT databases have: an existing database is neither
    migrated nor given the table when it is read, labelled or served."""
    from fastapi.testclient import TestClient

    from interplab.web.app import create_app
    from tests.features.planted import planted_sae, tiny_model

    lm = tiny_model()
    db = tmp_path / "lm.db"
    build_feature_db(db, lm, planted_sae(lm, 4), torch.randint(0, 40, (4, 16)))
    before = FeatureReader(db).dump()
    assert "dt_rows" not in before and S.schema_version(FeatureReader(db).engine) == S.SCHEMA_VERSION
    client = TestClient(create_app([db]), base_url="http://127.0.0.1")
    page = client.get("/db/lm/feature/1")
    assert page.status_code == 200 and "dt-contexts" not in page.text and "Steer the model" in page.text
    FeatureWriter(db).set_label(1, "x")
    FeatureWriter(db).set_label(1, "")
    assert FeatureReader(db).dump() == before
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "dt_rows" not in tables


# ---- the command ---------------------------------------------------------------------------------------
def test_dt_sae_command_writes_a_run_the_printed_serve_command_opens(tmp_path, monkeypatch):
    """`interplab dt analyze` + `interplab dt sae` on a random DT: the run folder, its report and per-step
    features, the analysis' per-step probe predictions, and the printed `interplab serve` command, run as
    printed (uvicorn replaced by a test client), shows the feature pages with pictures and the player's
    read-outs."""
    pytest.importorskip("minigrid")
    import shlex

    import uvicorn
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from interplab import runs
    from interplab.cli.main import app
    from interplab.rl.labels import env_labels
    from interplab.rl.trajectories import load_trajectories
    from interplab.runs import Kind
    from tests.rl.test_cli import random_trajectories

    env = "MiniGrid-MemoryS7-v0"
    lab = tmp_path / "lab"
    random_trajectories(env, 6).save(lab / "data")
    torch.manual_seed(0)
    from interplab.rl.model import save_dt

    save_dt(DecisionTransformer(DTConfig(env=env, context=4, max_timestep=245, d_model=32, n_layers=2, n_heads=2)),
            lab / "model")  # fmt: skip
    runner = CliRunner()

    def run(*args):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    run("dt", "analyze", lab / "model", "--data", lab / "data", "--out", lab / "analysis")
    out = run("dt", "sae", lab / "model", "--data", lab / "data", "--out", lab / "sae", "--d-sae", "16", "--k",
              "2", "--steps", "30", "--layer", "0")  # fmt: skip
    assert runs.detect(lab / "sae") is Kind.SAE_TRAIN and (lab / "sae" / "saes" / "sae").is_dir()
    report = runs.read_json(lab / "sae" / runs.REPORT, Kind.DT_FEATURES)
    trajs = load_trajectories(lab / "data")
    assert report["site"] == "blocks.0.hook_resid_post" and report["rows"] == trajs.n_steps
    assert 0 <= report["fvu"] and report["l0"] == pytest.approx(2.0)
    assert {s["label"] for s in report["labels"]} >= {"facing_east", "instruction_key", "instruction_ball"}
    steps = runs.read_json(lab / "sae" / "player.json", Kind.DT_FEATURES)["steps"]
    assert [len(steps[str(e)]) for e in range(6)] == trajs.lengths.tolist()
    analysis = runs.read_json(lab / "analysis" / runs.REPORT, Kind.DT_ANALYSIS)["probe_steps"]
    truth = env_labels(trajs)
    for name in analysis["labels"]:
        y = {
            "instruction": truth.instruction,
            "direction": truth.direction,
            "key_in_view": truth.key_in_view,
        }[name]
        for e in range(6):
            rows = analysis["episodes"][str(e)][name]
            lo = int(trajs.episode_starts[e])
            assert [r[2] for r in rows] == y[lo : lo + len(rows)].long().tolist()
            assert all(
                0.0 <= r[1] <= 1.0 and 0 <= r[0] < len(analysis["labels"][name]["classes"]) for r in rows
            )
    line = next(s for s in out.splitlines() if s.startswith("browse: "))
    argv = shlex.split(line.removeprefix("browse: "))
    assert argv[:2] == ["interplab", "serve"]
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda web, **kw: served.update(app=web))
    run(*argv[1:])
    client = TestClient(served["app"], base_url="http://127.0.0.1")
    store = FeatureReader(lab / "sae" / "features.db")
    f = next(i for i in range(16) if store.feature(i)["n_fires"])
    page = client.get(f"/db/features/feature/{f}").text
    assert 'id="dt-contexts"' in page and "dt-no-pictures" not in page
    src = page.split('class="dt-frame" src="')[1].split('"')[0]
    assert client.get(src).status_code == 200
    home = client.get("/").text
    i = next(
        int(p.split('"')[0]) for p in home.split('href="/run/')[1:] if p.split("</a>")[0].endswith("analysis")
    )
    player = client.get(f"/run/{i}").text.split('id="dt-data">')[1].split("</script>")[0]
    import json

    eps = json.loads(player)["player"]["episodes"]
    assert eps[0]["features"] == steps["0"] and len(eps[0]["probes"]) == eps[0]["length"]


def test_features_steer_refuses_a_dt_database(tmp_path):
    from typer.testing import CliRunner

    from interplab.cli.main import app

    model, trajs = _random_dt(), _trajs()
    acts = dt_activations(model, trajs)
    sae = create_sae(SAEConfig(d_in=16, d_sae=4, architecture="relu", hook_name=acts.site))
    build_dt_feature_db(tmp_path / "f.db", model, sae, acts, trajs)
    r = CliRunner().invoke(
        app, ["features", "steer", "--model", str(tmp_path), "--sae", str(tmp_path), "--feature", "0",
              "--db", str(tmp_path / "f.db"), "--prompt", "x"],
    )  # fmt: skip
    assert r.exit_code != 0 and "holds a decision transformer's features" in r.output.replace("\n", " ")
