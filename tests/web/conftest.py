"""A small feature database (planted features 0..9 fire on tokens 0..9, the rest random) and a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interplab.features import FeatureBuildConfig
from interplab.features.build import build_feature_db
from tests.features.planted import planted_sae, tiny_model


@pytest.fixture(scope="session")
def web_setup(tmp_path_factory) -> dict:
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
    run = root / "runs" / "train-tiny"
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 5.0 / (s + 1), "lr": 1e-3}) + "\n" for s in range(0, 100, 10))
    )
    (run / "report.json").write_text(json.dumps({"final_loss": 0.5}))
    formation = {
        "steps": [0, 50, 100],
        "induction_score": [0.01, 0.3, 0.6],
        "prev_token": [[[0.1, 0.2]], [[0.3, 0.1]], [[0.2, 0.4]]],
    }
    (run / "formation.json").write_text(json.dumps(formation))
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
            }
        )
    )
    model.save(root / "runs" / "model")
    return {"root": root, "db": root / "tiny.db", "model": model, "sae": sae, "runs": root / "runs"}


@pytest.fixture(scope="session")
def web_app(web_setup):
    from interplab.web.app import create_app

    return create_app(
        [web_setup["db"]], runs=[web_setup["runs"]], model=web_setup["model"], sae=web_setup["sae"]
    )


@pytest.fixture
def artifacts_dir() -> Path:
    out = Path(__file__).resolve().parents[2] / "test-artifacts"
    out.mkdir(exist_ok=True)
    return out
