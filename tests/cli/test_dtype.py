"""``--dtype``: the one option every command that runs a model shares (`interplab.cli.common.dtype_option`)
loads the model in that dtype, float32 when it is not given."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import interplab.cli.common as common
from interplab.cli.main import app
from interplab.features.reader import FeatureReader
from interplab.model import Transformer
from interplab.model.load import load_model
from tests.cli.lab import HOOK, make_lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    return make_lab(
        tmp_path_factory.mktemp("dtype"), {f"{i}.txt": "abc def gh\n" * (80 + i) for i in range(8)}
    )


@pytest.fixture
def loaded(monkeypatch) -> list[Transformer]:
    """Every model a command loads (through `load_model_arg`)."""
    models: list[Transformer] = []
    real = common.load_model

    def spy(*args, **kwargs):
        models.append(real(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(common, "load_model", spy)
    return models


def _dtypes(model: Transformer) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


def _commands(lab: Path, out: Path) -> dict[str, list[str]]:
    m, c = str(lab / "model"), str(lab / "corpus")
    return {
        "heads": ["heads", m, "--out", str(out / "heads"), "--seq-len", "8", "--batch", "2"],
        "features build": [
            "features",
            "build",
            "--model",
            m,
            "--sae",
            str(lab / "sae"),
            "--out",
            str(out / "f.db"),
            "--corpus",
            c,
            "--split",
            "train",
            "--n-seqs",
            "4",
            "--seq-len",
            "16",
            "--no-loss-effect",
        ],  # fmt: skip
        "sae train": [
            "sae",
            "train",
            "--model",
            m,
            "--hook",
            HOOK,
            "--out",
            str(out / "saes"),
            "--corpus",
            c,
            "--steps",
            "2",
            "--batch",
            "32",
            "--seq-len",
            "16",
            "--expansion",
            "2",
        ],  # fmt: skip
        "sae cache": [
            "sae",
            "cache",
            m,
            "--hook",
            HOOK,
            "--out",
            str(out / "cache"),
            "--corpus",
            c,
            "--tokens",
            "64",
            "--seq-len",
            "16",
            "--dtype",
            "float32",
        ],  # fmt: skip
    }


@pytest.mark.parametrize("command", ["heads", "features build", "sae train", "sae cache"])
def test_dtype_bf16_loads_the_model_in_bf16(lab, tmp_path, loaded, command):
    args = _commands(lab, tmp_path)[command]
    flag = "--model-dtype" if command == "sae cache" else "--dtype"  # sae cache's --dtype is the cache's
    result = CliRunner().invoke(app, [*args, flag, "bf16"])
    assert result.exit_code == 0, result.output
    assert len(loaded) == 1 and _dtypes(loaded[0]) == {torch.bfloat16}


def _max_acts(db: Path) -> torch.Tensor:
    rows = FeatureReader(db).list_features(limit=1000)
    return torch.tensor([r["max_act"] or 0.0 for r in rows])


def test_a_bf16_feature_database_matches_the_float32_one(lab, tmp_path):
    """The same build in bf16 and float32: every feature's largest activation within bf16 rounding."""
    for dtype in ("bf16", "float32"):
        (tmp_path / dtype).mkdir()
        args = _commands(lab, tmp_path / dtype)["features build"]
        result = CliRunner().invoke(app, [*args, "--dtype", dtype])
        assert result.exit_code == 0, result.output
    bf16, fp32 = _max_acts(tmp_path / "bf16" / "f.db"), _max_acts(tmp_path / "float32" / "f.db")
    assert len(fp32) == 32 and fp32.max() > 0
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.02)


def test_the_default_is_float32(lab, tmp_path, loaded):
    load_model(lab / "model", dtype=torch.bfloat16).save(tmp_path / "bf16_model")  # stored in bf16
    args = _commands(lab, tmp_path)["heads"]
    args[1] = str(tmp_path / "bf16_model")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert _dtypes(loaded[0]) == {torch.float32}
    assert _dtypes(load_model(tmp_path / "bf16_model")) == {torch.bfloat16}  # as stored: bf16


@pytest.mark.parametrize(
    ("value", "expected"), [("bf16", "bfloat16"), ("FP16", "float16"), ("float32", "float32")]
)
def test_dtype_names(value, expected):
    assert common.model_dtype(value) == expected
