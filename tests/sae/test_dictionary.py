"""Crosscoders and CLTs as kinds of the run-directory contract beside SAEs: `runs.detect` / `describe` /
`open_run` / `open_dictionary` recognise and describe an SAE, a crosscoder, a model diff, a CLT and the runs
holding them (from their JSON); `load_dictionary` loads each by what its folder is (weights equal to what was
saved); the commands that take only SAEs refuse the others naming their kind and the command that takes them;
`interplab info` describes any of them."""

import json

import pytest
import torch
from torch.testing import assert_close
from typer.testing import CliRunner

from interplab import runs
from interplab.cli.main import app
from interplab.model import ModelConfig, Transformer
from interplab.sae import SAE, SAEConfig, create_sae, describe_dictionary, load_dictionary, load_sae
from interplab.sae.clt import CLTConfig, CrossLayerTranscoder, load_clt
from interplab.sae.clt_train import CLTTrainConfig, train_clt
from interplab.sae.crosscoder import Crosscoder, CrosscoderConfig
from interplab.sae.diffing import DiffResult
from interplab.sae.train import SAETrainConfig, train_saes

HOOK = "blocks.0.hook_resid_post"
SOURCES = (f"step_000010:{HOOK}", f"step_000020:{HOOK}")
runner = CliRunner()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A model, an SAE training run, a crosscoder, a model diff and a CLT training run, on disk."""
    t = tmp_path_factory.mktemp("dictionaries")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=20, n_ctx=16, d_mlp=32))
    model.save(t / "model")
    g = torch.Generator().manual_seed(0)
    sae = create_sae(SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4, hook_name=HOOK))
    batches = [{HOOK: torch.randn(64, 16, generator=g)} for _ in range(6)]
    cfg = SAETrainConfig(total_steps=6, lr=1e-3, autocast=False, log_every=2, checkpoint_every=0)
    train_saes(sae, batches, cfg, run_dir=t / "saerun")
    cc = Crosscoder(CrosscoderConfig(d_in=16, d_sae=48, k=4, sources=SOURCES, model_name="runs/x"), seed=1)
    cc.save(t / "cc")
    diff = t / "diff"
    cc.save(diff / runs.CROSSCODER_DIR)
    result = DiffResult.from_crosscoder(cc, fvu=0.25, meta={"train": {"step": 30.0, "fvu": 0.3, "l0": 4.0}})
    result.save(diff)
    clt_cfg = CLTConfig(n_layers=2, d_model=16, d_sae=24)
    toks = torch.randint(0, 20, (80, 16), generator=g)
    train_clt(
        model, toks, CLTTrainConfig(clt=clt_cfg, total_steps=5, batch_size=64, log_every=5), t / "cltrun"
    )
    return {"t": t, "model": model, "cc": cc}


def test_each_dictionary_and_its_run_is_detected_and_described(lab):
    t = lab["t"]
    sae = t / "saerun" / runs.SAES / "sae"
    kinds = {
        sae: runs.Kind.SAE,
        t / "saerun": runs.Kind.SAE_TRAIN,
        t / "cc": runs.Kind.CROSSCODER,
        t / "diff": runs.Kind.MODEL_DIFF,
        t / "diff" / runs.CROSSCODER_DIR: runs.Kind.CROSSCODER,
        t / "cltrun": runs.Kind.CLT_TRAIN,
        t / "cltrun" / "clt": runs.Kind.CLT,
    }
    assert {p: runs.detect(p) for p in kinds} == kinds
    assert runs.describe(sae) == f"an SAE folder (32 latents, topk (k 4), reading {HOOK})"
    assert runs.describe(t / "cc") == (
        f"a crosscoder folder (48 latents, BatchTopK crosscoder (k 4, 2 sources), reading {SOURCES[0]} and "
        f"{SOURCES[1]})"
    )
    assert runs.describe(t / "cltrun" / "clt") == (
        "a cross-layer transcoder folder (2 layers x 24 latents, jumprelu CLT, cross-layer, reading "
        "blocks.0.hook_resid_mid and blocks.1.hook_resid_mid)"
    )
    counts = json.loads((t / "diff" / runs.DIFF_JSON).read_text())["counts"]
    assert runs.describe(t / "diff") == (
        f"a model diff between two checkpoints ({SOURCES[0]} -> {SOURCES[1]}: {counts['new']} new, "
        f"{counts['lost']} lost, {counts['shared']} shared; crosscoder/)"
    )
    assert isinstance(runs.open_run(t / "cc"), runs.CrosscoderDir)
    assert runs.open_run(t / "cc").sources == list(SOURCES)
    assert isinstance(runs.open_run(sae), runs.SAEDir)
    diff = runs.open_run(t / "diff")
    assert isinstance(diff, runs.ModelDiffRun) and diff.crosscoder == t / "diff" / runs.CROSSCODER_DIR
    assert diff.data["kind"] == "model_diff" and diff.data["counts"] == counts


def test_legacy_diffs_and_weightless_configs(lab, tmp_path):
    """A diff.json written before it carried a kind is still a model diff; a cfg.json without its weights is
    no crosscoder (as an SAE's)."""
    data = json.loads((lab["t"] / "diff" / runs.DIFF_JSON).read_text())
    del data["kind"], data["version"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / runs.DIFF_JSON).write_text(json.dumps(data))
    assert runs.detect(tmp_path / "old") is runs.Kind.MODEL_DIFF
    with pytest.raises(runs.RunError, match="no crosscoder/"):
        _ = runs.ModelDiffRun.open(tmp_path / "old").crosscoder
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / runs.CROSSCODER_CFG).write_text((lab["t"] / "cc" / runs.CROSSCODER_CFG).read_text())
    assert runs.detect(tmp_path / "bare") is None


