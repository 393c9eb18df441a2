"""Every CLI command with bad input: exit code 2 (bad input) or 1 (a job that failed), exactly one line on
stderr naming the bad value, no traceback, and an existing output folder left exactly as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from interplab.cli.main import app
from interplab.sae import SAEConfig, create_sae
from tests.cli.lab import HOOK, make_lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    root = make_lab(tmp_path_factory.mktemp("lab"), {"a.txt": "abc def\n" * 50})
    (root / "afile").write_text("not a folder")
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("precious")
    _truncated_copy(root / "model", root / "truncated_model")
    _truncated_copy(root / "sae", root / "truncated_sae")
    (root / "bad.yaml").write_text("steps: 10\nmodel: [unclosed\n")
    (root / "hyp.py").write_text("x = 1\n")
    return root


def _truncated_copy(src: Path, dst: Path) -> None:
    """A copy of a model or SAE folder whose safetensors files are cut in half (and no checksums to warn)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "checksums.json":
            data = f.read_bytes()
            (dst / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


M, S, C, E, F = "{model}", "{sae}", "{corpus}", "{existing}", "{afile}"
# (args, exit code, text the one error line must contain)
CASES = [
    # train
    (["train", "-p", "induction-2l", "--steps", "0", "--out", E], 2, "'--steps': 0"),
    (["train", "-p", "induction-2l", "--steps", "-5", "--out", E], 2, "-5"),
    (["train", "-p", "induction-2l", "--steps", "abc", "--out", E], 2, "'abc'"),
    (["train", "-p", "induction-2l", "--set", "optim.lr=nan", "--out", E], 2, "nan"),
    (["train", "-p", "induction-2l", "--set", "optim.lr=-1", "--out", E], 2, "-1"),
    (["train", "-p", "induction-2l", "--set", "steps=0", "--out", E], 2, "steps=0"),
    (["train", "-p", "induction-2l", "--set", "data.seq_len=1000", "--out", E], 2, "1000"),
    (["train", "-p", "induction-2l", "--set", "data.seq_len=abc", "--out", E], 2, "abc"),
    (["train", "-p", "induction-2l", "--set", "nosuch=1", "--out", E], 2, "nosuch"),
    (["train", "-p", "induction-2l", "--set", "steps", "--out", E], 2, "steps"),
    (["train", "-p", "nope", "--out", E], 2, "nope"),
    (["train", "--out", E], 2, "--preset"),
    (["train", "-c", "{root}/bad.yaml", "--out", E], 2, "bad.yaml:3: not valid YAML"),
    (["train", "-c", "{root}/missing.yaml", "--out", E], 2, "missing.yaml"),
    (["train", "-p", "induction-2l", "--device", "tpu9", "--out", E], 2, "tpu9"),
    (["train", "-p", "induction-2l", "--device", "cuda:7", "--out", E], 2, "cuda:7"),
    (["train", "-p", "induction-2l", "--out", F], 2, "afile"),
    (["train", "-p", "induction-2l", "--out", F + "/sub", "--steps", "5"], 2, "afile"),
    (["train", "-p", "induction-2l", "--stop-after", "0", "--out", E], 2, "0"),
    (["train", "-p", "induction-2l", "--threads", "-2", "--out", E], 2, "-2"),
    # demo
    (["demo", "--steps", "0", "--out", E], 2, "0"),
    (["demo", "--sae-steps", "-1", "--out", E], 2, "-1"),
    (["demo", "--threads", "-1", "--out", E], 2, "-1"),  # 0 is valid (torch's default)
    (["demo", "--out", F], 2, "afile"),
    # sae cache
    (["sae", "cache", M, "--hook", HOOK, "--out", E, "--tokens", "0", "--corpus", C], 2, "0"),
    (["sae", "cache", M, "--hook", HOOK, "--out", E, "--tokens", "-10", "--corpus", C], 2, "-10"),
    (["sae", "cache", M, "--hook", HOOK, "--out", E, "--seq-len", "1000", "--corpus", C], 2, "1000"),
    (["sae", "cache", M, "--hook", HOOK, "--out", E, "--batch", "0", "--corpus", C], 2, "0"),
    (["sae", "cache", M, "--hook", HOOK, "--out", E, "--dtype", "int8", "--corpus", C], 2, "int8"),
    (["sae", "cache", M, "--hook", HOOK, "--out", E, "--split", "test", "--corpus", C], 2, "test"),
    (["sae", "cache", M, "--hook", HOOK, "--out", E, "--shard-rows", "0", "--corpus", C], 2, "0"),
    (["sae", "cache", M, "--hook", "blocks.9.hook_resid_post", "--out", E, "--corpus", C], 2, "blocks.9"),
    (["sae", "cache", M, "--hook", "nonsense", "--out", E, "--corpus", C], 2, "nonsense"),
    (["sae", "cache", M, "--hook", HOOK, "--out", F, "--corpus", C], 2, "afile"),
    (["sae", "cache", "{root}/nomodel", "--hook", HOOK, "--out", E, "--corpus", C], 2, "nomodel"),
    (
        ["sae", "cache", "{root}/truncated_model", "--hook", HOOK, "--out", E, "--corpus", C],
        2,
        "model.safetensors",
    ),
    (["sae", "cache", M, "--hook", HOOK, "--out", E, "--corpus", "{root}/nocorpus"], 2, "nocorpus"),
    # sae train
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--batch", "0"], 2, "0"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--steps", "0"], 2, "0"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--lr", "nan"], 2, "nan"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--lr", "inf"], 2, "inf"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--lr", "0"], 2, "0"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--coefficient", "-1"], 2, "-1"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--k", "0"], 2, "0"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--expansion", "0"], 2, "0"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--arch", "mlp"], 2, "mlp"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--sweep", "coefficient=1,x"], 2, "'x'"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--sweep", "alpha=1"], 2, "alpha=1"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--sweep", "k=1.5"], 2, "1.5"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--sweep", "lr=nan"], 2, "nan"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", E, "--seq-len", "1000"], 2, "1000"),
    (["sae", "train", "--hook", HOOK, "--out", E], 2, "--model"),
    (["sae", "train", "--cache", "{root}/nocache", "--hook", HOOK, "--out", E], 2, "nocache"),
    (["sae", "train", "--model", M, "--hook", HOOK, "--out", F], 2, "afile"),
    # sae eval
    (["sae", "eval", S, "--model", M, "--out", E, "--batches", "0"], 2, "0"),
    (["sae", "eval", S, "--model", M, "--out", E, "--seq-len", "1000"], 2, "1000"),
    (["sae", "eval", S, "--model", M, "--out", E, "--split", "dev"], 2, "dev"),
    (["sae", "eval", "{root}/truncated_sae", "--model", M, "--out", E, "--corpus", C], 2, "sae_weights"),
    (["sae", "eval", "{root}/nosae", "--model", M, "--out", E], 2, "nosae"),
    (["sae", "eval", S, "--model", M, "--out", F], 2, "afile"),
    # features
    (
        [
            "features",
            "build",
            "--model",
            M,
            "--sae",
            S,
            "--corpus",
            C,
            "--out",
            "{existing}/f.db",
            "--n-seqs",
            "0",
        ],
        2,
        "0",
    ),
    (
        [
            "features",
            "build",
            "--model",
            M,
            "--sae",
            S,
            "--corpus",
            C,
            "--out",
            "{existing}/f.db",
            "--seq-len",
            "1000",
        ],
        2,
        "1000",
    ),
    (
        [
            "features",
            "build",
            "--model",
            M,
            "--sae",
            S,
            "--corpus",
            C,
            "--out",
            "{existing}/f.db",
            "--top-k",
            "0",
        ],
        2,
        "0",
    ),
    (
        [
            "features",
            "build",
            "--model",
            M,
            "--sae",
            S,
            "--corpus",
            C,
            "--out",
            "{existing}/f.db",
            "--batch-size",
            "0",
        ],
        2,
        "0",
    ),
    (["features", "build", "--model", M, "--sae", S, "--corpus", C, "--out", E], 2, "existing"),
    (
        [
            "features",
            "build",
            "--model",
            M,
            "--sae",
            "{root}/truncated_sae",
            "--corpus",
            C,
            "--out",
            "{existing}/f.db",
        ],
        2,
        "sae_weights",
    ),
    (["features", "build", "--model", M, "--sae", S, "--out", "{existing}/f.db"], 2, "--tokens"),
    (
        [
            "features",
            "build",
            "--model",
            M,
            "--sae",
            S,
            "--tokens",
            "{root}/afile",
            "--out",
            "{existing}/f.db",
        ],
        2,
        "afile",
    ),
    (["features", "export", "--db", "{root}/no.db", "--html", F], 2, "afile"),
    (["features", "explain", "--db", "{root}/no.db", "--k", "0"], 2, "0"),
    (["features", "steer", "--model", M, "--sae", S, "--feature", "-1", "--prompt", "ab"], 2, "-1"),
    (
        ["features", "steer", "--model", M, "--sae", S, "--feature", "0", "--prompt", "ab", "--mode", "mul"],
        2,
        "mul",
    ),
    # analysis
    (["patch", M, "--out", E, "--task", "ioi", "--n", "0"], 2, "0"),
    (["patch", M, "--out", F, "--task", "ioi"], 2, "afile"),
    (["patch", M, "--out", E], 2, "--prompts"),
    (["heads", M, "--out", E, "--batch", "0"], 2, "0"),
    (["heads", M, "--out", E, "--dtype", "int8"], 2, "'int8' is not one of: float32, bfloat16, float16"),
    (["sae", "cache", M, "--hook", HOOK, "--out", E, "--model-dtype", "fp64", "--corpus", C], 2, "'fp64'"),
    (["patch", M, "--out", E, "--task", "ioi", "--dtype", "half8"], 2, "'half8'"),
    (["heads", M, "--out", E, "--seq-len", "-3"], 2, "-3"),
    (["heads", "{root}/truncated_model", "--out", E], 2, "model.safetensors"),
    (["lens", M, "--out", E, "--task", "ioi", "--n", "-1"], 2, "-1"),
    (["lens", M, "--out", F, "--task", "ioi"], 2, "afile"),
    # scrub, discover
    (["scrub", "{root}/hyp.py", "--task", "induction", "--n-examples", "0", "--out", E], 2, "0"),
    (["scrub", "{root}/hyp.py", "--task", "induction", "--seeds", "0", "--out", E], 2, "0"),
    (["scrub", "{root}/hyp.py", "--task", "induction", "--out", F], 2, "afile"),
    (["discover", "--task", "induction", "--n", "0", "--out", E], 2, "0"),
    (["discover", "--task", "induction", "--k", "0", "--out", E], 2, "0"),
    (["discover", "--task", "induction", "--threshold", "nan", "--out", E], 2, "nan"),
    (["discover", "--task", "induction", "--method", "magic", "--out", E], 2, "magic"),
    # formation, attribute
    (["formation", "{root}/norun", "--seqs", "0"], 2, "0"),
    (["formation", "{root}/norun", "--every", "0"], 2, "0"),
    (["formation", E, "--out", F], 2, "afile"),
    (["formation", "{root}/norun"], 2, "norun"),
    (["attribute", "{root}/norun", "--dim", "0"], 2, "0"),
    (["attribute", "{root}/norun", "--candidates", "-1"], 2, "-1"),
    (["attribute", "{root}/norun", "--window", "a:b"], 2, "a:b"),
    (["attribute", "{root}/norun"], 2, "norun"),
    (["attribute", "{root}/norun", "--grads", "fast"], 2, "grads must be one of factored, exact"),
    (["llc", "{root}/norun", "--seqs", "0"], 2, "0"),
    (["llc", "{root}/norun", "--step-size", "-1"], 2, "-1"),
    (["llc", "{root}/norun"], 2, "norun"),
    (["llc", "{root}/norun", "--out", M], 2, "is an interplab model folder"),
    # route, serve, info
    (["route", "--preset", "digits-split", "--steps", "0", "--out", E], 2, "0"),
    (["route", "--preset", "digits-split", "--seeds", "0", "--out", E], 2, "0"),
    (["route", "--preset", "nope"], 2, "nope"),
    (["route", "--preset", "digits-split", "--out", F], 2, "afile"),
    # an output folder holding another kind of run is refused before anything runs (it would be overwritten)
    (["heads", M, "--out", M], 2, "is an interplab model folder: writing a head-scores run there"),
    (["patch", M, "--out", M, "--task", "ioi"], 2, "is an interplab model folder"),
    (["lens", M, "--out", S, "--task", "ioi"], 2, "is an SAE folder"),
    (["scrub", "{root}/hyp.py", "--task", "induction", "--out", M], 2, "is an interplab model folder"),
    (["discover", "--task", "induction", "--out", M], 2, "is an interplab model folder"),
    (["route", "--preset", "digits-split", "--out", M], 2, "is an interplab model folder"),
    (["attribute", "{root}/norun", "--out", M], 2, "is an interplab model folder"),
    (["serve", "--db", "{root}/no.db", "--port", "0"], 2, "0"),
    (["serve", "--db", "{root}/no.db", "--port", "70000"], 2, "70000"),
    (["serve"], 2, "--db"),
    (["serve", "--db", "{root}/no.db", "--model", "{root}/nomodel"], 2, "--model: no model at"),
    (["serve", "--db", "{root}/no.db", "--model", S], 2, "is an SAE folder"),
    (["info", "{root}/nomodel"], 2, "nomodel"),
    (["info", "{root}/truncated_model"], 2, "model.safetensors"),
    (["info"], 2, "--builtin"),
    (["nosuchcommand"], 2, "nosuchcommand"),
]


