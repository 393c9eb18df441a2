"""A small feature database (planted features 0..9 fire on tokens 0..9, the rest random), a run folder laid
out as the demo writes it, a database whose token strings are hostile to HTML, and a live server helper."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from interplab.features import FeatureBuildConfig
from interplab.features.build import build_feature_db
from tests.features.planted import planted_sae, tiny_model

# token strings that break pages which embed JSON carelessly: a comment opener followed by a script tag
# makes the HTML parser swallow the rest of the page; </script> ends the element; U+2028 ends a JS line
HOSTILE_TOKENS = ["<!--<script>", "</script>", "]]>", "\"quoted'", "\u2028line\u2029", "&amp;<b>", "<!--"]


def write_training_run(run: Path, model, n_checkpoints: int = 3) -> None:
    """A training run as `interplab train` + `formation` + `sae train/eval` + `attribute` lay it out."""
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"steps": 100, "model": {"d_model": 32}}))
    (run / "log.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "loss": 5.0 / (s + 1), "lr": 1e-3, "tokens_per_s": 22120.75621 + s}) + "\n"
            for s in range(0, 100, 10)
        )
    )
    (run / "report.json").write_text(
        json.dumps({"final_loss": 0.5, "step": 100, "tokens_per_s": 22120.75621, "checkpoints": [0, 50, 100]})
    )
    for k in range(n_checkpoints):
        model.save(run / "checkpoints" / f"step_{k * 50:06d}")
    model.save(run / "final")
    formation = {  # `interplab formation` writes formation/formation.json
        "steps": [0, 50, 100],
        "formation_step": 50,
        "summary": "induction heads form at step 50",
        "induction_score": [0.01, 0.3, 0.6],
        "prev_token": [[[0.1, 0.2]], [[0.3, 0.1]], [[0.2, 0.4]]],
    }
    (run / "formation").mkdir()
    (run / "formation" / "formation.json").write_text(json.dumps(formation))
    attribution = run / "attribution" / "induction_0.1"  # as written by `interplab attribute`
    attribution.mkdir(parents=True)
    (attribution / "report.json").write_text(
        json.dumps(
            {
                "target": "induction:0.1",
                "window": [50, 100],
                "n_candidates": 3,
                "method": "TracIn over checkpoints",
                "top": [
                    {"sequence": 17, "score": 4.2e-6, "text": "NAOP = bytes([9]) # negotiate about output"}
                ],
                "enriched_tokens": [{"token": "negotiate", "ratio": 5.0}],
                "curve": {"steps": [50, 75, 100], "values": [0.1, 0.4, 0.5]},
            }
        )
    )
    (run / "llc").mkdir()  # `interplab llc RUN -c L0H1` writes llc/report.json
    (run / "llc" / "report.json").write_text(
        json.dumps(
            {
                "kind": "llc",
                "version": 1,
                "summary": "LLC of 3 checkpoints: 1.5 at step 0 -> peak 9.25 at step 100",
                "steps": [0, 50, 100],
                "components": ["all", "L0H1"],
                "llc": {"all": [1.5, 6.0, 9.25], "L0H1": [0.25, 2.0, 3.5]},
                "se": {"all": [0.1, 0.3, None], "L0H1": [0.05, 0.1, 0.2]},
                "init_loss": [6.9, 4.0, 3.0],
                # step 50's total did not mix; L0H1's diagnostics unknown at step 0 (null, as NaN is written)
                "rhat": {"all": [1.004, 1.052, 1.008], "L0H1": [None, 1.003, 1.006]},
                "ess_bulk": {"all": [610.0, 41.0, 450.0], "L0H1": [None, 700.0, 520.0]},
                "ess_tail": {"all": [580.0, 66.0, 400.0], "L0H1": [None, 690.0, 480.0]},
                "config": {"step_size": 1e-4, "gamma": 100.0, "chains": 4, "draws": 200},
            }
        )
    )
    sae_run = run / "sae"  # `interplab sae train --out RUN/sae` and `sae eval RUN/sae`
    sae = planted_sae(model, 8)
    sae.save(sae_run / "saes" / "blocks_0_hook_resid_pre")
    (sae_run / "log.jsonl").write_text(
        "".join(
            json.dumps({"sae": "blocks_0_hook_resid_pre", "step": s, "fvu": 1 / (s + 1), "l0": 16.0}) + "\n"
            for s in range(5, 50, 5)
        )
    )
    (sae_run / "eval").mkdir()
    (sae_run / "eval" / "report.json").write_text(
        json.dumps(
            {
                "saes": [
                    {"name": "blocks_0_hook_resid_pre", "l0": 16.0, "fvu": 0.2295, "ce_loss_recovered": 0.95}
                ]
            }
        )
    )


SCRUB_HYPOTHESES = ["1a (count)", "<script>alert(1)</script>"]
"""the hypotheses of `write_scrub_run`: a name that is no folder name, and one hostile to HTML"""


def write_scrub_run(run: Path) -> None:
    """A causal-scrubbing run as `interplab scrub` lays it out: config.json, log.jsonl, one report folder per
    hypothesis (report.json + report.html with the sampled inputs of one reference), one shared plotly.js."""
    from interplab import runs
    from interplab.cli.scrub import hypothesis_folders
    from interplab.scrub.result import ClaimRow
    from tests.scrub.test_report import SAMPLE, E, R, result

    folders = hypothesis_folders(SCRUB_HYPOTHESES)
    inputs = {row: "(" * (row % 7) + ")" * (row % 5) for row in SAMPLE.values()}
    for name, folder in zip(SCRUB_HYPOTHESES, folders, strict=True):
        r = result(
            hypothesis=name,
            per_claim=[
                ClaimRow("logits/a2.1/a2.1.in@3", E, R),
                ClaimRow("logits/a2.1/a2.1.in@[5..40]", E, R),
            ],
            per_class={"balanced": {"n": 1089, "original": E, "random": E, "scrubbed": E}},
            samples=[SAMPLE],
            inputs=inputs,
        )
        r.save(run / folder, assets=run)
    runs.write_log(
        run,
        [
            {"event": "scrubbed", "hypothesis": n, "folder": f}
            for n, f in zip(SCRUB_HYPOTHESES, folders, strict=True)
        ],
    )
    runs.write_json(run / runs.CONFIG, runs.Kind.SCRUB, {"task": "parens", "n_examples": 4000, "n_seeds": 2})


def copy_db(src: Path, dst: Path) -> Path:
    """A consistent copy of the SQLite database ``src`` at ``dst`` (the source may have WAL pages)."""
    import sqlite3

    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    a.backup(b)
    a.close()
    b.close()
    return dst


@pytest.fixture(scope="session")
def web_setup(tmp_path_factory):
    """The shared tiny database, run folder and model. Tests only read them: the test files run in any order
    and on several workers (scripts/test.sh), so a test that writes labels or rows works on its own copy
    (`copy_db`, `writable_db`); the fixture's teardown fails if a test wrote to the database."""
    root = tmp_path_factory.mktemp("web")
    model = tiny_model()
    sae = planted_sae(model, 16)
    with torch.no_grad():  # features 10..15: random directions (they fire on many tokens)
        g = torch.Generator().manual_seed(3)
        sae.W_enc[:, 10:] = torch.randn(32, 6, generator=g) / 4
        sae.b_enc[10:] = 0.0
    tokens = torch.randint(0, 40, (32, 16), generator=torch.Generator().manual_seed(1))
    cfg = FeatureBuildConfig(top_k=6, n_samples=8, window_left=4, window_right=2, batch_size=8)
    build_feature_db(root / "tiny.db", model, sae, tokens, cfg)
    write_training_run(root / "runs" / "train-tiny", model)
    model.save(root / "runs" / "model")
    built = _contents(root / "tiny.db")
    yield {"root": root, "db": root / "tiny.db", "model": model, "sae": sae, "runs": root / "runs"}
    now = _contents(root / "tiny.db")
    changed = {
        t: sorted(set(rows) ^ set(built.get(t, []))) for t, rows in now.items() if built.get(t) != rows
    }
    assert not changed, (
        f"a test wrote to the shared tiny database ({changed}): tests that write must work on a copy (the "
        "`writable_db` fixture, `copy_db`), since other test files read it in any order"
    )