def test_dictionary_info_reads_sites_sizes_and_the_training_report(lab):
    t = lab["t"]
    sae = describe_dictionary(t / "saerun")
    assert (sae.kind, sae.reads, sae.writes, sae.d_in, sae.n_latents) == (
        runs.Kind.SAE,
        (HOOK,),
        (HOOK,),
        16,
        32,
    )
    summary = json.loads((t / "saerun" / runs.TRAIN_SUMMARY).read_text())
    assert sae.training is not None and sae.training["run"] == t / "saerun"
    assert sae.training["final"]["fvu"] == summary["final"]["sae"]["fvu"] and sae.training["steps"] == 6
    cc = describe_dictionary(t / "diff")  # a model diff names its crosscoder
    assert cc.path == t / "diff" / runs.CROSSCODER_DIR and cc.reads == SOURCES and cc.n_latents == 48
    assert cc.training["held-out fvu"] == 0.25 and cc.training["final"] == {
        "step": 30.0,
        "fvu": 0.3,
        "l0": 4.0,
    }
    assert describe_dictionary(t / "cc").training is None and describe_dictionary(t / "cc").model == "runs/x"
    clt = describe_dictionary(t / "cltrun")
    last = [r for r in runs.read_log(t / "cltrun") if "step" in r][-1]
    assert clt.kind is runs.Kind.CLT and clt.n_latents == 48 and clt.d_in == 16
    assert clt.writes == ("blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out")
    assert clt.training["final"]["step"] == last["step"] == 5 and clt.training["final"]["l0"] == last["l0"]
    assert ("load with", "interplab.sae.clt.load_clt") in clt.rows()
    with pytest.raises(runs.RunError, match="expected a dictionary"):
        describe_dictionary(t / "model")


def test_load_dictionary_returns_each_kind_with_its_saved_weights(lab):
    t = lab["t"]
    sae = load_dictionary(t / "saerun")
    assert isinstance(sae, SAE)
    ref = load_sae(t / "saerun" / runs.SAES / "sae")
    for key, value in ref.state_dict().items():
        assert torch.equal(sae.state_dict()[key], value), key
    for path in (t / "cc", t / "diff"):
        cc = load_dictionary(path)
        assert isinstance(cc, Crosscoder) and cc.cfg.sources == SOURCES
        for key, value in lab["cc"].state_dict().items():
            assert_close(cc.state_dict()[key], value, rtol=0, atol=0)
    clt = load_dictionary(t / "cltrun")
    assert isinstance(clt, CrossLayerTranscoder) and clt.cfg.d_sae == 24
    assert runs.dictionary_folder(t / "cltrun") == (t / "cltrun" / "clt", runs.Kind.CLT)
    ref_clt = load_clt(t / "cltrun" / "clt")
    for key, value in ref_clt.state_dict().items():
        assert torch.equal(clt.state_dict()[key], value), key
    with pytest.raises(runs.RunError, match="holds no SAE named 'other'"):
        load_dictionary(t / "saerun", name="other")
    # load_sae on a crosscoder still names its kind and loaders
    with pytest.raises(FileNotFoundError, match="kind 'crosscoder'.*load_dictionary"):
        load_sae(t / "cc")


def _fails(args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    return " ".join(res.output.split())


@pytest.mark.parametrize(
    ("where", "label", "command"),
    [
        ("cc", "a crosscoder folder", "interplab sae diff"),
        ("diff", "a model diff between two checkpoints", "interplab serve --db"),
        ("cltrun", "a CLT training run", "interplab clt eval"),
        ("cltrun/clt", "a cross-layer transcoder folder", "interplab graph build --clt"),
    ],
)
def test_sae_commands_refuse_other_dictionaries_naming_the_kind_and_the_command(lab, where, label, command):
    t = lab["t"]
    path = t / where
    for args in (
        ["sae", "eval", path, "--model", t / "model"],
        ["sae", "bench", path, "--model", t / "model", "--out", t / "bench"],
        [
            "features",
            "build",
            "--model",
            t / "model",
            "--sae",
            path,
            "--corpus",
            "python-stdlib",
            "--out",
            t / "f.db",
        ],
    ):
        out = _fails(args)
        assert f"is {label}" in out and "not an SAE" in out and command in out, out
    assert not (t / "bench").exists() and not (t / "f.db").exists()


def test_info_describes_dictionaries(lab):
    t = lab["t"]
    for path, words in (
        (t / "saerun", ["an SAE folder", "topk (k 4)", "final fvu", "trained in"]),
        (t / "diff", ["a crosscoder folder", SOURCES[1], "held-out fvu", "0.25"]),
        (t / "cltrun", ["a cross-layer transcoder folder", "blocks.1.hook_mlp_out", "final l0"]),
    ):
        res = runner.invoke(app, ["info", str(path)], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        for w in words:
            assert w in res.output, (w, res.output)
