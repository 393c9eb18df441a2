"""benchmarks/gpu_check.py (the GPU check of issue 20) runs on CPU at tiny sizes: every section, every family's
parity within the tolerances the precision tests use, and the JSON it writes names the device."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_mode_runs_every_section_on_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("INTERPLAB_TL_PYTHON", raising=False)
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "check.json")])
    doc = json.loads(Path(out).read_text())
    assert doc["device_type"] == "cpu" and doc["device"] and doc["quick"] is True
    families = {row["variant"].split("-")[0] for row in doc["parity"]}
    assert families == {v.split("-")[0] for v in gpu_check.VARIANTS}
    assert {row["dtype"] for row in doc["parity"]} == {"float32", "bfloat16"}
    assert all(row["within_tolerance"] for row in doc["parity"]), [
        r for r in doc["parity"] if not r["within_tolerance"]
    ]
    assert doc["matmul_bf16_peak"]["tflops"] > 0
    sae = doc["sae_training"]
    assert sae["steps_per_s"] > 0 and 0 < sae["fraction_of_bf16_peak"]
    fwd = doc["forward_and_cache"]
    for dtype in ("float32", "bfloat16"):
        assert set(fwd[dtype]["seconds"]) == {
            "interplab_forward",
            "hf_forward",
            "interplab_cache_all",
            "hf_hidden_states_and_attentions",
        }
    assert fwd["float32"]["logits_max_abs_diff"] == pytest.approx(0, abs=1e-4)
    assert "INTERPLAB_TL_PYTHON" in fwd["transformer_lens"]["skipped"]
    assert doc["patching_sweep"]["bfloat16"]["patches"] == 2 * 6