def _contents(db: Path) -> dict[str, list[str]]:
    """Every table's rows (their ``repr``), sorted; without the map's coordinates, which the app caches in
    ``meta`` (derived from the SAE, not written by a user)."""
    import sqlite3

    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"'))) for t in tables}
    finally:
        con.close()
    if "meta" in rows:
        rows["meta"] = [r for r in rows["meta"] if not r.startswith("('feature_map',")]
    return rows


@pytest.fixture(scope="session")
def hostile_db(web_setup) -> Path:
    """The tiny database with token strings that are HTML/JS syntax (every token id maps to one of them)."""
    from interplab.features.writer import FeatureWriter

    path = copy_db(web_setup["db"], web_setup["root"] / "hostile.db")
    store = FeatureWriter(path)
    n = web_setup["model"].cfg.d_vocab
    # every token opens a comment and a script tag, then one more hostile piece
    store.write_vocab(
        [f"<!--<script>{HOSTILE_TOKENS[i % len(HOSTILE_TOKENS)]}{i}" for i in range(n)], [1] * n
    )
    store.set_label(3, "<!--<script>alert(1)</script> & </script>")
    store.close()
    return path


def setup_app(web_setup: dict, db: Path | str):
    """The app over database ``db`` with `web_setup`'s runs, model and SAE."""
    from interplab.web.app import create_app

    return create_app([db], runs=[web_setup["runs"]], model=web_setup["model"], sae=web_setup["sae"])


