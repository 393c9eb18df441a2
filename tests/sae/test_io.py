import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from interplab.sae import Normalization, Reshape, SAEConfig, SAEFormatError, create_sae, load_sae
from interplab.sae.io import SAELENS_LAYOUT_VERSION
from tests.peers import peer_env, peer_python

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures" / "saelens"
ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated"]
RESID, Z = "blocks.0.hook_resid_post", "blocks.1.attn.hook_z"
MLP_IN, MLP_OUT = "blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out"
# interplab SAEs of every architecture, as ordinary SAEs, transcoders and per-head (hook_z) SAEs, with the
# sae_lens class that must read each (d_in 8 = the width of the peer's small model at these hooks)
OURS = {
    **{arch: (arch, {}) for arch in ARCHS},
    **{f"{arch}_transcoder": (arch, {"hook_name": MLP_IN, "hook_name_out": MLP_OUT}) for arch in ARCHS},
    "topk_hook_z": ("topk", {"hook_name": Z}),
    "jumprelu_hook_z": ("jumprelu", {"hook_name": Z}),
    "relu_scaled": ("relu", {"normalize_activations": "expected_average_only_in"}),
}
SAELENS_CLASS = {
    "relu": "StandardSAE",
    "topk": "TopKSAE",
    "batchtopk": "JumpReLUSAE",
    "jumprelu": "JumpReLUSAE",
    "gated": "GatedSAE",
    "relu_transcoder": "Transcoder",
    "jumprelu_transcoder": "JumpReLUTranscoder",
    "batchtopk_transcoder": "JumpReLUTranscoder",
    "topk_transcoder": "TopKSAE",
    "gated_transcoder": "GatedSAE",
}


def trained_like(arch: str, d_in: int = 8, d_sae: int = 32, seed: int = 0, **kw):
    torch.manual_seed(seed)
    kw = {"hook_name": RESID, "model_name": "tiny-model", **kw}
    sae = create_sae(
        SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=3 if "topk" in arch else None, **kw)
    )
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae) * 0.3)
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    if sae.cfg.normalize_activations is not Normalization.NONE:
        sae.set_scale_from(torch.randn(50, d_in) * 5)
    return sae