def _fill(arg: str, lab: Path) -> str:
    return arg.format(
        root=lab, model=lab / "model", sae=lab / "sae", corpus=lab / "corpus", existing=lab / "existing",
        afile=lab / "afile",
    )  # fmt: skip


@pytest.mark.parametrize(("args", "code", "named"), CASES, ids=[" ".join(c[0])[:70] for c in CASES])
def test_bad_input_gets_one_clear_line(lab, monkeypatch, args, code, named):
    monkeypatch.setenv("INTERPLAB_CACHE", str(lab / "cache"))
    monkeypatch.delenv("INTERPLAB_DEBUG", raising=False)
    before = _snapshot(lab / "existing")
    result = CliRunner().invoke(app, [_fill(a, lab) for a in args])
    err = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(err) == 1 and err[0].startswith("error:"), result.stderr
    assert _fill(named, lab) in err[0], err[0]
    assert "Traceback" not in result.output
    assert _snapshot(lab / "existing") == before  # nothing written, nothing lost
    assert not (lab / "afile").is_dir() and (lab / "afile").read_text() == "not a folder"


def test_an_out_folder_holding_another_run_is_left_as_it_was(lab):
    before = _snapshot(lab / "model")
    result = CliRunner().invoke(app, ["heads", str(lab / "model"), "--out", str(lab / "model")])
    assert result.exit_code == 2 and "choose another output folder" in result.stderr
    assert _snapshot(lab / "model") == before


def test_debug_shows_the_traceback(lab):
    result = CliRunner().invoke(
        app,
        ["--debug", "heads", str(lab / "model"), "--out", str(lab / "x"), "--prompts", str(lab / "afile")],
    )
    assert (
        result.exit_code == 1
        and result.exception is not None
        and not isinstance(result.exception, SystemExit)
    )


def test_nan_in_sae_training_input_is_caught_at_the_input():
    from interplab.sae.disk_store import ActivationDataError
    from interplab.sae.train import SAETrainConfig, train_saes

    sae = create_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2, hook_name=HOOK))
    good = torch.randn(64, 8)
    bad = good.clone()
    bad[5, 3] = float("nan")
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    with pytest.raises(ActivationDataError, match=r"nan.*batch 1 .*row 5"):
        train_saes(sae, [{HOOK: good}, {HOOK: bad}], SAETrainConfig(total_steps=5, autocast=False))
    assert all(torch.isfinite(v).all() for v in sae.state_dict().values())
    assert before.keys() == sae.state_dict().keys()