@pytest.fixture(scope="session")
def web_app(web_setup):
    return setup_app(web_setup, web_setup["db"])


def on_postgres(request, db: Path, name: str) -> str:
    """A copy of the SQLite database ``db`` in a new PostgreSQL database called ``name`` (the app serves a
    URL under its database's name, so pages have the same addresses on both backends)."""
    from interplab.features.writer import copy_database

    url = request.getfixturevalue("postgres_server").new_db(name=name)
    copy_database(db, url)
    return url


@pytest.fixture
def writable_db(web_setup, tmp_path) -> Path:
    """A copy of the tiny database, served under the same name (``tiny``), for a test that writes to it."""
    return copy_db(web_setup["db"], tmp_path / "tiny.db")


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend_web_app(request, web_setup, tmp_path_factory):
    """The app of `web_app` on each backend, over copies of the tiny database (its tests write labels): one on
    SQLite, one on PostgreSQL."""
    if request.param == "sqlite":
        return setup_app(web_setup, copy_db(web_setup["db"], tmp_path_factory.mktemp("backend") / "tiny.db"))
    return setup_app(web_setup, on_postgres(request, web_setup["db"], "tiny"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, host: str = "127.0.0.1"):
    """``app`` served by uvicorn on a free loopback port in a thread; yields (host, port)."""
    import uvicorn

    from interplab.web.guard import SERVER_OPTIONS

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **SERVER_OPTIONS))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("the test server did not start")
        time.sleep(0.05)
    try:
        yield host, port
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def server_addr(web_app):
    """The shared app on a real server over loopback: (host, port)."""
    with live_server(web_app) as addr:
        yield addr


@pytest.fixture
def writable_server(web_setup, writable_db):
    """`web_app`'s app over a copy of the tiny database (`writable_db`) on a real server over loopback, for a
    test that writes to it: (host, port)."""
    with live_server(setup_app(web_setup, writable_db)) as addr:
        yield addr


@pytest.fixture
def artifacts_dir() -> Path:
    out = Path(__file__).resolve().parents[2] / "test-artifacts"
    out.mkdir(exist_ok=True)
    return out