def sample_input(sae, batch=(4, 3), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = 5.0 if sae.cfg.normalize_activations is not Normalization.NONE else 1.0
    if sae.cfg.reshape_activations is Reshape.HOOK_Z:
        return torch.randn(*batch, 4, sae.cfg.d_in // 4, generator=g) * scale
    return torch.randn(*batch, sae.cfg.d_in, generator=g) * scale


def _close(a, b, msg=""):
    assert_close(a, b, rtol=1e-5, atol=1e-5, msg=msg)


# ---- interplab -> interplab ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OURS))
@pytest.mark.parametrize("seed", [0, 3])
def test_round_trip_identical_outputs(name, seed, tmp_path):
    arch, kw = OURS[name]
    sae = trained_like(arch, seed=seed, **kw)
    sae.save(tmp_path / "sae")
    back = load_sae(tmp_path / "sae")
    assert type(back) is type(sae)
    assert back.cfg == sae.cfg.replace(normalize_activations=Normalization.NONE) or back.cfg == sae.cfg
    x = sample_input(sae)
    _close(back(x).feature_acts, sae(x).feature_acts)
    _close(back(x).reconstruction, sae(x).reconstruction)


def test_normalisation_is_folded_into_the_file(tmp_path):
    sae = trained_like("relu", normalize_activations="expected_average_only_in")
    assert float(sae.act_scale) != 1.0
    sae.save(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["normalize_activations"] == "none"
    back = load_sae(tmp_path / "s")
    assert float(back.act_scale) == 1.0
    x = sample_input(sae)
    _close(back(x).feature_acts, sae(x).feature_acts)
    _close(back(x).reconstruction, sae(x).reconstruction)


# ---- what cfg.json says, as sae_lens writes it ----------------------------------------------------------
SAME_LAYOUT = {  # our SAE -> the fixture folder sae_lens wrote for that sae_lens architecture
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "relu_transcoder": "transcoder",
    "jumprelu_transcoder": "jumprelu_transcoder",
    "batchtopk_transcoder": "jumprelu_transcoder",
    "topk_hook_z": "hook_z",
}


@pytest.mark.parametrize("name", list(SAME_LAYOUT))
def test_cfg_json_has_saelens_keys_and_metadata(name, tmp_path):
    arch, kw = OURS[name]
    sae = trained_like(arch, **kw)
    ours = json.loads((sae.save(tmp_path / "s") / "cfg.json").read_text())
    theirs = json.loads((FIXTURES / SAME_LAYOUT[name] / "cfg.json").read_text())
    assert list(ours) == list(theirs)  # sae_lens' keys, in sae_lens' order
    assert ours["architecture"] == theirs["architecture"]
    assert ours["reshape_activations"] == theirs["reshape_activations"]
    meta = ours["metadata"]
    # without a sae_lens_version >= 6 sae_lens reads the pre-6 layout and drops the metadata block
    assert (
        meta["sae_lens_version"] == SAELENS_LAYOUT_VERSION and int(SAELENS_LAYOUT_VERSION.split(".")[0]) >= 6
    )
    assert meta["hook_name"] == sae.cfg.hook_name and meta["model_name"] == "tiny-model"
    assert meta.get("hook_name_out") == sae.cfg.hook_name_out
    assert set(theirs["metadata"]) - set(meta) <= {
        "context_size",
        "prepend_bos",
        "dataset_path",
        "seqpos_slice",
    } | {"model_from_pretrained_kwargs"}


# ---- sae_lens -> interplab (fixtures written by sae_lens itself) -----------------------------------------
SAELENS_FOLDERS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def check_saelens_folder(folder: Path) -> None:
    """interplab loads ``folder`` (written by sae_lens) with sae_lens' numbers and sae_lens' metadata."""
    sae = load_sae(folder)
    want = load_file(str(folder / "expected.safetensors"))
    raw = json.loads((folder / "cfg.json").read_text())
    meta = raw["metadata"]
    _close(sae.encode(want["x"]), want["feature_acts"], msg=folder.name)
    _close(sae(want["x"]).reconstruction, want["reconstruction"], msg=folder.name)
    assert sae.cfg.hook_name == meta["hook_name"]
    assert sae.cfg.hook_name_out == meta.get("hook_name_out")
    assert sae.cfg.model_name == meta["model_name"]
    extra = sae.cfg.extra_metadata
    assert extra["context_size"] == meta["context_size"] and extra["dataset_path"] == meta["dataset_path"]
    assert extra["sae_lens_training_version"] == meta["sae_lens_training_version"]
    assert sae.cfg.reshape_activations.value == raw["reshape_activations"]


def test_fixture_folders_are_all_there():
    assert {"standard", "topk", "jumprelu", "gated", "transcoder", "jumprelu_transcoder", "hook_z"} <= set(
        SAELENS_FOLDERS
    )
    assert {
        "batchtopk_checkpoint",
        "topk_checkpoint",
        "jumprelu_checkpoint",
        "standard_expected_average",
    } <= set(SAELENS_FOLDERS)


@pytest.mark.parametrize("name", SAELENS_FOLDERS)
def test_reads_files_written_by_saelens(name):
    check_saelens_folder(FIXTURES / name)


def test_batchtopk_checkpoint_encodes_with_its_topk_threshold():
    sae = load_sae(FIXTURES / "batchtopk_checkpoint")
    raw = json.loads((FIXTURES / "batchtopk_checkpoint" / "cfg.json").read_text())
    assert sae.cfg.architecture.value == "batchtopk" and sae.cfg.k == int(raw["k"])
    assert float(sae.threshold) == pytest.approx(0.4)
    # rescale_acts_by_decoder_norm is folded in: unit decoder rows, as sae_lens' save_inference_model makes
    assert raw["rescale_acts_by_decoder_norm"] is True
    _close(sae.W_dec.norm(dim=-1), torch.ones(sae.cfg.d_sae))


def test_expected_average_folder_is_read_as_saelens_reads_it():
    sae = load_sae(FIXTURES / "standard_expected_average")
    assert sae.cfg.normalize_activations is Normalization.EXPECTED_AVERAGE_ONLY_IN
    assert float(sae.act_scale) == 1.0  # sae_lens' load_from_disk applies no scale either


def test_hook_z_folder_takes_per_head_input():
    sae = load_sae(FIXTURES / "hook_z")
    want = load_file(str(FIXTURES / "hook_z" / "expected.safetensors"))
    x = want["x"]
    assert x.ndim == 4 and sae.cfg.reshape_activations is Reshape.HOOK_Z
    out = sae(x)
    assert out.reconstruction.shape == x.shape and out.feature_acts.shape == (*x.shape[:2], sae.cfg.d_sae)
    _close(sae.encode(x.flatten(-2)), want["feature_acts"])  # flat input is the same SAE
    with pytest.raises(ValueError, match=r"or \[\.\.\., n_heads, d_head\]"):
        sae.encode(torch.randn(2, 3, 3, 2))


@pytest.mark.parametrize("name", ["standard", "hook_z", "batchtopk_checkpoint", "transcoder"])
def test_saelens_metadata_survives_our_save(name, tmp_path):
    """sae_lens folder -> interplab -> save: the metadata sae_lens wrote is still there, numbers unchanged."""
    src = FIXTURES / name
    sae = load_sae(src)
    sae.save(tmp_path / "again")
    shutil.copy(src / "expected.safetensors", tmp_path / "again")
    meta = json.loads((tmp_path / "again" / "cfg.json").read_text())["metadata"]
    theirs = json.loads((src / "cfg.json").read_text())["metadata"]
    for key, value in theirs.items():
        if key != "sae_lens_version":
            assert meta[key] == value, key
    check_saelens_folder(tmp_path / "again")


def test_old_log_threshold_checkpoint(tmp_path):
    """Older sae_lens JumpReLU checkpoints store log_threshold; sae_lens loads threshold = exp of it."""
    shutil.copytree(FIXTURES / "jumprelu_checkpoint", tmp_path / "j")
    w = load_file(str(tmp_path / "j" / "sae_weights.safetensors"))
    w["log_threshold"] = w.pop("threshold").log()
    save_file(w, str(tmp_path / "j" / "sae_weights.safetensors"))
    check_saelens_folder(tmp_path / "j")


def test_pre_6_layout(tmp_path):
    """Before sae_lens 6 the hook names sat at the top level (``hook_point``) and TopK was an activation."""
    shutil.copytree(FIXTURES / "topk", tmp_path / "old")
    new = json.loads((tmp_path / "old" / "cfg.json").read_text())
    old = {
        "d_in": new["d_in"],
        "d_sae": new["d_sae"],
        "dtype": "torch.float32",
        "model_name": "tiny-model",
        "hook_point": RESID,
        "hook_point_head_index": None,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": new["k"]},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "context_size": 16,
        "sae_lens_training_version": "3.5.0",
    }
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(old))
    sae = load_sae(tmp_path / "old")
    assert sae.cfg.architecture.value == "topk" and sae.cfg.k == new["k"] and sae.cfg.hook_name == RESID
    assert sae.cfg.extra_metadata == {"context_size": 16, "sae_lens_training_version": "3.5.0"}
    want = load_file(str(tmp_path / "old" / "expected.safetensors"))
    _close(sae.encode(want["x"]), want["feature_acts"])


# ---- clear errors ---------------------------------------------------------------------------------------
def _edited(tmp_path, name="standard", **changes):
    shutil.copytree(FIXTURES / name, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    for key, value in changes.items():
        if key == "metadata":
            cfg["metadata"].update(value)
        else:
            cfg[key] = value
    (tmp_path / "m" / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path / "m"


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        (
            "standard",
            {"architecture": "matching_pursuit"},
            "unsupported SAE architecture 'matching_pursuit'",
        ),
        (
            "standard",
            {"normalize_activations": "layer_norm"},
            "normalize_activations='layer_norm' is not supported",
        ),
        ("standard", {"metadata": {"hook_head_index": 2}}, "hook_head_index=2"),
        ("batchtopk_checkpoint", {"k": 2.5}, "needs a whole number k, got k=2.5"),
        (
            "standard",
            {"metadata": {"hook_name": "blocks.0.hook_nonsense"}},
            "unknown site 'blocks.0.hook_nonsense'",
        ),
        ("standard", {"reshape_activations": "hook_z"}, "reshape_activations='hook_z' needs"),
    ],
)
def test_unreadable_config_is_a_clear_error(tmp_path, name, changes, message):
    with pytest.raises(SAEFormatError, match=message):
        load_sae(_edited(tmp_path, name, **changes))


def test_mis_shaped_tensor_is_a_clear_error(tmp_path):
    shutil.copytree(FIXTURES / "standard", tmp_path / "m")
    w = load_file(str(tmp_path / "m" / "sae_weights.safetensors"))
    w["b_enc"] = torch.zeros(15)
    save_file(w, str(tmp_path / "m" / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match=r"b_enc has shape \(15,\), expected \(16,\)"):
        load_sae(tmp_path / "m")


def test_varying_batchtopk_threshold_is_refused(tmp_path):
    sae = trained_like("batchtopk")
    sae.save(tmp_path / "b")
    w = load_file(str(tmp_path / "b" / "sae_weights.safetensors"))
    w["threshold"] = torch.rand(sae.cfg.d_sae)
    save_file(w, str(tmp_path / "b" / "sae_weights.safetensors"))
    (tmp_path / "b" / "checksums.json").unlink()  # edited by hand, as a file from another tool would be
    with pytest.raises(SAEFormatError, match="one threshold"):
        load_sae(tmp_path / "b")


def test_not_an_sae_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an SAE folder"):
        load_sae(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_sae(tmp_path / "missing")


def test_another_dictionarys_folder_names_its_loader(tmp_path):
    """A crosscoder's or a CLT's folder holds a cfg.json too: the error says which it is and what loads it."""
    from interplab.sae.clt import CLTConfig, CrossLayerTranscoder, load_clt, save_clt
    from interplab.sae.crosscoder import Crosscoder, CrosscoderConfig, load_crosscoder

    Crosscoder(CrosscoderConfig(d_in=4, d_sae=8, k=2, sources=("a", "b"))).save(tmp_path / "cc")
    with pytest.raises(FileNotFoundError, match=r"kind 'crosscoder': load it with .*load_crosscoder"):
        load_sae(tmp_path / "cc")
    load_crosscoder(tmp_path / "cc")  # and that loader does read it
    save_clt(CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=4, d_sae=8)), tmp_path / "clt")
    with pytest.raises(FileNotFoundError, match=r"kind 'clt': load it with .*load_clt"):
        load_sae(tmp_path / "clt")
    load_clt(tmp_path / "clt")


# ---- with the real sae_lens (the peer environment) -------------------------------------------------------
def test_saelens_loads_our_files(tmp_path):
    """interplab saves -> sae_lens.SAE.load_from_disk: same numbers, sae_lens' metadata (hook_name,
    model_name, hook_name_out, reshape), sae_lens' own cfg.json keys, and HookedSAETransformer places it."""
    py = peer_python("saelens")
    saes = {}
    for name, (arch, kw) in OURS.items():
        saes[name] = trained_like(arch, **kw)
        saes[name].save(tmp_path / name)
        save_file({"x": sample_input(saes[name])}, str(tmp_path / name / "inputs.safetensors"))
    subprocess.run(
        [py, str(HERE / "saelens_check.py"), *(str(tmp_path / n) for n in OURS)],
        check=True,
        env=peer_env(),
        timeout=300,
    )
    for name, sae in saes.items():
        x = load_file(str(tmp_path / name / "inputs.safetensors"))["x"]
        got = load_file(str(tmp_path / name / "saelens_out.safetensors"))
        _close(got["feature_acts"], sae.encode(x), msg=name)
        _close(got["reconstruction"], sae(x).reconstruction, msg=name)
        report = json.loads((tmp_path / name / "saelens_out.json").read_text())
        ours = json.loads((tmp_path / name / "cfg.json").read_text())
        assert report["class"] == SAELENS_CLASS.get(name, report["class"]), name
        assert report["resaved_keys"] == list(ours), name
        meta = report["metadata"]
        assert meta["hook_name"] == sae.cfg.hook_name and meta["model_name"] == "tiny-model", name
        assert meta.get("hook_name_out") == sae.cfg.hook_name_out, name
        assert report["reshape_activations"] == sae.cfg.reshape_activations.value, name
        assert report["placed"] is True, name


def test_saelens_written_folders_load_here(tmp_path):
    """The installed sae_lens writes every fixture kind afresh; interplab reads each with its numbers."""
    py = peer_python("saelens")
    subprocess.run(
        [py, str(HERE / "make_saelens_fixtures.py"), str(tmp_path)], check=True, env=peer_env(), timeout=300
    )
    made = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert made == SAELENS_FOLDERS  # the committed fixtures are the script's current output
    for name in made:
        check_saelens_folder(tmp_path / name)
        fresh = json.loads((tmp_path / name / "cfg.json").read_text())
        committed = json.loads((FIXTURES / name / "cfg.json").read_text())
        assert fresh == committed, (
            f"{name}: rerun tests/sae/make_saelens_fixtures.py with the peer and commit"
        )
