import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from interplab.sae import SAEConfig, SAEFormatError, create_sae, load_sae

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated"]


def trained_like(arch: str, **kw):
    sae = create_sae(
        SAEConfig(
            d_in=8,
            d_sae=32,
            architecture=arch,
            k=3 if "topk" in arch else None,
            hook_name="blocks.0.hook_resid_post",
            **kw,
        )
    )
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(32) * 0.3)
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_identical_outputs(arch, tmp_path):
    sae = trained_like(arch)
    sae.save(tmp_path / "sae")
    back = load_sae(tmp_path / "sae")
    assert type(back) is type(sae) and back.cfg == sae.cfg
    x = torch.randn(20, 8)
    assert_close(back(x).feature_acts, sae(x).feature_acts)
    assert_close(back(x).reconstruction, sae(x).reconstruction)


def test_normalisation_is_folded_into_the_file(tmp_path):
    sae = trained_like("relu", normalize_activations="expected_average_only_in")
    sae.set_scale_from(torch.randn(50, 8) * 5)
    sae.save(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["normalize_activations"] == "none"
    back = load_sae(tmp_path / "s")
    x = torch.randn(10, 8) * 5
    assert_close(back(x).feature_acts, sae(x).feature_acts, rtol=1e-5, atol=1e-5)
    assert_close(back(x).reconstruction, sae(x).reconstruction, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["standard", "topk", "jumprelu", "gated"])
def test_reads_files_written_by_saelens(name):
    """Folders written by sae_lens 6.54 itself (tests/sae/make_saelens_fixtures.py), with its encodings."""
    sae = load_sae(FIXTURES / name)
    want = load_file(str(FIXTURES / name / "expected.safetensors"))
    assert sae.cfg.hook_name == "blocks.0.hook_resid_post"
    assert_close(sae.encode(want["x"]), want["feature_acts"])
    assert_close(sae.decode(sae.encode(want["x"])), want["reconstruction"])


def _saelens_python() -> str | None:
    candidates = [os.environ.get("INTERPLAB_SAELENS_PYTHON"), sys.executable, "/tmp/sl-venv/bin/python"]
    for py in candidates:
        if py and Path(py).exists():
            ok = subprocess.run([py, "-c", "import sae_lens"], capture_output=True).returncode == 0
            if ok:
                return py
    return None


@pytest.mark.slow
def test_saelens_loads_our_files(tmp_path):
    py = _saelens_python()
    if py is None:
        pytest.skip("sae_lens is not installed (set INTERPLAB_SAELENS_PYTHON to a Python that has it)")
    saes, inputs = {}, {}
    for arch in ARCHS:
        saes[arch] = trained_like(arch)
        saes[arch].save(tmp_path / arch)
        inputs[arch] = torch.randn(12, 8)
        save_file({"x": inputs[arch]}, str(tmp_path / arch / "inputs.safetensors"))
    script = str(Path(__file__).parent / "saelens_check.py")
    subprocess.run(
        [py, script, *(str(tmp_path / a) for a in ARCHS)],
        check=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    for arch, sae in saes.items():
        got = load_file(str(tmp_path / arch / "saelens_out.safetensors"))
        assert_close(got["feature_acts"], sae.encode(inputs[arch]), msg=arch)
        assert_close(got["reconstruction"], sae(inputs[arch]).reconstruction, msg=arch)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    shutil.copytree(FIXTURES / "standard", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    cfg["architecture"] = "matryoshka_batchtopk"
    (tmp_path / "m" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="unsupported SAE architecture 'matryoshka_batchtopk'"):
        load_sae(tmp_path / "m")


def test_mis_shaped_tensor_is_a_clear_error(tmp_path):
    shutil.copytree(FIXTURES / "standard", tmp_path / "m")
    w = load_file(str(tmp_path / "m" / "sae_weights.safetensors"))
    w["b_enc"] = torch.zeros(15)
    save_file(w, str(tmp_path / "m" / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match=r"b_enc has shape \(15,\), expected \(16,\)"):
        load_sae(tmp_path / "m")


def test_not_an_sae_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an SAE folder"):
        load_sae(tmp_path)
